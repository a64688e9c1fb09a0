"""The GPU suite (issue 20): every GPU figure of the toolkit in one run of a few minutes, written as it goes.

    bash benchmarks/gpu_suite.sh --out gpu-results          # on the GPU machine (installs carried wheels first)
    python benchmarks/gpu_suite.py --out gpu-results         # the same without the install step
    python benchmarks/gpu_suite.py --device cpu --tiny --out /tmp/dry   # CPU dry run (tests/test_gpu_suite.py)
    python benchmarks/gpu_suite.py --out gpu-results --write   # ... and its tables into RESULTS.md ("GPU suite")

Parts, in order (each its own time cap; `--parts a,b` runs a subset, the rest are recorded as skipped):

  env                 device name, capability, memory, torch / CUDA / cuDNN / timm versions, optional packages
  tests_gpu           pytest -m gpu tests/test_gpu.py (bf16 vs fp32 steps, channels_last, torch.compile, bf16
                      EMA teacher, torch CRF on CUDA vs CPU), outcome per test
  matmul              bf16 n x n matmul FLOP/s of this device, this run: the MFU denominator
  train_*             one training step (forward_losses + backward + optimizer + EMA + reading the loss) of
                      voc/tkp_pcl_vit_b16, voc/vit_pcm_vit_b16 (ViT-B/16, 384 px, batch 64), voc/usage_deit_s
                      (224 px, batch 64), voc/usage_resnet38d (448 px, batch 8; also channels_last), each next to
                      its bare backbone's forward + backward (same trainable blocks): ms/step, img/s, FLOP/step
                      (torch.utils.flop_counter, benchmarks/bench_train.py's counting), TFLOP/s, MFU, peak memory
  breakdown_tkp_pcl   TKP-PCL with each component off (ET, PCE, HV-BiLSTM, top-K -> max) and torch.profiler's
                      top operators: what stands between the method and its backbone
  loader              the trainer's data pipeline (TrainTransform at 384 px, loader workers) in img/s
  pseudo_label        seeds (`engine.inference.seed_probs`) at each preset's inference size, scales and flips
                      (960 px for ViT-PCM; 375 px x 0.5/1/1.5/2 + flips for USAGE-ResNet38d), fp32 as
                      `wsss pseudo-label` runs and under bf16 autocast: img/s, peak memory
  deeplab             stage 2: voc/deeplab_v2_resnet101 training step (321 px, batch 10) vs its backbone
  crf                 the dense CRF's torch backend on the device at VOC size (375 x 500): img/s one image at a
                      time and batched, peak memory, label agreement with the CPU
  compile_*           the train_* cases under torch.compile (first step = compile time, reported apart),
                      method and backbone; FLOPs from the eager count
  tests_gpu_other     the other gpu-marked tests (pytest -m gpu tests/, full-size preset smoke runs)

Robust to a slow part and to a kill: each part runs in a forked child in its own process group, killed at its
cap (min(cap, budget left)); every figure is appended to OUT/parts/<part>.rows.jsonl the moment it is
measured, and after each part OUT/parts/<part>.json, OUT/results.jsonl (one line a part), OUT/results.json
and OUT/summary.md (the Markdown tables) are rewritten. A part that starts with less than its minimum time
left is recorded as skipped with the reason; so is every part that cannot run here (e.g. tests_gpu_other in
--tiny mode). Every figure row carries device name, torch version, batch, resolution and precision.

--tiny: the same code at toy sizes (64 px, batch 2, 1 timed step, one image, torch.compile with the `eager`
backend) so the dry run checks the plumbing on a CPU in seconds; its figures mean nothing.
Models are built with random weights (model.backbone.pretrained=false): the speed does not depend on them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
if (ROOT / "src" / "wsss").is_dir():  # the tree's own code, installed or not
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402  (imported once in the parent: the forked parts start without import cost)

TARGET_MFU = 0.40  # issue 20: ViT-B/16 384 px TKP-PCL training at >= 40% bf16 MFU
TARGET_RATIO = 1.3  # ... and the method step within 1.3x of the bare backbone's forward + backward

# (part name, preset, GPU size, GPU batch, extra variants)
TRAIN_CASES = {
    "tkp_pcl": ("voc/tkp_pcl_vit_b16", 384, 64, ()),
    "vit_pcm": ("voc/vit_pcm_vit_b16", 384, 64, ()),
    "usage_deit_s": ("voc/usage_deit_s", 224, 64, ()),
    "usage_resnet38d": ("voc/usage_resnet38d", 448, 8, ("channels_last",)),
}
PSEUDO_PRESETS = ("voc/vit_pcm_vit_b16", "voc/usage_deit_s", "voc/usage_resnet38d")
# --tiny builds each preset with a toy backbone of the same family (timm's test models: a 64-d ViT, a small
# ResNet), random weights: the method, its losses, optimiser and inference settings are the preset's own.
_TINY_VIT = ["model.backbone.name=test_vit", "model.backbone.img_size=64"]
_TINY_CNN = ["model.backbone.name=test_resnet", "model.backbone.dropout=[]"]
TINY_OVERRIDES = {"voc/tkp_pcl_vit_b16": _TINY_VIT, "voc/vit_pcm_vit_b16": _TINY_VIT, "voc/usage_deit_s": _TINY_VIT,
                  "voc/usage_resnet38d": _TINY_CNN, "voc/deeplab_v2_resnet101": _TINY_CNN}
VOC_IMAGE = (375, 500)  # (H, W) of a typical VOC image: pseudo masks are written at the image's own size


# ---------------------------------------------------------------------------------------------- context


class Ctx(SimpleNamespace):
    """What every part sees: args, the device, the output folder, the matmul peak once measured."""

    @property
    def cuda(self) -> bool:
        return self.dev.type == "cuda"


def _device_name(ctx: Ctx) -> str:
    if ctx.cuda:
        return torch.cuda.get_device_name(ctx.dev)
    from common import machine

    return "CPU: " + machine("cpu").split(",")[0]


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


class Emitter:
    """Appends one figure (a dict) to the part's rows file the moment it is measured, with the fields every
    figure carries (device name, torch version, part)."""

    def __init__(self, ctx: Ctx, part: str):
        self.ctx, self.part = ctx, part
        self.path = ctx.out / "parts" / f"{part}.rows.jsonl"
        self._common = None

    def __call__(self, **row) -> dict:
        if self._common is None:
            self._common = {"device": str(self.ctx.dev), "device_name": _device_name(self.ctx),
                            "torch": torch.__version__}
        row = {"part": self.part, **self._common, **row}
        for key in ("batch", "resolution", "precision"):
            row.setdefault(key, None)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
        print(f"  [{self.part}] " + ", ".join(f"{k}={_short(v)}" for k, v in row.items()
                                              if k in ("table", "case", "variant", "img_s", "step_ms", "mfu",
                                                       "peak_mem_mb", "outcome")), flush=True)
        return row


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def _reset_mem(ctx: Ctx):
    """Start a peak-memory window: CUDA's allocator peak, else the sampled process RSS."""
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.dev)
        return None
    from common import RSSPeak

    return RSSPeak().start()


