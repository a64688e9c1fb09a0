"""Training-step cost of each method against its bare backbone: img/s, ms/step, counted GFLOP/step,
achieved TFLOP/s, MFU (against this machine's measured matmul peak), step-time ratio, peak memory.

A case is (preset, input size, batch). The method is built as the trainer builds it (load_config +
create_method, pretrained=false: random weights, same speed), in its steady-state phase: after the
frozen warm-up (`train.trainable_blocks` of the recipe trainable, the rest frozen with BatchNorm in
eval mode, as the trainer does) and after every loss warm-up (epoch = last). One step = forward_losses +
backward + optimizer step + after_step (EMA) + reading the loss (the trainer's per-step sync). The bare
backbone step is the same backbone, same trainable blocks, forward + `out.float().mean()` + backward +
step. Inputs are random tensors and random multi-hot labels (no data loading).

Timing: method and backbone are built side by side in one fresh process and their steps interleaved
(warm-up, then N rounds of one step each), so load changes on a shared machine hit both alike; ms/step is
the median, the method/backbone ratio the median of the per-round ratios. Peak memory comes from a
separate fresh process per variant (peak RSS sampled while it builds and steps on CPU, including the
interpreter and imports; torch.cuda.max_memory_allocated on GPU).

FLOPs: torch.utils.flop_counter over one step (matmuls, convolutions, attention, LSTMs; the optimizer
has none), i.e. the FLOPs actually executed, extra teacher / equivariance passes included. MFU = achieved
FLOP/s over the best n x n matmul FLOP/s measured here (fp32 on CPU, bf16 on GPU).

When a method costs more than --limit x its backbone, the extra is split by timing the method against
itself with each component switched off (ET, PCE; USAGE's teacher + L_REG), interleaved likewise, and
the EMA update alone.

    python benchmarks/bench_train.py                              # CPU: demo presets, 224 px, batch 8
    python benchmarks/bench_train.py --device cuda --amp bf16 --suite gpu   # paper recipes on a GPU
    python benchmarks/bench_train.py --suite gpu --batch 2 --size 224 --steps 3   # recipes, small, on CPU
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.utils.flop_counter as fc
from common import (
    CPUShare,
    RSSPeak,
    machine,
    matmul_peak,
    run_isolated,
    steady_state_model,
    sync,
    table,
    timings,
    write_section,
)

aten = torch.ops.aten
# (preset, size, batch); None = the recipe's crop size / batch
SUITES = {
    "cpu": [(p, 224, 8) for p in ("demo/tkp_pcl", "demo/vit_pcm", "demo/usage_cnn", "demo/cam_cnn", "demo/usage_vit")],
    "gpu": [("voc/tkp_pcl_vit_b16", None, None), ("voc/usage_deit_s", None, None), ("voc/usage_resnet50", None, None)],
}


# ------------------------------------------------------------------------------------------------- FLOPs


def _shape_numel(s) -> int:
    return math.prod(s) if s else 0


def _cpu_flash(query, key, value, *a, out_shape=None, **k):
    return fc.sdpa_flop_count(query, key, value)


def _cpu_flash_bwd(grad_out, query, key, value, *a, out_shape=None, **k):
    return fc.sdpa_backward_flop_count(grad_out, query, key, value)


def _mkldnn_rnn(input, w_ih, w_hh, *a, out_shape=None, **k):  # one layer, one direction: [T, B, I]
    return 2 * input[0] * input[1] * (_shape_numel(w_ih) + _shape_numel(w_hh))


def _cudnn_rnn(input, weight, *a, out_shape=None, **k):  # all layers/directions: 2-D weights x tokens
    return 2 * input[0] * input[1] * sum(_shape_numel(w) for w in weight if len(w) == 2)


def _conv_bwd(grad_out, x, w, _b, _s, _p, _d, transposed, _op, _g, output_mask, out_shape=None, **k):
    # grad input and grad weight each cost one forward; torch's formula ignores groups and counts a
    # depthwise conv's grad weight `groups` times over (MobileNetV2: 20x the forward).
    fwd = fc.conv_flop_count(list(x), list(w), list(grad_out), transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


# torch's counter misses CPU attention and the fused LSTM kernels (ViT-PCM's HV-BiLSTM) and overcounts
# grouped-conv backward: fixed here. Backward = 2x forward for the RNNs (grad of inputs + of weights).
FLOP_EXTRA = {
    aten.convolution_backward: _conv_bwd,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd,
    aten.mkldnn_rnn_layer: _mkldnn_rnn,
    aten.mkldnn_rnn_layer_backward: lambda *a, **k: 2 * _mkldnn_rnn(*a, **k),
    aten._cudnn_rnn: _cudnn_rnn,
    aten._cudnn_rnn_backward: lambda *a, **k: 2 * _cudnn_rnn(*a, **k),
}


def count_flops(fn) -> int:
    with fc.FlopCounterMode(display=False, custom_mapping=FLOP_EXTRA) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------- one measurement


def num_classes_of(preset: str) -> int:
    if preset.startswith("demo/"):
        from wsss.data.demo import CLASS_NAMES

        return len(CLASS_NAMES)
    return 81 if preset.startswith("coco/") else 21


def _build(preset: str, kind: str, overrides: list[str], size, batch, dev: torch.device, amp: str):
    """(step function, description) of one variant in the trainer's steady state (see the module doc)."""
    from wsss.config import load_config

    cfg = load_config(preset, ["model.backbone.pretrained=false", "model.backbone.weights=", *overrides])
    t = cfg.train
    size, batch = size or cfg.data.crop_size, batch or t.batch_size
    model, opt, amp_dtype, trainable = steady_state_model(cfg, kind, num_classes_of(preset), dev, t.channels_last, amp)

    x = torch.randn(batch, 3, size, size, device=dev)
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = num_classes_of(preset) - 1
    y = (torch.rand(batch, c, device=dev) < 0.3).float()
    y[torch.arange(batch), torch.randint(0, c, (batch,))] = 1.0  # at least one tag per image
    epoch = max(t.epochs - 1, 0)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = model.forward_losses(x, y, epoch)["loss"] if kind == "method" else model(x).float().mean()
        loss.backward()
        opt.step()
        if kind == "method":
            model.after_step()
        return float(loss.detach())  # the trainer reads the loss every step (a sync on GPU)

    info = {"preset": preset, "kind": kind, "overrides": list(overrides), "backbone": cfg.model.backbone.name,
            "size": size, "batch": batch, "device": str(dev),
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
            "trainable_params": sum(p.numel() for p in trainable)}
    ema = model.after_step if kind == "method" and getattr(model, "teacher", None) is not None else None
    return step, info, ema


