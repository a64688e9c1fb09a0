"""Issue 21: where a run's false-positive foreground pixels lie (val pseudo masks against the ground truth).

Each false-positive pixel (predicted a class, GT another label) is put in one of three places: within D of a
GT object of the predicted class (the object's extent drawn too wide: a resolution / receptive-field
problem), within D of another object (a neighbour's class spilling over), or farther than D from every object
(the class wins on background or clutter: a background problem). D is 5% of the image's short side.

    python benchmarks/false_positive_where.py DATA MASKS [MASKS ...]

DATA is the dataset root (VOC layout: SegmentationClass/ID.png), each MASKS a folder of `wsss pseudo-label`
PNGs named by image id.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

IGNORE = 255


def tally(data: Path, masks: Path) -> dict:
    """Pixel counts: true positives, GT foreground, and the false positives by where they lie."""
    out = {"tp": 0, "gt_fg": 0, "near_own": 0, "near_other": 0, "far": 0}
    for path in sorted(masks.glob("*.png")):
        gt_path = data / "SegmentationClass" / path.name
        if not gt_path.exists():
            continue
        pred = np.asarray(Image.open(path)).astype(np.int64)
        gt = np.asarray(Image.open(gt_path)).astype(np.int64)
        if pred.shape != gt.shape:
            raise ValueError(f"{path}: mask {pred.shape} and ground truth {gt.shape} differ in size")
        valid = gt != IGNORE
        objects = (gt > 0) & valid
        reach = max(2, int(0.05 * min(gt.shape)))
        near_any = ndimage.distance_transform_edt(~objects) <= reach
        wrong = (pred > 0) & valid & (pred != gt)
        out["tp"] += int(((pred > 0) & (pred == gt)).sum())
        out["gt_fg"] += int(objects.sum())
        for c in np.unique(pred[wrong]):
            fp = wrong & (pred == c)
            own = gt == c
            near_own = fp & (ndimage.distance_transform_edt(~own) <= reach) if own.any() else np.zeros_like(fp)
            out["near_own"] += int(near_own.sum())
            out["near_other"] += int((fp & ~near_own & near_any).sum())
            out["far"] += int((fp & ~near_own & ~near_any).sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("masks", type=Path, nargs="+")
    args = ap.parse_args()
    print("| masks | recall of GT fg | false positives / GT fg | near own object | near another | far from every object |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in args.masks:
        t = tally(args.data, m)
        fp = max(1, t["near_own"] + t["near_other"] + t["far"])
        gt = max(1, t["gt_fg"])
        print(f"| {m} | {t['tp'] / gt:.0%} | {fp / gt:.1f}x | {t['near_own'] / fp:.0%} | "
              f"{t['near_other'] / fp:.0%} | {t['far'] / fp:.0%} |")


if __name__ == "__main__":
    main()