def _peak_mem(ctx: Ctx, rss) -> tuple[float, str]:
    if ctx.cuda:
        return torch.cuda.max_memory_allocated(ctx.dev) / 2**20, "cuda max_memory_allocated"
    rss.stop()
    return rss.main_mb, "peak RSS (process, interpreter included)"


def _timed(ctx: Ctx, fn, steps: int) -> list[float]:
    from common import timings

    return timings(ctx.dev, fn, steps)


# ------------------------------------------------------------------------------------------------ parts


def part_env(ctx: Ctx, emit: Emitter) -> dict:
    import importlib.metadata as md
    import importlib.util
    import platform

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "device": str(ctx.dev), "device_name": _device_name(ctx),
            "cpu_count": os.cpu_count(), "tiny": ctx.tiny}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.dev)
        info.update(capability=f"{p.major}.{p.minor}", total_memory_gib=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32)
    for pkg in ("timm", "torchvision", "numpy", "triton", "mlxtend", "deep-sort-realtime", "pycocotools",
                "pydensecrf2", "scikit-image"):
        try:
            info[f"pkg:{pkg}"] = md.version(pkg)
        except md.PackageNotFoundError:
            info[f"pkg:{pkg}"] = None
    info["pydensecrf_importable"] = importlib.util.find_spec("pydensecrf") is not None
    install = ctx.out / "install.txt"
    if install.is_file():
        info["install_log"] = install.read_text()[-2000:]
    emit(table="env", case="environment", **{k: v for k, v in info.items() if k != "install_log"})
    return info


def _pytest(ctx: Ctx, emit: Emitter, name: str, args: list[str]) -> dict:
    import xml.etree.ElementTree as ET

    xml = ctx.out / "parts" / f"{name}.junit.xml"
    log = ctx.out / "parts" / f"{name}.log"
    import importlib.util

    # -v: the log names each test as it ends (it survives a kill at the cap; the JUnit file is written last);
    # --timeout: a hung test fails alone instead of taking the part's cap
    per_test = ["--timeout=80"] if importlib.util.find_spec("pytest_timeout") else []
    cmd = ["-v", "-p", "no:cacheprovider", "-m", "gpu", f"--junitxml={xml}", *per_test, *args]
    # In this (forked, disposable) process: torch and wsss are imported already, no new interpreter to start.
    # Its stdout / stderr go to the log file at the descriptor level, as pytest's own capture expects.
    import pytest

    os.chdir(ROOT)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            rc = int(pytest.main(cmd))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    summary = {"command": "pytest " + " ".join(cmd), "returncode": rc}
    if xml.is_file():
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            summary[key] = int(suite.get(key, 0))
        summary["seconds"] = float(suite.get("time", 0))
        for case in suite.iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    message = (el.get("message") or el.text or "")[:300]
            emit(table="test", case=f"{case.get('classname', '')}::{case.get('name')}", outcome=outcome,
                 seconds=float(case.get("time", 0)), message=message)
    summary["log_tail"] = log.read_text()[-1500:] if log.is_file() else ""
    if rc not in (0, 5):  # 1: tests failed; 2-4: interrupted, internal or usage error (no tests ran)
        summary["failed"] = True
    return summary


def part_tests_gpu(ctx: Ctx, emit: Emitter) -> dict:
    return _pytest(ctx, emit, "tests_gpu", ["tests/test_gpu.py"])


def part_tests_gpu_other(ctx: Ctx, emit: Emitter) -> dict:
    return _pytest(ctx, emit, "tests_gpu_other", ["tests", "--ignore=tests/test_gpu.py",
                                                  "--ignore=tests/test_gpu_suite.py"])


def part_matmul(ctx: Ctx, emit: Emitter) -> dict:
    from common import matmul_peak

    dtype = torch.bfloat16 if ctx.cuda else torch.float32  # CPU: bf16 is emulated on most CPUs
    n = 256 if ctx.tiny else (8192 if ctx.cuda else 2048)
    flops = matmul_peak(ctx.dev, dtype, n, seconds=0.2 if ctx.tiny else 3.0)
    prec = str(dtype).replace("torch.", "")
    emit(table="matmul", case=f"{n}x{n} @ {n}x{n}", precision=prec, resolution=n, batch=1,
         tflops=flops / 1e12)
    return {"peak_flops": flops, "peak_kind": f"{prec} {n}^2 matmul (best of {0.2 if ctx.tiny else 3.0} s)"}


