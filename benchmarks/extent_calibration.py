"""Issue 21: each run's mask extent chosen without ground truth, by asking its own classifier.

The twenty-fifth session's breakdown (RESULTS.md, "Transfer") found the masks' extent wrong in opposite
directions by family: over-covering on clutter, under-covering on the digits. So a fixed background knob
cannot pass both, and a per-run signal is needed. This script tests one: the *smallest sufficient region*
(as in the saliency literature's preservation game): a mask is large enough when the image with everything
else set to the mean colour still gives the class most of the score the whole image gives it.

For a trained run, on the first `--images` train images (their tags only, no masks):

1. the class maps as `wsss pseudo-label` makes them (the run's scales, flips, tags);
2. for each setting of the extent knob, the masks; the knob is the constant background score for the CAM
   presets (`infer.bg_threshold`, grid 0.2-0.8) and a power on the background channel for the patch presets
   (p in 1/8-16; p = 1 is the masks as shipped; p > 1 lowers the background, so the masks grow);
3. for each (image, tag): the classifier's score for the tag on the image with only that class's mask kept;
4. the chosen setting: the smallest mean mask area whose kept-only score is at least `--alpha` times the
   whole image's score (means over the pairs); when none reaches it, the largest.

Then the run's val masks at the shipped setting, at the chosen one and at every setting of the grid (the
best of which is an oracle with ground truth, shown for diagnosis only) are scored:

    python benchmarks/extent_calibration.py DATA RUN [RUN ...] [--images 16] [--alpha 0.85 0.95] [--json OUT]

`--guard BAR` runs rule 21 (twenty-sixth session; the engine's `infer.extent_guard`, wsss.engine.extent) instead: the shipped setting unless its masks keep under BAR
of the whole image's score, then the smallest setting that keeps BAR (else the largest); `--max-area A` adds
rule 24's shrink side (`infer.extent_max_area`): masks covering more than A of the pixels move to the smallest
setting that keeps BAR (the same target), or with `--target-area T` (rule 25, the engine's default) to the largest
setting whose masks cover at most T. val is scored only for the runs it moves.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from wsss.data import open_dataset
from wsss.engine.extent import Calibration, current, guarded_choice, masks_at
from wsss.engine.extent import grid as knob_grid
from wsss.engine.extent import smallest_sufficient as choose  # the guard's own choice, at each alpha
from wsss.engine.inference import eval_transform, load_run, seed_probs
from wsss.evaluation import MultiConfusion
from wsss.evaluation.metrics import mask_tensor


def calibrate(method, cfg, dataset, images: int, alphas: list[float]) -> dict:
    """The setting chosen for each alpha on the first `images` of `dataset` (tags only), and each
    setting's figures."""
    cal = Calibration(method, cfg, dataset, images)
    rows = cal.rows(knob_grid(method, cfg.infer))
    return {"chosen": {a: choose(rows, a) for a in alphas}, "settings": rows,
            "images": len(cal.samples), "full_score": cal.full_score / cal.pairs}


@torch.no_grad()
def score_val(method, cfg, dataset) -> dict:
    """val mIoU (GT tags, no CRF) at every setting of the grid."""
    transform = eval_transform(cfg)
    mc = MultiConfusion(method.num_classes, knob_grid(method, cfg.infer))
    infer = copy.deepcopy(cfg.infer)
    infer.bg_power = 1.0  # the maps before the knob, which `masks_at` applies (as the engine's Calibration)
    for index in range(len(dataset)):
        sample = dataset[index]
        x = transform(sample, method.num_classes)["image"]
        keep, probs = seed_probs(method, x, sample.tags, infer, sample.mask.shape)
        gt = mask_tensor(sample.mask)
        for s in mc.keys():
            mc.update(s, masks_at(method, keep, probs, s), gt)
    return {s: r["miou"] for s, r in mc.compute().items()}


