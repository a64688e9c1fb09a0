"""Which part of TKP-PCL moves its gradient under bf16 autocast or torch.compile (a GPU diagnostic).

tests/test_gpu.py asks the bf16 step's gradient to point within cosine 0.99 of the fp32 one and the compiled
step's within 0.999 of eager. On the first H200 run (benchmarks/RESULTS.md, "GPU suite") TKP-PCL missed both
(0.981, 0.972) while every other preset passed. This script tells a tolerance problem from a bug: the same
comparison with one component of the recipe off at a time, the fp32-vs-fp32 repeat (the floor that
nondeterministic kernels set), and the cosine per parameter group (backbone, HV-BiLSTM, classifier, PCE head).

    python benchmarks/gpu_numerics.py --out numerics.json             # on the GPU machine
    WSSS_GPU_TESTS_ON_CPU=1 python benchmarks/gpu_numerics.py --tiny  # the CPU dry run (toy ViT, eager)

Reuses the test module's helpers (build, batch, step_grads, cosine), so it measures exactly what the tests do.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from tests.test_gpu import DEV, _epoch, _Losses, batch, build, cosine  # noqa: E402

PRESET = "voc/tkp_pcl_vit_b16"
SMALL = ["model.backbone.name=test_vit", "model.backbone.img_size=64"]
# one component off at a time (ET is off throughout: its random views would differ between the two sides)
VARIANTS = {
    "recipe (ET off)": [],
    "PCE off": ["method.pce.weight=0"],
    "PCE on every patch": ["method.pce.confidence=0"],  # random weights: few patches pass the recipe's 0.6
    "HV-BiLSTM off": ["method.hv_bilstm=false"],
    "top-K -> max pooling": ["method.pooling=max", "method.k=1"],
    "PCE + HV-BiLSTM off": ["method.pce.weight=0", "method.hv_bilstm=false"],
    # k = 1.0 (a fraction: every patch) is mean pooling: no selection that a rounding difference can flip
    "mean pooling": ["method.k=1.0"],
    "mean pooling, PCE + HV-BiLSTM off": ["method.k=1.0", "method.pce.weight=0", "method.hv_bilstm=false"],
}


def grads_by_group(method, x, y, epoch, amp=None, fwd=None) -> tuple[float, dict[str, torch.Tensor]]:
    method.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autocast(DEV.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = (method.forward_losses if fwd is None else fwd)(x, y, epoch)
    out["loss"].backward()
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in method.named_parameters():
        if p.requires_grad and p.grad is not None:
            groups.setdefault(_group(name), []).append(p.grad.detach().flatten().double())
    return float(out["loss"].detach().float()), {k: torch.cat(v) for k, v in groups.items()}


def _group(name: str) -> str:
    for prefix, label in (("backbone.", "backbone"), ("bilstm.", "hv_bilstm"), ("pce_projection.", "pce_head"),
                          ("classifier.", "classifier")):
        if name.startswith(prefix):
            return label
    return name.split(".")[0]


def compare(a: tuple, b: tuple) -> dict:
    (la, ga), (lb, gb) = a, b
    full_a = torch.cat([ga[k] for k in sorted(ga)])
    full_b = torch.cat([gb[k] for k in sorted(gb)])
    return {"loss_rel": abs(la - lb) / (abs(lb) + 1e-12), "cosine": cosine(full_a, full_b),
            "groups": {k: {"cosine": cosine(ga[k], gb[k]), "norm_share": float(gb[k].norm() / full_b.norm())}
                       for k in sorted(gb) if k in ga}}


def run(mode: str, tiny: bool) -> list[dict]:
    rows = []
    for variant, extra in VARIANTS.items():
        base = ["method.et.weight=0", *extra]
        small = SMALL if (mode == "compile" or tiny) else []
        method, cfg = build(PRESET, [*small, *base])
        state = copy.deepcopy(method.state_dict())
        size = 64 if (mode == "compile" or tiny) else 128
        x, y = batch(method, size)
        ep = _epoch(cfg)
        t0 = time.perf_counter()
        ref = grads_by_group(method, x, y, ep)
        method.load_state_dict(state)
        repeat = grads_by_group(method, x, y, ep)
        method.load_state_dict(state)
        if mode == "bf16":
            got = grads_by_group(method, x, y, ep, amp=torch.bfloat16)
        else:
            backend = "eager" if DEV.type == "cpu" else "inductor"
            got = grads_by_group(method, x, y, ep, fwd=torch.compile(_Losses(method), backend=backend))
        row = {"mode": mode, "variant": variant, "size": size, "seconds": round(time.perf_counter() - t0, 1),
               "fp32_repeat": compare(repeat, ref), "vs_fp32": compare(got, ref)}
        print(f"{mode:8s} {variant:34s} repeat cos {row['fp32_repeat']['cosine']:.5f}  "
              f"{mode} cos {row['vs_fp32']['cosine']:.5f}  loss rel {row['vs_fp32']['loss_rel']:.2e}  "
              + "  ".join(f"{k} {v['cosine']:.4f} ({v['norm_share']:.0%})"
                          for k, v in row["vs_fp32"]["groups"].items()), flush=True)
        rows.append(row)
        del method
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--modes", default="bf16,compile", help="bf16, compile or both")
    ap.add_argument("--tiny", action="store_true", help="toy ViT for every mode (the CPU dry run)")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as the tests
    rows = []
    for mode in filter(None, args.modes.split(",")):
        rows += run(mode, args.tiny)
        if args.out:
            args.out.write_text(json.dumps({"device": str(DEV), "torch": torch.__version__, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