# ------------------------------------------------------------------------------------ training steps


class _Losses(torch.nn.Module):
    """forward_losses as a module's forward (what torch.compile wraps, as the trainer compiles it)."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, images, targets, epoch: int):
        return self.method.forward_losses(images, targets, epoch)["loss"]


def _num_classes(preset: str) -> int:
    return 81 if preset.startswith("coco/") else 21


def build_step(ctx: Ctx, preset: str, kind: str, size: int, batch: int, overrides=(), compile_=False,
               channels_last: bool | None = None, amp: str = ""):
    """(step(), info) of one variant in the trainer's steady state: the recipe's trainable blocks
    (after the frozen warm-up), BatchNorm frozen where the trainer freezes it, the last epoch (every loss
    warm-up over), the recipe's AMP (auto: bf16 on CUDA), random inputs, random weights."""
    from common import steady_state_model

    from wsss.config import load_config

    tiny = TINY_OVERRIDES.get(preset, ["model.backbone.img_size=64"]) if ctx.tiny else []
    cfg = load_config(preset, ["model.backbone.pretrained=false", "model.backbone.weights=", *tiny, *overrides])
    t = cfg.train
    cl = t.channels_last if channels_last is None else channels_last
    nc = _num_classes(preset)
    model, opt, amp_dtype, trainable = steady_state_model(cfg, kind, nc, ctx.dev, cl, amp)
    target = getattr(model, "target", "label") if kind == "method" else None

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(ctx.dev)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    if target == "mask":
        y = torch.randint(0, nc, (batch, size, size), generator=g)
        y[:, : size // 8] = 255  # some ignored pixels, as padding gives
        y = y.to(ctx.dev)
    else:
        y = (torch.rand(batch, nc - 1, generator=g) < 0.15).float()
        y[torch.arange(batch), torch.randint(0, nc - 1, (batch,), generator=g)] = 1.0
        y = y.to(ctx.dev)
    epoch = max(t.epochs - 1, 0)
    if kind == "method":
        fwd = _Losses(model)
        if compile_:
            fwd = torch.compile(fwd, backend=ctx.compile_backend)

        def loss_fn():
            return fwd(x, y, epoch)
    else:
        fwd = torch.compile(model, backend=ctx.compile_backend) if compile_ else model

        def loss_fn():
            return fwd(x).float().mean()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(ctx.dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn()
        loss.backward()
        opt.step()
        if kind == "method":
            model.after_step()
        return float(loss.detach())  # the trainer reads the loss every step (a sync on GPU)

    info = {"preset": preset, "kind": kind, "backbone": cfg.model.backbone.name, "batch": batch,
            "resolution": size, "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "channels_last": bool(cl), "compile": (ctx.compile_backend if compile_ else False),
            "trainable_params": sum(p.numel() for p in trainable), "overrides": list(overrides)}
    return step, info, model


def _counted_flops(step) -> int:
    from bench_train import count_flops

    return count_flops(step)


def measure_variant(ctx: Ctx, emit: Emitter, preset: str, kind: str, size: int, batch: int, variant: str,
                    table: str = "train", overrides=(), compile_=False, channels_last=None, flops: int | None = -1,
                    extra: dict | None = None, steps: int = 0) -> dict:
    """Build one variant, time it (first step apart: warm-up or compilation), count its FLOPs (-1: count
    here; None: do not), record peak memory; emit the row."""
    rss = _reset_mem(ctx)
    t0 = time.perf_counter()
    step, info, model = build_step(ctx, preset, kind, size, batch, overrides, compile_, channels_last)
    build_s = time.perf_counter() - t0
    first = _timed(ctx, step, 1)[0]
    if ctx.warmup > 1:
        _timed(ctx, step, ctx.warmup - 1)
    times = _timed(ctx, step, steps or ctx.steps)
    step_s = statistics.median(times)
    mem, mem_kind = _peak_mem(ctx, rss)
    if flops == -1:
        flops = _counted_flops(step)
    row = {"table": table, "case": preset, "variant": variant, **info, "build_s": build_s, "first_step_s": first,
           "step_s": step_s, "step_s_all": times, "step_ms": 1000 * step_s, "img_s": batch / step_s,
           "flops_per_step": flops, "peak_mem_mb": mem, "mem_kind": mem_kind, **(extra or {})}
    if flops:
        row["tflops"] = flops / step_s / 1e12
        if ctx.peak_flops:
            row["mfu"] = flops / step_s / ctx.peak_flops
    if compile_:
        row.update(_dynamo_stats())
    del step, model
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    return emit(**row)


def _dynamo_stats() -> dict:
    try:
        from torch._dynamo.utils import counters

        return {"dynamo_unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
                "dynamo_graph_breaks": int(sum(counters["graph_break"].values())),
                "dynamo_graph_break_reasons": sorted(counters["graph_break"])[:8]}
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        return {"dynamo_stats_error": repr(e)}


def _size_batch(ctx: Ctx, size: int, batch: int) -> tuple[int, int]:
    return (64, 2) if ctx.tiny else (size, batch)


def train_part(name: str, compile_: bool = False):
    preset, size, batch, extras = TRAIN_CASES[name]

    def run(ctx: Ctx, emit: Emitter) -> dict:
        s, b = _size_batch(ctx, size, batch)
        known = {"method": -1, "backbone": -1}  # -1: count here
        if compile_:  # FLOPs of the same step, counted on the eager part's run when it has one; never on
            known = {"method": None, "backbone": None}  # the compiled module (FlopCounterMode's hooks + dynamo)
            rows = ctx.out / "parts" / f"train_{name}.rows.jsonl"
            if rows.is_file():
                for line in rows.read_text().splitlines():
                    r = json.loads(line)
                    if r.get("table") == "train" and r.get("flops_per_step"):
                        known[r["kind"]] = r["flops_per_step"]
        tag = " (compiled)" if compile_ else ""
        m = measure_variant(ctx, emit, preset, "method", s, b, "method" + tag, compile_=compile_,
                            flops=known["method"])
        bb = measure_variant(ctx, emit, preset, "backbone", s, b, "bare backbone" + tag, compile_=compile_,
                             flops=known["backbone"])
        out = {"ratio": m["step_s"] / bb["step_s"]}
        if "channels_last" in extras and not compile_:
            measure_variant(ctx, emit, preset, "method", s, b, "method, channels_last", channels_last=True,
                            flops=m["flops_per_step"])
        return out

    return run


def part_breakdown_tkp_pcl(ctx: Ctx, emit: Emitter) -> dict:
    """TKP-PCL against itself with one component off at a time, then torch.profiler's top operators."""
    preset, size, batch, _ = TRAIN_CASES["tkp_pcl"]
    s, b = _size_batch(ctx, size, batch)
    offs = [("ET off", ["method.et.weight=0"]), ("PCE off", ["method.pce.weight=0"]),
            ("HV-BiLSTM off", ["method.hv_bilstm=false"]), ("top-K -> max pooling", ["method.pooling=max"]),
            ("ET + PCE off", ["method.et.weight=0", "method.pce.weight=0"])]
    if ctx.tiny:
        offs = offs[:1]
    n = max(1, ctx.steps // 2)  # six variants in one cap: half the timed steps
    full = measure_variant(ctx, emit, preset, "method", s, b, "method (all on)", table="breakdown", flops=None,
                           steps=n)
    for label, ov in offs:
        measure_variant(ctx, emit, preset, "method", s, b, label, table="breakdown", overrides=ov, flops=None,
                        steps=n)
    # torch.profiler over two steps of the full method: where the time goes, by operator
    from torch.profiler import ProfilerActivity, profile

    step, info, model = build_step(ctx, preset, "method", s, b)
    _timed(ctx, step, ctx.warmup)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with profile(activities=acts) as prof:
        _timed(ctx, step, 2)
    key = "self_device_time_total" if ctx.cuda else "self_cpu_time_total"
    avgs = prof.key_averages()
    total = sum(getattr(e, key, 0) for e in avgs) or 1
    top = sorted(avgs, key=lambda e: getattr(e, key, 0), reverse=True)[:12]
    for e in top:
        emit(table="profile", case=preset, variant=e.key, batch=b, resolution=s, precision=info["precision"],
             self_ms_per_step=getattr(e, key, 0) / 1000 / 2, share=getattr(e, key, 0) / total, calls=e.count)
    return {"full_step_ms": full["step_ms"], "profile_key": key}


def part_loader(ctx: Ctx, emit: Emitter) -> dict:
    """The trainer's input pipeline alone: VOC-size JPEGs through TrainTransform (ViT-PCM recipe, 384 px)
    and a DataLoader with the workers the trainer would use; img/s to compare with the training step's."""
    import tempfile

    import numpy as np
    from PIL import Image

    from wsss.config import load_config
    from wsss.data.base import SegmentationDataset
    from wsss.data.transforms import TrainTransform, TransformedDataset
    from wsss.engine.inference import resolve_workers

    preset, size, batch, _ = TRAIN_CASES["tkp_pcl"]
    s, b = _size_batch(ctx, size, batch)
    cfg = load_config(preset, ["model.backbone.pretrained=false", f"data.crop_size={s}"])  # the data part only
    n_files = 8 if ctx.tiny else 64
    # Many batches an epoch (the files cycled): with one batch an epoch, as in the first GPU run, a single
    # worker builds it and the worker count cannot show (25-27 img/s at 0, 4 and 8 workers).
    n_img = n_files * (2 if ctx.tiny else 8)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_suite_loader_"))
    rng = np.random.default_rng(0)
    for i in range(n_files):
        Image.fromarray(rng.integers(0, 255, (*VOC_IMAGE, 3), dtype=np.uint8)).save(tmp / f"{i:04d}.jpg", quality=90)

    class Files(SegmentationDataset):
        root, split, has_masks = str(tmp), "train", False
        class_names = [f"c{i}" for i in range(21)]
        ids = [f"{i % n_files:04d}" for i in range(n_img)]

        def image_path(self, i):
            return str(tmp / f"{self.ids[i]}.jpg")

        def load_mask(self, i):
            return None

        def tags(self, i):
            return [1 + i % 20]

    ds = TransformedDataset(Files(), TrainTransform(cfg.data), seed=0)
    trainer_workers = resolve_workers(cfg.data.num_workers)
    for w in [0] if ctx.tiny else sorted({0, trainer_workers, 8}):
        loader = torch.utils.data.DataLoader(ds, batch_size=b, num_workers=w, shuffle=False,
                                             pin_memory=ctx.cuda, drop_last=True)
        t0 = time.perf_counter()
        seen = 0
        for batch_ in loader:
            seen += batch_["image"].shape[0]
        secs = time.perf_counter() - t0
        emit(table="loader", case=preset, variant=f"{w} workers", batch=b, resolution=s, precision="-",
             images=seen, seconds=secs, img_s=seen / secs, workers=w, trainer_default=w == trainer_workers)
    return {}


def part_pseudo_label(ctx: Ctx, emit: Emitter) -> dict:
    """Seed maps as `wsss pseudo-label` computes them (engine.inference.seed_probs: every scale and flip of
    the preset, maps upsampled to the image's own size, background, max-normalisation), one image at a
    time at the preset's inference size; random weights, random image of VOC's 4:3 shape."""
    import random

    from wsss.config import load_config
    from wsss.engine.inference import seed_probs
    from wsss.methods import create_method

    n_images = 1 if ctx.tiny else 6
    for preset in PSEUDO_PRESETS:
        base = ["model.backbone.pretrained=false", "model.backbone.weights="]
        cfg = load_config(preset, base)
        native = cfg.infer.size < 0  # -1: the image as it is (the USAGE presets), at every scale
        tiny = [*TINY_OVERRIDES.get(preset, []), *([] if native else ["infer.size=64"])] if ctx.tiny else []
        cfg = load_config(preset, [*base, *tiny])
        out_size = (48, 64) if ctx.tiny else VOC_IMAGE
        short = cfg.infer.size or cfg.data.crop_size
        h, w = out_size if native else (short, round(short * VOC_IMAGE[1] / VOC_IMAGE[0]))
        precisions = ["fp32", "bf16"] if ctx.cuda else ["fp32"]
        for prec in precisions:
            rss = _reset_mem(ctx)
            method = create_method(cfg, _num_classes(preset)).to(ctx.dev).eval()
            g = torch.Generator().manual_seed(0)
            images = [torch.randn(3, h, w, generator=g).to(ctx.dev) for _ in range(2)]
            rnd = random.Random(0)

            def one(i, method=method, images=images, rnd=rnd, prec=prec, infer=cfg.infer, out_size=out_size):
                tags = sorted(rnd.sample(range(1, 21), 2))
                with torch.autocast(ctx.dev.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
                    seed_probs(method, images[i % 2], tags, infer, out_size)

            first = _timed(ctx, lambda: one(0), 1)[0]
            times = _timed(ctx, lambda: [one(i) for i in range(n_images)], 1)[0]
            mem, mem_kind = _peak_mem(ctx, rss)
            emit(table="pseudo", case=preset, variant="seed maps" + (" (bf16 autocast)" if prec == "bf16" else ""),
                 batch=1, resolution=f"{h}x{w}", precision=prec, scales=list(cfg.infer.scales),
                 flip=bool(cfg.infer.flip), out_size=list(out_size), images=n_images, first_s=first,
                 img_s=n_images / times, ms_per_img=1000 * times / n_images, peak_mem_mb=mem, mem_kind=mem_kind,
                 note="fp32 is what `wsss pseudo-label` runs" if prec == "fp32" else "autocast: not in the CLI")
            del method, images
    return {}


def part_deeplab(ctx: Ctx, emit: Emitter) -> dict:
    preset = "voc/deeplab_v2_resnet101"
    s, b = _size_batch(ctx, 321, 10)
    m = measure_variant(ctx, emit, preset, "method", s, b, "stage 2 (DeepLab-v2)")
    bb = measure_variant(ctx, emit, preset, "backbone", s, b, "bare backbone")
    measure_variant(ctx, emit, preset, "method", s, b, "stage 2, channels_last", channels_last=True,
                    flops=m["flops_per_step"])
    return {"ratio": m["step_s"] / bb["step_s"]}


def part_crf(ctx: Ctx, emit: Emitter) -> dict:
    """The torch dense CRF (`postprocess.crf.refine`, backend torch) on the device, VOC-size images."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from wsss.config import CRFConfig
    from wsss.postprocess.crf import refine, resolve
    from wsss.postprocess.crf_torch import refine_batch

    h, w = (48, 64) if ctx.tiny else VOC_IMAGE
    k = 3  # background + 2 tags: a typical VOC image's kept classes
    n = 1 if ctx.tiny else 10
    rng = np.random.default_rng(0)
    images = [np.clip(gaussian_filter(rng.random((h, w, 3)) * 255, (3, 3, 0)), 0, 255).astype(np.uint8)
              for _ in range(2)]
    probs = []
    for _ in range(2):
        p = gaussian_filter(rng.random((k, h, w)), (0, 8, 8)).astype(np.float32) ** 4
        probs.append(p / p.sum(0, keepdims=True))
    dev = str(ctx.dev)
    for preset in ("vit_pcm",) if ctx.tiny else ("psa", "vit_pcm"):
        cfg = resolve(CRFConfig(preset=preset, backend="torch"))
        rss = _reset_mem(ctx)
        first = _timed(ctx, lambda cfg=cfg: refine(images[0], probs[0], cfg, device=dev), 1)[0]
        secs = _timed(ctx, lambda cfg=cfg: [refine(images[i % 2], probs[i % 2], cfg, device=dev)
                                            for i in range(n)], 1)[0]
        mem, mem_kind = _peak_mem(ctx, rss)
        agree = None
        if ctx.cuda:  # the same image on the CPU
            on_dev = refine(images[0], probs[0], cfg, device=dev)
            on_cpu = refine(images[0], probs[0], cfg, device="cpu")
            agree = float((on_dev == on_cpu).mean())
        emit(table="crf", case=f"CRF preset {preset}", variant="one image a call", batch=1, resolution=f"{h}x{w}",
             precision="fp32", k=k, iterations=cfg.iterations, first_s=first, img_s=n / secs,
             ms_per_img=1000 * secs / n, peak_mem_mb=mem, mem_kind=mem_kind, agreement_with_cpu=agree)
        bsz = 2 if ctx.tiny else 8
        imgs = torch.from_numpy(np.stack([images[i % 2] for i in range(bsz)])).to(ctx.dev)
        prb = torch.from_numpy(np.stack([probs[i % 2] for i in range(bsz)])).to(ctx.dev)
        rss = _reset_mem(ctx)
        refine_batch(imgs, prb, cfg)
        secs = _timed(ctx, lambda cfg=cfg, imgs=imgs, prb=prb: refine_batch(imgs, prb, cfg), 1 if ctx.tiny else 3)
        mem, mem_kind = _peak_mem(ctx, rss)
        emit(table="crf", case=f"CRF preset {preset}", variant=f"refine_batch x{bsz}", batch=bsz,
             resolution=f"{h}x{w}", precision="fp32", k=k, iterations=cfg.iterations,
             img_s=bsz / statistics.median(secs), ms_per_img=1000 * statistics.median(secs) / bsz, peak_mem_mb=mem,
             mem_kind=mem_kind)
    return {}


# --------------------------------------------------------------------------------------- registry


class Part(SimpleNamespace):
    """name, fn, cap (s, GPU), tiny_cap (s, --tiny), min_s (do not start with less left), skip(ctx) -> reason"""


PARTS = [
    Part(name="env", fn=part_env, cap=45, tiny_cap=30, min_s=5),
    Part(name="tests_gpu", fn=part_tests_gpu, cap=150, tiny_cap=60, min_s=20),
    Part(name="matmul", fn=part_matmul, cap=25, tiny_cap=20, min_s=8),
    *[Part(name=f"train_{n}", fn=train_part(n), cap=c, tiny_cap=60, min_s=15)
      for n, c in (("tkp_pcl", 75), ("vit_pcm", 60), ("usage_deit_s", 45), ("usage_resnet38d", 60))],
    Part(name="breakdown_tkp_pcl", fn=part_breakdown_tkp_pcl, cap=70, tiny_cap=60, min_s=20),
    Part(name="loader", fn=part_loader, cap=30, tiny_cap=30, min_s=10),
    Part(name="pseudo_label", fn=part_pseudo_label, cap=60, tiny_cap=60, min_s=15),
    Part(name="deeplab", fn=part_deeplab, cap=45, tiny_cap=60, min_s=15),
    Part(name="crf", fn=part_crf, cap=30, tiny_cap=30, min_s=10),
    *[Part(name=f"compile_{n}", fn=train_part(n, compile_=True), cap=c, tiny_cap=60, min_s=30,
           tiny_skip="--tiny: torch.compile traces for about a minute on a CPU; dry-run it alone with "
                     f"`--tiny --parts compile_{n}` (tests/test_gpu_suite.py, marked slow)")
      for n, c in (("tkp_pcl", 120), ("vit_pcm", 90), ("usage_deit_s", 75), ("usage_resnet38d", 75))],
    Part(name="tests_gpu_other", fn=part_tests_gpu_other, cap=150, tiny_cap=60, min_s=30,
         tiny_skip="--tiny: the full-size preset smoke tests need a GPU (collecting the whole suite is not dry-run)"),
]
PART_NAMES = [p.name for p in PARTS]


# ------------------------------------------------------------------------------------------ running


_CHILD: dict = {"pid": None}


def run_part(ctx: Ctx, part: Part, cap: float) -> dict:
    """The part in a forked child, own process group, killed at `cap` seconds; its rows survive a kill."""
    parts_dir = ctx.out / "parts"
    rows_path, meta_path, err_path = (parts_dir / f"{part.name}{s}" for s in (".rows.jsonl", ".meta.json", ".error.txt"))
    for p in (rows_path, meta_path, err_path):
        p.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.setpgid(0, 0)
            meta = part.fn(ctx, Emitter(ctx, part.name)) or {}
            _atomic_json(meta_path, meta)
            code = 0
        except BaseException:  # noqa: BLE001 - everything goes into the record
            err_path.write_text(traceback.format_exc())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _CHILD["pid"] = pid
    status = None
    while True:
        done, wstatus = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(wstatus)
            status = "ok" if code == 0 else "error"
            break
        if time.perf_counter() - t0 > cap:
            _kill(pid)
            status = "timeout"
            break
        time.sleep(0.05)
    _CHILD["pid"] = None
    secs = time.perf_counter() - t0
    rows = [json.loads(ln) for ln in rows_path.read_text().splitlines() if ln.strip()] if rows_path.is_file() else []
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    rec = {"part": part.name, "status": status, "seconds": round(secs, 2), "cap_s": round(cap, 1), "rows": rows,
           "meta": meta}
    if status == "timeout":
        rec["reason"] = f"killed at its cap of {cap:.0f} s ({len(rows)} figures measured before)"
    elif status == "error":
        rec["reason"] = (err_path.read_text().strip().splitlines() or ["exit without a traceback"])[-1][:300] \
            if err_path.is_file() else f"exit code {code}"
        rec["traceback"] = err_path.read_text()[-4000:] if err_path.is_file() else ""
    elif meta.get("failed"):
        rec["status"] = "failed"
        rec["reason"] = (f"pytest exit {meta.get('returncode')}: {meta.get('failures', 0)} failed, "
                         f"{meta.get('errors', 0)} errors of {meta.get('tests', 0)} tests (see parts/{part.name}.log)")
    return rec


def _kill(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.perf_counter() + 2
        while time.perf_counter() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.05)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _on_signal(signum, frame):
    if _CHILD["pid"]:
        _kill(_CHILD["pid"])
    raise SystemExit(128 + signum)


# ------------------------------------------------------------------------------------------ reports


def _f(v, nd=1, scale=1.0):
    return "-" if v is None else f"{v * scale:.{nd}f}"


def markdown(meta: dict, records: list[dict]) -> str:
    from common import table

    rows = [r for rec in records for r in rec.get("rows", [])]
    by = lambda t: [r for r in rows if r.get("table") == t]  # noqa: E731
    env = next(iter(by("env")), {})
    peak = meta.get("peak_flops")
    out = ["# GPU suite", "",
           f"Command: `{meta['command']}`  ",
           f"Device: {env.get('device_name', meta.get('device'))}"
           + (f" (capability {env['capability']}, {env['total_memory_gib']} GiB)" if env.get("capability") else "")
           + f", torch {env.get('torch', torch.__version__)}"
           + (f", CUDA {env['cuda_build']}, cuDNN {env.get('cudnn')}" if env.get("capability") else "") + ".  ",
           f"Started {meta['started']}, {meta.get('elapsed_s', 0):.0f} s of a {meta['budget_s']:.0f} s budget"
           + (" (--tiny: toy sizes, the figures mean nothing)" if meta.get("tiny") else "") + ".  ",
           "MFU denominator: " + (f"{meta.get('peak_kind')} measured in this run, {peak / 1e12:.1f} TFLOP/s."
                                  if peak else "not measured (matmul part missing)."), ""]
    out += ["## Parts", "", table(["part", "status", "seconds", "cap s", "figures", "note"],
                                  [[rec["part"], rec["status"], _f(rec.get("seconds")), _f(rec.get("cap_s"), 0),
                                    len(rec.get("rows", [])), (rec.get("reason") or "").replace("|", "/")]
                                   for rec in records], "llrrrl"), ""]
    train = by("train")
    if train:
        base = {(r["case"], bool(r.get("compile"))): r for r in train if r["kind"] == "backbone"}
        trs = []
        for r in train:
            b = base.get((r["case"], bool(r.get("compile"))))
            ratio = r["step_s"] / b["step_s"] if b and r["kind"] == "method" else None
            trs.append([f"`{r['case']}`", r["variant"], f"{r['batch']} x {r['resolution']}", r["precision"],
                        _f(r["step_ms"], 1), _f(r["img_s"]), _f(r.get("flops_per_step"), 1, 1e-9),
                        _f(r.get("tflops"), 2), _f(r.get("mfu"), 1, 100), _f(r.get("peak_mem_mb"), 0),
                        _f(ratio, 2) + ("x" if ratio else ""),
                        _f(r.get("first_step_s"), 1) if r.get("compile") else ""])
        out += ["## Training step", "",
                "Steady state of the recipe (its trainable blocks, last epoch), random inputs, median of the timed "
                "steps; FLOPs counted by torch.utils.flop_counter on the eager step; peak memory "
                f"{train[0].get('mem_kind', '')}.", "",
                table(["case", "variant", "batch x px", "precision", "ms/step", "img/s", "GFLOP/step", "TFLOP/s",
                       "MFU %", "peak MiB", "vs backbone", "compile s (1st step)"], trs, "llllrrrrrrrr"), ""]
        tkp = [r for r in train if r["case"] == TRAIN_CASES["tkp_pcl"][0] and r["kind"] == "method"
               and not r.get("compile")]
        bb = base.get((TRAIN_CASES["tkp_pcl"][0], False))
        if tkp:
            r = tkp[0]
            mfu_ok = r.get("mfu") is not None and r["mfu"] >= TARGET_MFU
            ratio = r["step_s"] / bb["step_s"] if bb else None
            out += [f"Targets (issue 20), `{r['case']}` eager: MFU {_f(r.get('mfu'), 1, 100)}% "
                    f"({'meets' if mfu_ok else 'below'} {TARGET_MFU:.0%}); method / backbone "
                    f"{_f(ratio, 2)}x ({'within' if ratio and ratio <= TARGET_RATIO else 'over'} {TARGET_RATIO}x).", ""]
    bd = by("breakdown")
    if bd:
        full = next((r for r in bd if r["variant"] == "method (all on)"), None)
        out += ["## TKP-PCL with components off", "",
                table(["variant", "batch x px", "ms/step", "img/s", "saved vs all on", "peak MiB"],
                      [[r["variant"], f"{r['batch']} x {r['resolution']}", _f(r["step_ms"]), _f(r["img_s"]),
                        (_f(100 * (1 - r["step_s"] / full["step_s"]), 0) + "%") if full else "-",
                        _f(r.get("peak_mem_mb"), 0)] for r in bd], "lrrrrr"), ""]
    prof = by("profile")
    if prof:
        out += ["Top operators of the full TKP-PCL step (torch.profiler, self time):", "",
                table(["operator", "ms/step", "share", "calls (2 steps)"],
                      [[f"`{r['variant']}`", _f(r["self_ms_per_step"], 2), _f(r["share"], 0, 100) + "%", r["calls"]]
                       for r in prof], "lrrr"), ""]
    ld = by("loader")
    if ld:
        out += ["## Input pipeline", "", table(["recipe", "workers", "batch x px", "img/s"],
                                               [[f"`{r['case']}`", r["workers"], f"{r['batch']} x {r['resolution']}",
                                                 _f(r["img_s"])] for r in ld], "lrrr"), ""]
    ps = by("pseudo")
    if ps:
        out += ["## Pseudo-label throughput (seed maps)", "",
                table(["preset", "input (h x w)", "scales", "flip", "precision", "img/s", "ms/img", "peak MiB"],
                      [[f"`{r['case']}`", r["resolution"], ",".join(str(s) for s in r["scales"]),
                        "yes" if r["flip"] else "no", r["precision"], _f(r["img_s"], 2), _f(r["ms_per_img"], 0),
                        _f(r.get("peak_mem_mb"), 0)] for r in ps], "llllrrrr"), ""]
    cr = by("crf")
    if cr:
        out += ["## Dense CRF (torch backend)", "",
                table(["CRF", "call", "image", "K", "iterations", "img/s", "ms/img", "peak MiB", "agreement with CPU"],
                      [[r["case"], r["variant"], r["resolution"], r["k"], r["iterations"], _f(r["img_s"], 2),
                        _f(r["ms_per_img"], 1), _f(r.get("peak_mem_mb"), 0),
                        _f(r.get("agreement_with_cpu"), 2, 100) + ("%" if r.get("agreement_with_cpu") is not None
                                                                 else "")] for r in cr], "llllrrrrr"), ""]
    mm = by("matmul")
    if mm:
        out += ["## Matmul peak", "", table(["matmul", "precision", "TFLOP/s"],
                                            [[r["case"], r["precision"], _f(r["tflops"], 1)] for r in mm], "llr"), ""]
    tests = by("test")
    if tests:
        out += ["## GPU tests", "", table(["test", "outcome", "s", "message"],
                                          [[f"`{r['case']}`", r["outcome"], _f(r["seconds"], 1),
                                            (r.get("message") or "").replace("|", "/").replace("\n", " ")[:120]]
                                           for r in tests], "llrl"), ""]
    return "\n".join(out) + "\n"


def write_reports(ctx: Ctx, meta: dict, records: list[dict]) -> None:
    meta = {**meta, "elapsed_s": time.perf_counter() - ctx.t0}
    _atomic_json(ctx.out / "results.json", {"meta": meta, "parts": records})
    md = markdown(meta, records)
    tmp = ctx.out / "summary.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, ctx.out / "summary.md")


def _preimport() -> None:
    """Import what the parts use once, here: each forked part then starts without import time. Nothing here
    touches CUDA (a forked child can initialise it only when the parent has not)."""
    import bench_train  # noqa: F401
    import common  # noqa: F401
    import timm  # noqa: F401

    import wsss.config  # noqa: F401
    import wsss.engine.inference  # noqa: F401
    import wsss.engine.trainer  # noqa: F401
    import wsss.methods  # noqa: F401
    import wsss.models  # noqa: F401
    import wsss.postprocess.crf_torch  # noqa: F401


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="results folder (JSON per part, summary.md)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: the dry run)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: the dry run of the plumbing")
    ap.add_argument("--budget", type=float, default=0, help="seconds for all parts (default 450 GPU, 240 --tiny)")
    ap.add_argument("--parts", default="", help=f"comma-separated subset of: {','.join(PART_NAMES)}")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per variant (default 10 GPU, 1 --tiny)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 3 GPU, 1 --tiny)")
    ap.add_argument("--cap-scale", type=float, default=1.0, help="multiply every part's cap")
    ap.add_argument("--write", action="store_true",
                    help="also put summary.md into the 'GPU suite' section of benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    command = "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    chosen = set(filter(None, args.parts.split(","))) or set(PART_NAMES)
    chosen -= set(filter(None, args.skip.split(",")))
    unknown = chosen - set(PART_NAMES)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PART_NAMES)}")
    out = args.out.resolve()
    (out / "parts").mkdir(parents=True, exist_ok=True)
    budget = args.budget or (240.0 if args.tiny else 450.0)
    ctx = Ctx(out=out, dev=torch.device(args.device), tiny=args.tiny, t0=time.perf_counter(),
              steps=args.steps or (1 if args.tiny else 10), warmup=args.warmup or (1 if args.tiny else 3),
              compile_backend="eager" if args.tiny else "inductor", peak_flops=None)
    if ctx.tiny:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or torch.get_num_threads()))
    meta = {"command": command, "device": args.device, "tiny": args.tiny, "budget_s": budget,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts_chosen": sorted(chosen)}
    _preimport()
    gc.freeze()  # the imported modules' objects: the children's gc.collect() (between variants) skips them
    signal.signal(signal.SIGTERM, _on_signal)
    (out / "results.jsonl").unlink(missing_ok=True)
    records: list[dict] = []
    for part in PARTS:
        left = budget - (time.perf_counter() - ctx.t0)
        reason = None
        if part.name not in chosen:
            reason = "not chosen (--parts / --skip)"
        elif ctx.tiny and getattr(part, "tiny_skip", None) and not args.parts:  # --parts: run what is named
            reason = part.tiny_skip
        elif left < part.min_s:
            reason = f"budget: {max(left, 0):.0f} s left of {budget:.0f} s, the part needs at least {part.min_s} s"
        if reason:
            rec = {"part": part.name, "status": "skipped", "reason": reason, "seconds": 0.0, "cap_s": 0.0, "rows": []}
        else:
            cap = min((part.tiny_cap if ctx.tiny else part.cap) * args.cap_scale, left)
            print(f"== {part.name} (cap {cap:.0f} s, {left:.0f} s of the budget left)", flush=True)
            rec = run_part(ctx, part, cap)
            if part.name == "matmul" and rec["meta"].get("peak_flops"):
                ctx.peak_flops = meta["peak_flops"] = rec["meta"]["peak_flops"]
                meta["peak_kind"] = rec["meta"]["peak_kind"]
            print(f"== {part.name}: {rec['status']} in {rec['seconds']:.1f} s"
                  + (f" ({rec['reason']})" if rec.get("reason") else ""), flush=True)
        records.append(rec)
        _atomic_json(out / "parts" / f"{part.name}.json", rec)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps({k: v for k, v in rec.items() if k != "rows"} | {"figures": len(rec["rows"])},
                               default=str) + "\n")
        write_reports(ctx, meta, records)
    md = (out / "summary.md").read_text()
    print(md)
    if args.write:
        from common import write_section

        body = "\n".join(("#" + ln if ln.startswith("## ") else ln) for ln in md.splitlines()
                         if not ln.startswith("# GPU suite"))
        write_section("gpu-suite", "GPU suite", body.strip() + "\n")
    return {"meta": meta, "parts": records}


if __name__ == "__main__":
    main()
