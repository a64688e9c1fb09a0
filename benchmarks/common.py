"""Shared helpers for the benchmark scripts: machine description, CPU-sharing monitor, peak memory,
matmul peak, running one measurement in a fresh process, and RESULTS.md sections."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
_MARK = "@@BENCH_RESULT@@"


def machine(device: str = "cpu") -> str:
    """One line: CPU model, cores, torch version, intra-op threads (and the GPU when used)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return text


def _busy_jiffies() -> int | None:
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return v[0] + v[1] + v[2] + sum(v[5:8])  # user nice system irq softirq steal


def _own_cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class CPUShare:
    """How many cores *other* processes kept busy while the block ran: machine-wide busy time from
    /proc/stat minus this process's and its (waited) children's CPU time. Benchmarks run next to
    other jobs get marked as such instead of silently reporting slow numbers."""

    def __enter__(self):
        self.t0, self.b0, self.o0 = time.perf_counter(), _busy_jiffies(), _own_cpu_seconds()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        b1 = _busy_jiffies()
        if self.b0 is None or b1 is None or wall <= 0:
            self.other_cores = None
        else:
            busy = (b1 - self.b0) / os.sysconf("SC_CLK_TCK")
            self.other_cores = max(0.0, (busy - (_own_cpu_seconds() - self.o0)) / wall)
        return False

    @property
    def shared(self) -> bool:
        return self.other_cores is not None and self.other_cores > 0.25

    def note(self) -> str:
        if self.other_cores is None:
            return "CPU sharing not measured (no /proc/stat)"
        if self.shared:
            return (f"(machine shared with another job during the run: other processes kept "
                    f"{self.other_cores:.1f} of {os.cpu_count()} cores busy on average)")
        return f"machine otherwise idle during the run (other processes: {self.other_cores:.2f} cores)"


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size of this process (or of its largest waited child) in MiB (Linux: KiB)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return r.ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else r.ru_maxrss / 1024


def rss_mb(pid: int | str = "self") -> float:
    """Current resident set size of a process in MiB (0 when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                kids = [int(k) for k in task.read_text().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


class RSSPeak:
    """Peak current RSS while the block runs, sampled by a thread: of this process (`main_mb`) and of the
    process tree, loader / CRF workers included (`tree_mb`, a sum: pages shared after fork count once
    per process, so it overstates). ru_maxrss cannot show this: importing torch alone peaks at ~650 MiB."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.main_mb, self.tree_mb, self.start_mb = interval, 0.0, 0.0, 0.0

    def _sample(self) -> None:
        me = os.getpid()
        while True:
            main = rss_mb(me)
            self.main_mb = max(self.main_mb, main)
            self.tree_mb = max(self.tree_mb, main + sum(rss_mb(p) for p in _descendants(me)))
            if self._stop.wait(self.interval):
                return

    def start(self) -> RSSPeak:
        import threading

        self.start_mb = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def sync(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timings(device: torch.device | str, fn, repeat: int) -> list[float]:
    """Wall seconds of `repeat` calls of `fn`, each between two device syncs (queued CUDA work counted)."""
    out = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 0, seconds: float = 1.0) -> float:
    """Best achieved FLOP/s of an n x n matmul (the MFU denominator): fp32 on CPU, bf16 on GPU."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == float("inf"):
        t0 = time.perf_counter()
        for _ in range(4 if device.type == "cuda" else 1):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / (4 if device.type == "cuda" else 1))
    return 2 * n**3 / best


def run_isolated(script: Path, fn: str, kwargs: dict, env: dict | None = None) -> dict:
    """`script.fn(**kwargs)` in a fresh Python process (so peak RSS is this measurement's alone); the
    function returns a JSON-able dict."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import importlib; "
        "m = importlib.import_module(sys.argv[2]); "
        f"print({_MARK!r} + json.dumps(getattr(m, sys.argv[3])(**json.loads(sys.argv[4]))), flush=True)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(script.parent), script.stem, fn, json.dumps(kwargs)],
        capture_output=True, text=True, env={**os.environ, **(env or {})},
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    raise RuntimeError(f"{script.name}:{fn} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def write_section(key: str, title: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section between `<!-- bench:KEY -->` markers; other sections are kept."""
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    text = f"{start}\n{body.rstrip()}\n{end}\n"
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + text + doc[doc.index(end) + len(end) + 1:]
    else:
        doc = doc.rstrip("\n") + f"\n\n## {title}\n\n{text}"
    path.write_text(doc)


def table(headers: list[str], rows: list[list], align: str = "") -> str:
    """A markdown table; `align` one char per column (l/r), default: first left, rest right."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def steady_state_model(cfg, kind: str, num_classes: int, dev: torch.device, channels_last: bool, amp: str = ""):
    """(model, optimiser, amp dtype, trainable parameters) of one timed variant as the trainer holds it after
    its frozen warm-up: the recipe's trainable blocks, BatchNorm frozen where the trainer freezes it, its
    optimiser and AMP. `kind`: "method" (the recipe's method) or "backbone" (its bare backbone, the
    baseline every method step is compared with). Shared by bench_train.py (CPU) and gpu_suite.py."""
    from types import SimpleNamespace

    from wsss.engine.trainer import _amp, _freeze_bn, _split_params, build_optimizer
    from wsss.methods import create_method
    from wsss.models import create_backbone

    t = cfg.train
    if kind == "method":
        model = parts = create_method(cfg, num_classes)
    elif kind == "backbone":
        model = create_backbone(cfg.model.backbone)
        parts = SimpleNamespace(head_parameters=list, parameters=model.parameters, backbone_blocks=model.blocks)
    else:
        raise ValueError(f"variant kind: method or backbone, got {kind!r}")
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    head, live, dead, dead_blocks = _split_params(parts, t.trainable_blocks)
    for p in dead:
        p.requires_grad_(False)
    model.train()
    _freeze_bn(list(parts.backbone_blocks()) if t.freeze_bn else dead_blocks)
    opt = build_optimizer(cfg, [{"params": head, "lr": t.lr}, {"params": live, "lr": t.lr * t.backbone_lr_mult}])
    amp_dtype, _ = _amp(amp or t.amp, dev)
    return model, opt, amp_dtype, head + live