def measure(preset: str, variants: list[dict], size: int | None = None, batch: int | None = None, steps: int = 10,
            warmup: int = 3, device: str = "cpu", amp: str = "", overrides: list[str] = (), threads: int = 0,
            flops: bool = True, seed: int = 0) -> dict:
    """Time the variants ({"name", "kind": "method" | "backbone", "overrides"}) of one case, built side by
    side in this process with their timed steps interleaved round-robin, so a load change on a shared
    machine hits them alike. Peak memory only with a single variant (the others' tensors would count).
    Returns {name: result}, JSON-able."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss = RSSPeak().start()  # models, optimizer states and activations, until the timed steps end
    built = {v["name"]: _build(preset, v["kind"], [*overrides, *v.get("overrides", [])], size, batch, dev, amp)
             for v in variants}
    for step, _, _ in built.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(steps):  # interleaved, one step of each in turn: a load change hits them all alike
        for name, (step, _, _) in built.items():
            times[name] += timings(dev, step, 1)
    rss.stop()
    out = {}
    for name, (step, info, ema) in built.items():
        r = out[name] = {**info, "step_s": statistics.median(times[name]), "step_s_all": times[name]}
        r["img_s"] = r["batch"] / r["step_s"]
        if ema is not None:  # the EMA teacher update alone
            t0 = time.perf_counter()
            for _ in range(max(1, steps)):
                ema()
            sync(dev)
            r["ema_s"] = (time.perf_counter() - t0) / max(1, steps)
        r["flops"] = count_flops(step) if flops else None
        r["peak_mem_mb"] = None
        if len(built) == 1:
            r["peak_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else rss.main_mb
            r["rss_at_start_mb"] = rss.start_mb  # the interpreter + torch + imports, before the model
        r["mem_kind"] = "cuda max_memory_allocated" if dev.type == "cuda" else "peak RSS"
    return out


def ratio(a: dict, b: dict) -> float:
    """Median over the interleaved rounds of a's step time over b's (robust to load drift)."""
    return statistics.median(x / y for x, y in zip(a["step_s_all"], b["step_s_all"], strict=True))


# --------------------------------------------------------------------------------------------- components


def components(preset: str, overrides: list[str]) -> list[tuple[str, list[str]]]:
    """(component name, overrides that switch it off) for the method's optional extra terms."""
    from wsss.config import load_config

    m = load_config(preset, ["model.backbone.pretrained=false", *overrides]).method
    out = []
    if m.name == "patch_classification":
        if m.et.weight > 0:
            out.append(("ET (teacher fwd + warped student fwd/bwd)", ["method.et.weight=0"]))
        if m.pce.weight > 0:
            out.append(("PCE", ["method.pce.weight=0"]))
        if len(out) == 2:
            out.append(("ET + PCE", ["method.et.weight=0", "method.pce.weight=0"]))
    elif m.name == "cam" and m.reg.weight > 0:
        out.append(("teacher fwd + L_REG + EMA", ["method.reg.weight=0"]))
    return out


