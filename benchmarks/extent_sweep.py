"""Issue 21: how far the patch presets' masks reach, swept at inference without retraining.

The patch presets decide background against a class by the argmax of their max-normalised channels
(`engine/inference.py`, `seed_probs`). Two ways to move that decision, each one knob, scored here on the
class maps a run saved (`wsss pseudo-label RUN --data D --split val --out RUN/pseudo_maps --save-maps`):

- `--mode power`: the background channel (in [0, 1]) raised to p; p < 1 lifts it towards 1, so fewer
  pixels go to a class; p = 1 is the masks as the preset makes them.
- `--mode threshold`: the background channel ignored, as the CAM presets do: a pixel takes its top tagged
  class where that class's max-normalised map exceeds t, else the background.
- `--mode component`: the masks as made, then each class keeps only its connected regions whose peak
  probability is at least r x that class's best region's peak (r = 0: all kept). Asks whether the false
  regions far from the objects (clutter) carry weaker evidence than the objects; works on any preset's
  maps, CAM presets included (their background channel is the constant threshold).

Each setting is scored against the ground truth (val mIoU, the saved tags, no CRF) with the predicted
foreground share. The maps are read once per run; every setting reuses them.

    python benchmarks/extent_sweep.py DATA RUN/pseudo_maps [RUN2/pseudo_maps ...] --mode power --values 1 0.8 0.6
    python benchmarks/extent_sweep.py DATA RUN/pseudo_maps ... --mode threshold --values 0.3 0.4 0.5 0.6
    python benchmarks/extent_sweep.py DATA RUN/pseudo_train_maps ... --mode component --values 0 0.7 0.9 1

One row per run and a mean row; the run's classes come from RUN/classes.json (the folder's parent).

`--calibrate` picks p per run without ground truth: on a few train images the seed masks at each p are
compared with the same run's dense-CRF masks (`wsss pseudo-label RUN --data SUBSET --split train
--save-maps --out RUN/calib_maps`, and `--crf --out RUN/calib_crf`), and the p they agree with best
(mIoU of one against the other) scores val beside p = 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from wsss.engine.inference import _threshold_mask, seed_mask, with_bg_power
from wsss.evaluation.metrics import ConfusionMatrix
from wsss.io import read_mask
from wsss.postprocess.affinity import load_maps


def masks(probs: torch.Tensor, keep: list[int], mode: str, value: float) -> torch.Tensor:
    """Class ids [H, W] from saved maps (channel 0 the background, the others the tags) under one setting:
    the engine's own argmax (`seed_mask`) and threshold (`_threshold_mask`, as `--sweep-threshold` cuts)."""
    if mode == "power":
        return torch.from_numpy(seed_mask(keep, with_bg_power(probs, value)))
    if mode == "component":
        return torch.from_numpy(strongest_regions(keep, probs, value))
    return _threshold_mask(keep, probs, value)


def strongest_regions(keep: list[int], probs: torch.Tensor, ratio: float) -> np.ndarray:
    """The seed mask with each class's connected regions (8-connected) whose peak is under `ratio` x the
    class's best region's peak given to the background."""
    from scipy import ndimage as ndi

    arg = probs.argmax(0).numpy()
    out = np.asarray(keep, dtype=np.uint8)[arg]
    if ratio <= 0:  # every region kept: the masks as made
        return out
    for k in range(1, len(keep)):
        regions, n = ndi.label(arg == k, structure=np.ones((3, 3)))
        if n < 2:
            continue
        peaks = ndi.maximum(probs[k].float().numpy(), regions, index=np.arange(1, n + 1))
        out[np.isin(regions, np.flatnonzero(peaks < ratio * peaks.max()) + 1)] = 0
    return out


def _saved(maps_dir: Path, masks_dir: Path):
    """(path, probs [K, H, W], kept class ids, mask [H, W]) per saved map, the mask from masks_dir/<id>.png."""
    files = sorted((maps_dir / "maps").glob("*.npz"))
    if not files:
        raise SystemExit(f"{maps_dir}/maps: no saved maps (run pseudo-label with --save-maps)")
    for path in files:
        classes, probs = load_maps(path)
        mask = torch.from_numpy(read_mask(masks_dir / f"{path.stem}.png").astype(np.int64))
        yield path, torch.from_numpy(probs), classes, mask


def sweep(data: Path, maps_dir: Path, mode: str, values: list[float]) -> dict[float, tuple[float, float]]:
    """{value: (val mIoU, predicted foreground share)} for one run's saved maps."""
    names = json.loads((maps_dir.parent / "classes.json").read_text())
    cms = {v: ConfusionMatrix(len(names)) for v in values}
    fg = dict.fromkeys(values, 0)
    total = 0
    for path, probs, keep, gt in _saved(maps_dir, data / "SegmentationClass"):
        if probs.shape[1:] != gt.shape:
            raise SystemExit(
                f"{path}: maps {tuple(probs.shape[1:])} and its ground truth {tuple(gt.shape)} differ in size"
            )
        total += gt.numel()
        for v in values:
            pred = masks(probs, keep, mode, v)
            cms[v].update(pred, gt)
            fg[v] += int((pred > 0).sum())
    return {v: (cms[v].compute()["miou"], fg[v] / total) for v in values}


def calibrated_power(run: Path, values: list[float]) -> float:
    """The p whose seed masks agree best with the run's CRF masks on RUN/calib_maps (no ground truth)."""
    names = json.loads((run / "classes.json").read_text())
    cms = {v: ConfusionMatrix(len(names)) for v in values}
    for _, probs, keep, crf in _saved(run / "calib_maps", run / "calib_crf"):
        for v in values:
            cms[v].update(masks(probs, keep, "power", v), crf)
    agreement = {v: cms[v].compute()["miou"] for v in values}
    return max(values, key=lambda v: agreement[v])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="dataset root (VOC layout)")
    ap.add_argument("maps", type=Path, nargs="+", help="pseudo-label --save-maps folders")
    ap.add_argument("--mode", choices=("power", "threshold", "component"), default="power")
    ap.add_argument("--values", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.5, 0.4, 0.3])
    ap.add_argument("--calibrate", action="store_true", help="p per run from its CRF masks (see above)")
    args = ap.parse_args(argv)
    if args.calibrate:
        print("| run | p* (from the CRF) | val mIoU at p=1 (fg) | at p* (fg) | change |")
        print("|---|---:|---:|---:|---:|")
        for m in args.maps:
            best = calibrated_power(m.parent, args.values)
            res = sweep(args.data, m, "power", sorted({1.0, best}))
            (a, fa), (b, fb) = res[1.0], res[best]
            print(
                f"| {m} | {best:g} | {a:.3f} ({100 * fa:.0f}%) | {b:.3f} ({100 * fb:.0f}%) | {100 * (b - a):+.1f} |"
            )
        return
    rows = {str(m): sweep(args.data, m, args.mode, args.values) for m in args.maps}
    key = {"power": "p", "threshold": "t", "component": "r"}[args.mode]
    print("| run | " + " | ".join(f"{key}={v:g}" for v in args.values) + " |")
    print("|---|" + "---:|" * len(args.values))
    for name, res in rows.items():
        print(
            f"| {name} | "
            + " | ".join(f"{res[v][0]:.3f} ({100 * res[v][1]:.0f}%)" for v in args.values)
            + " |"
        )
    means = [np.mean([r[v][0] for r in rows.values()]) for v in args.values]
    print("| mean | " + " | ".join(f"{m:.4f}" for m in means) + " |")


if __name__ == "__main__":
    main()
