"""Issue 17: why the refinement gains little in some cells. Where the CRF pseudo masks' errors lie, and how
much each kind of error could be worth, against the gain the shipped refined masks got.

For each stage-1 run of `benchmarks/refine_table.py` (RUN/pseudo_train_crf, RUN/refine_train and the merged
RUN/refine_train_{fill,relabel}) and the family's train ground truth:

- the CRF masks' wrong pixels, as shares of the labelled pixels: foreground drawn on background near an
  object (an extent drawn too wide), far from every object (a class winning on background or clutter),
  object pixels called background (missed), object pixels given another class (confused);
- three oracles, each the CRF masks with one kind of error put right from the ground truth, and their mIoU
  minus the CRF masks' (the most a refinement that fixes only that kind can gain):
  `missed` (every pixel the CRF calls background takes the ground truth: the ceiling of `merge: fill`,
  which changes only those pixels), `false fg` (every foreground pixel on background becomes background)
  and `confused` (every object pixel with the wrong class takes its own);
- the shipped refined masks' gain (`fill` for the CAM / USAGE presets, `relabel` for TKP-PCL: what
  `method.merge: auto` picks) and the walk's alone;
- what the walk does on the pixels the CRF masks call background, the only pixels `fill` takes from it: the
  share of the missed object pixels it labels right, and the background pixels it draws a class on (and
  how many of those lie far from every object: on background or clutter, not an object's rim), and their
  ratio: background pixels drawn per object pixel recovered, what `fill` trades.

    python benchmarks/refine_headroom.py --families F0 F3 F6 --presets cam_cnn usage_cnn cam_vit usage_vit tkp_pcl \
        --seeds 0 1 2 --data /work/fam --work /work/runs/fam

Reads masks only (nothing is trained); a cell without its folders is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from family_table import family_label  # noqa: E402

from wsss.evaluation.metrics import ConfusionMatrix, mask_tensor  # noqa: E402
from wsss.io import read_mask  # noqa: E402
from wsss.methods.affinity import AffinityConfig, merge_mode  # noqa: E402

IGNORE = 255
KINDS = ("near", "far", "missed", "confused")  # the CRF masks' errors, as in the module docstring
ORACLES = ("missed", "false_fg", "confused")


def near_objects(gt: np.ndarray) -> np.ndarray:
    """Pixels within 5% of the short side of any GT object (`false_positive_where.py`'s reach)."""
    objects = (gt != IGNORE) & (gt > 0)
    if not objects.any():
        return np.zeros_like(objects)
    return ndimage.distance_transform_edt(~objects) <= max(2, int(0.05 * min(gt.shape)))


def error_pixels(pred: np.ndarray, gt: np.ndarray, near: np.ndarray) -> dict[str, int]:
    """Counts of the four kinds of wrong pixels of PRED against GT (NEAR: `near_objects(gt)`, which decides
    near and far), and of the labelled pixels."""
    valid = gt != IGNORE
    objects = valid & (gt > 0)
    drawn = (pred > 0) & (pred != IGNORE)
    on_background = drawn & valid & (gt == 0)
    return {"labelled": int(valid.sum()), "near": int((on_background & near).sum()),
            "far": int((on_background & ~near).sum()), "missed": int((objects & ~drawn).sum()),
            "confused": int((objects & drawn & (pred != gt)).sum())}


def oracle(kind: str, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """PRED with one kind of error put right from GT (GT's ignored pixels are not scored either way)."""
    if kind == "missed":
        return np.where(pred == 0, gt, pred)
    drawn = (pred > 0) & (pred != IGNORE)
    if kind == "false_fg":
        return np.where(drawn & (gt == 0), 0, pred)
    return np.where(drawn & (gt > 0) & (gt != IGNORE), gt, pred)  # confused


def shipped_merge(run: Path) -> str | None:
    """The merge `method.merge: auto` applies to RUN's seeds given their CRF masks (fill for seeds cut at a
    threshold, relabel for a background channel), from the seeds' own protocol; None without their summary."""
    summary = run / "pseudo_train_maps" / "summary.json"
    if not summary.exists():
        return None
    threshold = (json.loads(summary.read_text()).get("protocol") or {}).get("bg_threshold")
    return merge_mode(AffinityConfig(merge="auto"), threshold, crf_masks=True)


def cell(root: Path, run: Path) -> dict | None:
    """One run's CRF error shares and the mIoU of the CRF masks, the oracles, the walk and the shipped masks."""
    crf, walk, merge = run / "pseudo_train_crf", run / "refine_train", shipped_merge(run)
    shipped = run / f"refine_train_{merge}"
    if merge is None or not all((f / "summary.json").exists() for f in (crf, walk, shipped)):
        print(f"skipped {run}: no seeds, CRF, walk or merged masks (run benchmarks/refine_table.py first)",
              file=sys.stderr)
        return None
    names = list(json.loads((crf / "summary.json").read_text())["per_class"])
    matrices = {key: ConfusionMatrix(len(names)) for key in ("crf", *ORACLES)}
    counts = dict.fromkeys(("labelled", *KINDS, "recovered", "added", "added_far"), 0)
    for path in sorted(shipped.glob("*.png")):
        pred, gt = read_mask(crf / path.name), read_mask(root / "SegmentationClass" / path.name)
        walked = read_mask(walk / path.name)
        if not pred.shape == walked.shape == gt.shape:
            raise ValueError(f"{crf / path.name}: CRF mask {pred.shape}, walk mask {walked.shape} and ground truth "
                             f"{gt.shape} differ in size")
        near = near_objects(gt)
        for key, value in error_pixels(pred, gt, near).items():
            counts[key] += value
        # what the walk does where the CRF masks say background (all that `fill` takes from it)
        counts["recovered"] += int(((pred == 0) & (gt > 0) & (gt != IGNORE) & (walked == gt)).sum())
        added = (pred == 0) & (gt == 0) & (walked > 0) & (walked != IGNORE)
        counts["added"] += int(added.sum())
        counts["added_far"] += int((added & ~near).sum())
        truth = mask_tensor(gt)
        matrices["crf"].update(mask_tensor(pred), truth)
        for kind in ORACLES:
            matrices[kind].update(mask_tensor(oracle(kind, pred, gt)), truth)
    miou = {key: m.as_json(names)["miou"] for key, m in matrices.items()}
    # the walk's and the shipped masks' scores are the ones refine_table wrote, over the same images
    miou["walk"] = json.loads((walk / "summary.json").read_text())["miou"]
    miou["shipped"] = json.loads((shipped / "summary.json").read_text())["miou"]
    return {"merge": merge, "miou": miou, "errors": {k: counts[k] / max(counts["labelled"], 1) for k in KINDS},
            "walk_recovers": counts["recovered"] / max(counts["missed"], 1),
            "walk_adds": counts["added"] / max(counts["labelled"], 1),
            "walk_adds_far": counts["added_far"] / max(counts["added"], 1),
            # the walk's trade on the CRF's background: background pixels drawn per object pixel recovered
            "walk_false_per_recovered": counts["added"] / max(counts["recovered"], 1)}


def _mean_points(rows: list[dict], key: str) -> str:
    """Mean over seeds of KEY's mIoU minus the CRF masks', in points."""
    return f"{statistics.fmean(r['miou'][key] - r['miou']['crf'] for r in rows) * 100:+.1f}"


def table(cells: dict[tuple[str, str], list[dict]]) -> str:
    lines = ["| family | preset | seeds | CRF masks | CRF errors: near / far / missed / confused (% of pixels) | "
             "oracle: missed | oracle: false fg | oracle: confused | walk | shipped | walk on the CRF's background: "
             "missed pixels it recovers / false fg it adds (% of pixels; share far from objects) | "
             "false fg added per object pixel recovered |", "|---" * 12 + "|"]
    for (family, preset), rows in cells.items():
        errors = " / ".join(f"{statistics.fmean(r['errors'][k] for r in rows) * 100:.1f}" for k in KINDS)
        lines.append(
            f"| {family_label(family)} | `demo/{preset}` | {len(rows)} "
            f"| {statistics.fmean(r['miou']['crf'] for r in rows):.3f} | {errors} | "
            + " | ".join(_mean_points(rows, k) for k in (*ORACLES, "walk", "shipped"))
            + f" ({rows[0]['merge']}) | {statistics.fmean(r['walk_recovers'] for r in rows):.0%} / "
            f"{statistics.fmean(r['walk_adds'] for r in rows) * 100:.1f} "
            f"({statistics.fmean(r['walk_adds_far'] for r in rows):.0%} far) "
            f"| {statistics.fmean(r['walk_false_per_recovered'] for r in rows):.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=["F0", "F3", "F6"])
    ap.add_argument("--presets", nargs="+", default=["cam_cnn", "usage_cnn", "cam_vit", "usage_vit", "tkp_pcl"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--data", type=Path, default=Path("family"))
    ap.add_argument("--work", type=Path, default=Path("runs/family"))
    args = ap.parse_args()
    cells = {}
    for family in args.families:
        for preset in args.presets:
            rows = []
            for seed in args.seeds:
                row = cell(args.data / family, args.work / family / f"{preset}_s{seed}")
                if row is not None:
                    rows.append(row)
                    print(json.dumps({"family": family, "preset": preset, "seed": seed, **row}), flush=True)
            if rows:
                cells[family, preset] = rows
    print(table(cells))


if __name__ == "__main__":
    main()