def run_row(data: Path, run: Path, images: int, alphas: list[float]) -> dict:
    cfg, method, _ = load_run(run)
    val_split = open_dataset(data, "val")
    if not val_split.has_masks:
        raise SystemExit(f"{data}: split 'val' has no ground-truth masks to score")
    cal = calibrate(method, cfg, open_dataset(data, "train"), images, alphas)
    val = score_val(method, cfg, val_split)
    ship = current(method, cfg.infer)
    oracle = max(val, key=lambda s: val[s])
    return {"run": str(run), "shipped": ship, "miou_shipped": val[ship], "chosen": cal["chosen"],
            "miou_chosen": {a: val[s] for a, s in cal["chosen"].items()}, "oracle": oracle,
            "miou_oracle": val[oracle], "calibration": cal, "val": val}


def guard_row(data: Path, run: Path, images: int, bar: float, max_area: float = 0.0, target_area: float = 0.0
              ) -> dict:
    """The engine's guard on one run (rule 21; with `max_area`, the shrink side too: to `target_area`, rule 25,
    or with 0 to the smallest masks that keep `bar`, rule 24): val is scored only when the guard moves the
    setting (then at every setting)."""
    cfg, method, _ = load_run(run)
    val_split = open_dataset(data, "val")
    if not val_split.has_masks:
        raise SystemExit(f"{data}: split 'val' has no ground-truth masks to score")
    ship = current(method, cfg.infer)
    cal = Calibration(method, cfg, open_dataset(data, "train"), images)
    chosen, rows = guarded_choice(cal, knob_grid(method, cfg.infer), ship, bar, max_area, target_area)
    row = {"run": str(run), "guard": bar, "max_area": max_area, "target_area": target_area, "shipped": ship,
           "chosen": chosen, "settings": rows}
    if chosen != ship:
        val = score_val(method, cfg, val_split)
        row.update(val=val, miou_shipped=val[ship], miou_chosen=val[chosen])
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--images", type=int, default=16, help="train images the setting is chosen on")
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.95],
                    help="kept-only score / whole-image score to reach (several: one choice each)")
    ap.add_argument("--guard", type=float,
                    help="the engine's guard instead (rule 21): grow the masks only where the shipped ones keep "
                         "under this share")
    ap.add_argument("--max-area", type=float, default=0.0,
                    help="with --guard: shrink the masks where the shipped ones cover more than this share")
    ap.add_argument("--target-area", type=float, default=0.0,
                    help="with --max-area, rule 25: to the largest masks within this share (0: rule 24, the "
                         "smallest masks that keep the --guard share)")
    ap.add_argument("--json", type=Path, help="append one JSON line per run here")
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        if args.guard is not None:
            r = guard_row(args.data, run, args.images, args.guard, args.max_area, args.target_area)
            rows.append(r)
            at = r["settings"][r["shipped"]]
            kept = f"{at['kept_ratio']:.2f} of the score, {at['area']:.2f} of the pixels"
            moved = (f"-> {r['chosen']}: {r['miou_shipped']:.3f} -> {r['miou_chosen']:.3f} "
                     f"({100 * (r['miou_chosen'] - r['miou_shipped']):+.1f})" if "val" in r else "kept")
            print(f"{run}: shipped {r['shipped']} keeps {kept}; {moved}", flush=True)
        else:
            r = run_row(args.data, run, args.images, args.alpha)
            rows.append(r)
            chosen = "; ".join(f"alpha {a}: {r['chosen'][a]} -> {r['miou_chosen'][a]:.3f} "
                               f"({100 * (r['miou_chosen'][a] - r['miou_shipped']):+.1f})" for a in args.alpha)
            print(f"{run}: shipped {r['shipped']} -> {r['miou_shipped']:.3f}; {chosen}; "
                  f"oracle {r['oracle']} -> {r['miou_oracle']:.3f}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r, default=str) + "\n")
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
