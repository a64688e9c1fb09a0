"""Issue 21: where a folder of masks loses its mIoU, without retraining anything.

Two splits of the same score, both from the confusion matrix (`wsss.evaluation.ConfusionMatrix`):

- by how many classes the image holds (1, 2, 3+ in its ground truth): on the digit families the masks of
  images with overlapping objects lose most, which says "which object is which", not "where";
- the foreground as one class (`ConfusionMatrix.compute()["foreground"]`, also in every summary.json):
  its IoU, precision and recall measure the extent alone, and `class_accuracy` the share of the shared
  foreground with the right class.

    python benchmarks/mask_breakdown.py DATA RUN/pseudo [RUN2/pseudo ...] [--split val]

Each folder holds `<id>.png` masks (wsss pseudo-label, predict); the ids are the split's, those without a
mask are skipped and counted. The class names come from DATA (VOC layout, `class_names.txt`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from wsss.data import open_dataset
from wsss.evaluation import ConfusionMatrix
from wsss.evaluation.metrics import IGNORE_INDEX, mask_tensor
from wsss.io import read_mask

MAX_GROUP = 3  # images with 3 or more classes share one row: the digit families hold 1-3 objects


def breakdown(data: Path, masks: Path, split: str = "val") -> dict:
    """mIoU by the number of ground-truth classes in the image (and how many images each), the whole
    split, and the foreground split."""
    ds = open_dataset(data, split)
    n = len(ds.class_names)
    if not ds.has_masks:
        raise SystemExit(f"{data}: split {split!r} has no ground-truth masks")
    groups = {k: ConfusionMatrix(n) for k in range(1, MAX_GROUP + 1)}
    images = dict.fromkeys(groups, 0)
    missing = 0
    for index, i in enumerate(ds.ids):
        path = masks / f"{i}.png"
        if not path.exists():
            missing += 1
            continue
        gt = ds.load_mask(index)
        labelled = gt[gt != IGNORE_INDEX]
        # an image without any object (background only) joins the 1-class row: it has no overlap to get wrong
        k = min(max(len(np.unique(labelled[labelled > 0])), 1), MAX_GROUP)
        groups[k].update(mask_tensor(read_mask(path)), mask_tensor(gt))
        images[k] += 1
    total = ConfusionMatrix(n)
    for cm in groups.values():
        total += cm
    whole = total.compute()
    return {
        "folder": str(masks),
        "images": images,
        "miou_by_classes": {k: cm.compute()["miou"] for k, cm in groups.items()},
        "miou": whole["miou"],
        "foreground": whole["foreground"],
        "missing": missing,
    }


def markdown(rows: list[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.3f}"

    head = ("| masks | 1 class | 2 classes | 3+ classes | all | fg IoU (precision / recall) | right class |\n"
            "|---|---:|---:|---:|---:|---|---:|")
    lines = [head]
    for r in rows:
        by, count = r["miou_by_classes"], r["images"]
        fg = r["foreground"] or {}
        cells = " | ".join(f"{pct(by[k])} ({count[k]})" for k in sorted(by))
        lines.append(f"| {r['folder']} | {cells} | {pct(r['miou'])} | "
                     f"{pct(fg.get('iou'))} ({pct(fg.get('precision'))} / {pct(fg.get('recall'))}) | "
                     f"{pct(fg.get('class_accuracy'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="dataset root (VOC layout)")
    ap.add_argument("masks", type=Path, nargs="+", help="folders of <id>.png masks")
    ap.add_argument("--split", default="val")
    args = ap.parse_args(argv)
    rows = [breakdown(args.data, m, args.split) for m in args.masks]
    print(markdown(rows))
    for r in rows:
        if r["missing"]:
            print(f"{r['folder']}: {r['missing']} ids of {args.split} have no mask (skipped)")
    return rows


if __name__ == "__main__":
    main()
