"""Provenance and protocol: what made a run folder, and how a number was measured.

- `environment()` / `write_env(folder)`: FOLDER/env.json in every run folder (train, pseudo-label,
  segment, `wsss run`): the wsss version, the git commit and dirty flag when wsss runs from a checkout
  (silently absent otherwise), the command line, Python / torch / timm / CUDA / cuDNN versions, the
  device names, the CPU model and torch's intra-op thread count, and the world size. The last two are
  there because a CPU run is exact only on the same CPU at the same thread count: the float sums change
  order with either, and a 6-epoch run amplifies that (held-out F3, `demo/vit_pcm` seed 0: 0.266 at one
  thread, 0.297 at two; benchmarks/RESULTS.md, "Transfer").
- `protocol(...)`: the `protocol` dict every mIoU written to JSON carries (`wsss evaluate --json`,
  pseudo-label summary.json, the report): split, stage (seeds | crf | refined | stage2), tags
  (gt | predicted), scales, flip, crf preset, background threshold and how it was chosen
  (fixed | swept on <split> | ...), checkpoint (last | best on <split> | a path).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

STAGES = ("seeds", "crf", "refined", "stage2")
PROTOCOL_KEYS = ("split", "stage", "tags", "scales", "flip", "crf", "bg_threshold", "bg_threshold_chosen",
                 "checkpoint")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_info(path: str | Path | None = None) -> dict:
    """{"commit", "dirty"} of the checkout holding `path` (default: the wsss sources); {} when not a repo
    or git is missing."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], cwd)
    if not commit:
        return {}
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what `platform` knows, possibly "")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment(world_size: int | None = None) -> dict:
    """The JSON-able provenance of this process (see the module doc)."""
    import wsss

    env: dict[str, Any] = {"wsss": getattr(wsss, "__version__", "?")}
    git = git_info()
    if git:
        env["git"] = git
    env["argv"] = list(sys.argv)
    env["cwd"] = os.getcwd()
    env["python"] = platform.python_version()
    env["platform"] = platform.platform()
    env["host"] = platform.node()
    env["cpu"] = _cpu_model()
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        devices = ["cpu"]
        if torch.cuda.is_available():
            devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["devices"] = devices
        env["threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        env["torch"] = None
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = None
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    env["world_size"] = int(world_size)
    return env


def write_env(folder: str | Path, world_size: int | None = None) -> Path:
    """FOLDER/env.json (atomic); returns its path."""
    from wsss.io import atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "env.json"
    atomic_write_json(path, environment(world_size))
    return path


def checkpoint_label(checkpoint: str | Path | None, val_split: str) -> str:
    """"best on <val split>" for a run's best.pt, "last" for last.pt, else the path."""
    if checkpoint is None:
        return "last"
    name = Path(checkpoint).name
    if name == "best.pt":
        return f"best on {val_split}"
    if name == "last.pt":
        return "last"
    return str(checkpoint)


def protocol(
    split: str,
    stage: str,
    predicted_tags: bool,
    infer_cfg,
    crf: bool,
    has_background: bool,
    checkpoint: str,
    threshold_source: str = "",
) -> dict:
    """The `protocol` dict of one evaluated output (see the module doc). `infer_cfg`: the InferConfig used;
    `threshold_source`: how the background threshold was chosen ("" = "fixed", the config's value)."""
    if has_background:
        thr, chosen = None, "the method's background channel"
        absent = getattr(infer_cfg, "absent", "drop")
        if absent != "drop":  # InferConfig.absent: the ruled-out classes' probability joins it
            chosen += " + the classes the tags rule out" + (" where they top a patch" if absent == "won" else "")
        power = float(getattr(infer_cfg, "bg_power", 1.0))
        if power != 1.0:
            chosen += f", to the power {power:g}" + (f" ({threshold_source})" if threshold_source else "")
    elif getattr(infer_cfg, "bg_alpha", 0) > 0:
        thr, chosen = None, f"(1 - max_c)^{infer_cfg.bg_alpha:g}"
    else:
        thr, chosen = float(infer_cfg.bg_threshold), threshold_source or "fixed"
    return {
        "split": split,
        "stage": stage,
        "tags": "predicted" if predicted_tags else "gt",
        "scales": [float(s) for s in infer_cfg.scales],
        "flip": bool(infer_cfg.flip),
        "crf": infer_cfg.crf.preset if crf else None,
        "bg_threshold": thr,
        "bg_threshold_chosen": chosen,
        "checkpoint": checkpoint,
    }


def unknown_protocol(split: str) -> dict:
    """For masks of unknown origin (`wsss evaluate` on a folder wsss did not write)."""
    return {k: ("unknown" if k != "split" else split) for k in PROTOCOL_KEYS}


def protocol_text(p: dict | None) -> str:
    """One line: "val, crf (vit_pcm), gt tags, scales 1.5,2 no flip, bg 0.6 swept on train, best on val"."""
    if not isinstance(p, dict):
        return "protocol unknown"
    stage = str(p.get("stage", "?"))
    if p.get("crf") and stage != "crf":
        stage += " + crf"
    if p.get("crf"):
        stage += f" ({p['crf']})"
    scales = p.get("scales")
    scales = ",".join(f"{s:g}" for s in scales) if isinstance(scales, list) else str(scales)
    thr = p.get("bg_threshold")
    bg = f"bg {thr:g} {p.get('bg_threshold_chosen', '')}" if isinstance(thr, (int, float)) else \
        f"bg: {p.get('bg_threshold_chosen', '?')}"
    flip = p.get("flip")
    flip = "flip" if flip is True else "no flip" if flip is False else f"flip {flip}"
    return (f"{p.get('split', '?')}, {stage}, {p.get('tags', '?')} tags, scales {scales} {flip}, {bg}, "
            f"checkpoint {p.get('checkpoint', '?')}")