# ------------------------------------------------------------------------------------------------- main


def _fmt(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}"


def markdown(result: dict) -> str:
    peak = result["peak_flops"]
    rows = []
    for case in result["cases"]:
        for r in (case["method"], case["backbone"]):
            tflops = r["flops"] / r["step_s"] / 1e12 if r["flops"] else None
            is_method = r["kind"] == "method"
            rows.append([f"`{case['preset']}`" if is_method else "", r["kind"], "" if is_method else r["backbone"],
                         f"{r['batch']} x {r['size']}", f"{1000 * r['step_s']:.0f}", _fmt(r["img_s"]),
                         _fmt(r["flops"] / 1e9 if r["flops"] else None), _fmt(tflops, 3),
                         _fmt(100 * tflops * 1e12 / peak if tflops else None), _fmt(r["peak_mem_mb"], 0),
                         f"**{case['ratio']:.2f}x**" if is_method else "1"])
    text = table(["case", "step", "backbone", "batch x px", "ms/step", "img/s", "GFLOP/step", "TFLOP/s",
                  "MFU %", "peak MiB", "method / backbone"], rows, "lllrrrrrrrr")
    notes = []
    for case in result["cases"]:
        ok = "within" if case["ratio"] <= result["limit"] else "OVER"
        line = f"- `{case['preset']}`: {case['ratio']:.2f}x the bare backbone ({ok} the {result['limit']}x target)"
        parts = [f"{name}: {b['ms']:.0f} ms/step, {100 * b['share']:.0f}% of the method's step"
                 + (f", {b['gflop']:.1f} GFLOP" if b["gflop"] is not None else "")
                 + f" (without it: ~{b['ratio_without']:.2f}x)" for name, b in case.get("breakdown", {}).items()]
        if "ema_s" in case["method"]:
            parts.append(f"EMA update alone: {1000 * case['method']['ema_s']:.1f} ms")
        notes.append(line + ("; " + "; ".join(parts) if parts else "") + ".")
    mem = result["cases"][0]["method"]["mem_kind"] if result["cases"] else ""
    return (f"Command: `{result['command']}`  \nMachine: {result['machine']}.  \n{result['cpu_share']}.  \n"
            f"MFU denominator: {result['peak_kind']} measured here: {peak / 1e12:.3f} TFLOP/s. "
            f"Peak memory: {mem}" + (f" sampled during build + steps, each row in a fresh process; it includes the "
                                     f"~{result['cases'][0]['method']['rss_at_start_mb']:.0f} MiB of the interpreter and "
                                     "imports" if mem == "peak RSS" else "") + ".\n\n"
            + text + "\n\n" + "\n".join(notes) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    ap.add_argument("--cases", default="", help="comma-separated presets instead of the suite's")
    ap.add_argument("--size", type=int, default=0, help="input px (default: the suite's, else the recipe's)")
    ap.add_argument("--batch", type=int, default=0, help="batch (default: the suite's, else the recipe's)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default 10 CPU, 20 GPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="", help="bf16 | fp16 | off (default: the recipe's train.amp)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("-o", "--override", action="append", default=[], help="key=value for every case")
    ap.add_argument("--limit", type=float, default=1.3, help="method/backbone ratio target")
    ap.add_argument("--breakdown", choices=("auto", "always", "never"), default="auto",
                    help="time the method with components off (auto: when over --limit)")
    ap.add_argument("--no-isolate", action="store_true", help="measure in this process (no per-case peak RSS)")
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--write", action="store_true", help="update the section of benchmarks/RESULTS.md")
    ap.add_argument("--section", default="", help="RESULTS.md section key (default: train on CPU, gpu on CUDA)")
    args = ap.parse_args(argv)
    command = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (20 if dev.type == "cuda" else 10)
    cases = SUITES[args.suite]
    if args.cases:
        cases = [(p, None, None) for p in args.cases.split(",")]
    here = Path(__file__).resolve()

    def run(preset, size, batch, variants, steps=steps, warmup=args.warmup, flops=not args.no_flops):
        kw = dict(preset=preset, variants=variants, size=size, batch=batch, steps=steps, warmup=warmup,
                  device=args.device, amp=args.amp, overrides=args.override, threads=args.threads, flops=flops)
        return measure(**kw) if args.no_isolate else run_isolated(here, "measure", kw)

    pair = [{"name": "method", "kind": "method"}, {"name": "backbone", "kind": "backbone"}]
    with CPUShare() as share:
        peak_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        peak = matmul_peak(dev, peak_dtype)
        out_cases = []
        for preset, size, batch in cases:
            size, batch = args.size or size, args.batch or batch
            r = run(preset, size, batch, pair)
            for v in pair:  # peak memory: each variant alone in a fresh process
                alone = run(preset, size, batch, [v], steps=1, warmup=1, flops=False)[v["name"]]
                r[v["name"]].update({k: alone.get(k) for k in ("peak_mem_mb", "rss_at_start_mb")})
            case = {"preset": preset, "method": r["method"], "backbone": r["backbone"],
                    "ratio": ratio(r["method"], r["backbone"])}
            comps = components(preset, args.override)
            if comps and (args.breakdown == "always" or (args.breakdown == "auto" and case["ratio"] > args.limit)):
                # the method against itself with each component off, interleaved in one process
                rb = run(preset, size, batch, [pair[0]] + [{"name": n, "kind": "method", "overrides": o} for n, o in comps])
                case["breakdown"] = {n: {"share": 1 - 1 / ratio(rb["method"], rb[n]),
                                         "ms": 1000 * (1 - 1 / ratio(rb["method"], rb[n])) * rb["method"]["step_s"],
                                         "gflop": (rb["method"]["flops"] - rb[n]["flops"]) / 1e9 if rb[n]["flops"] else None,
                                         "ratio_without": ratio(rb[n], rb["method"]) * case["ratio"]}
                                     for n, _ in comps}
            print(f"{preset}: method {1000 * r['method']['step_s']:.0f} ms, backbone {1000 * r['backbone']['step_s']:.0f} ms, "
                  f"ratio {case['ratio']:.2f}", file=sys.stderr, flush=True)
            out_cases.append(case)
    result = {"command": command, "machine": machine(args.device), "cpu_share": share.note(), "shared": share.shared,
              "peak_flops": peak, "peak_kind": f"{str(peak_dtype).replace('torch.', '')} {'8192' if dev.type == 'cuda' else '2048'}^2 matmul",
              "limit": args.limit, "cases": out_cases}
    result["markdown"] = markdown(result)
    print(result["markdown"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.write:
        titles = {"gpu": "GPU", "train": "Training step", "recipes-cpu": "Paper recipes on CPU, reduced size"}
        key = args.section or ("gpu" if dev.type == "cuda" else "train")
        write_section(key, titles.get(key, key), result["markdown"])
    return result


if __name__ == "__main__":
    main()
