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
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from extent_sweep import masks as sweep_masks

from wsss.data import open_dataset
from wsss.engine.inference import eval_transform, load_run, seed_probs
from wsss.evaluation import MultiConfusion
from wsss.evaluation.metrics import mask_tensor

THRESHOLDS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]  # CAM presets: the background's constant score
POWERS = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]  # patch presets: background channel ** p


def grid(method, cfg) -> list[float]:
    """The knob's settings, the shipped one among them."""
    return sorted({*(POWERS if method.has_background else THRESHOLDS), shipped(method, cfg)})


def shipped(method, cfg) -> float:
    return 1.0 if method.has_background else float(cfg.infer.bg_threshold)


def masks_at(method, keep: list[int], probs: torch.Tensor, setting: float) -> torch.Tensor:
    """uint8 class ids from `seed_probs` output with the extent knob at `setting`: extent_sweep's two modes
    (the engine's argmax over a powered background, and its threshold cut)."""
    return sweep_masks(probs, keep, "power" if method.has_background else "threshold", setting)


@torch.no_grad()
def calibrate(method, cfg, dataset, images: int, alphas: list[float]) -> dict:
    """The setting chosen for each alpha on the first `images` of `dataset` (tags only), and each
    setting's figures."""
    num_classes = method.num_classes
    transform = eval_transform(cfg)
    settings = grid(method, cfg)
    area = dict.fromkeys(settings, 0.0)
    kept_score = dict.fromkeys(settings, 0.0)
    full_score, pairs, counted = 0.0, 0, 0
    for index in range(min(images, len(dataset))):
        sample = dataset[index]
        if not sample.tags:
            continue
        x = transform(sample, num_classes)["image"]
        keep, probs = seed_probs(method, x, sample.tags, cfg.infer, x.shape[-2:])
        full = method.image_scores(x[None])[0]
        full_score += float(sum(full[c - 1] for c in sample.tags))
        pairs += len(sample.tags)
        counted += 1
        for s in settings:
            m = masks_at(method, keep, probs, s)
            area[s] += float((m > 0).float().mean())
            # every tag's kept-only image in one batch: the mean colour (0 after normalising) elsewhere
            batch = torch.stack([x * (m == c).to(x.dtype) for c in sample.tags])
            scores = method.image_scores(batch)
            kept_score[s] += float(sum(scores[j, c - 1] for j, c in enumerate(sample.tags)))
    if not pairs:
        raise SystemExit("no tagged image among the calibration images")
    rows = {s: {"area": area[s] / counted, "kept_ratio": kept_score[s] / full_score} for s in settings}
    return {"chosen": {a: choose(rows, a) for a in alphas}, "settings": rows, "images": counted,
            "full_score": full_score / pairs}


def choose(rows: dict, alpha: float) -> float:
    """The smallest mean area whose kept-only score reaches alpha x the whole image's; else the largest."""
    sufficient = [s for s in rows if rows[s]["kept_ratio"] >= alpha]
    if sufficient:
        return min(sufficient, key=lambda s: rows[s]["area"])
    return max(rows, key=lambda s: rows[s]["area"])


@torch.no_grad()
def score_val(method, cfg, dataset) -> dict:
    """val mIoU (GT tags, no CRF) at every setting of the grid."""
    transform = eval_transform(cfg)
    mc = MultiConfusion(method.num_classes, grid(method, cfg))
    for index in range(len(dataset)):
        sample = dataset[index]
        x = transform(sample, method.num_classes)["image"]
        keep, probs = seed_probs(method, x, sample.tags, cfg.infer, sample.mask.shape)
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
    ship = shipped(method, cfg)
    oracle = max(val, key=lambda s: val[s])
    return {"run": str(run), "shipped": ship, "miou_shipped": val[ship], "chosen": cal["chosen"],
            "miou_chosen": {a: val[s] for a, s in cal["chosen"].items()}, "oracle": oracle,
            "miou_oracle": val[oracle], "calibration": cal, "val": val}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--images", type=int, default=16, help="train images the setting is chosen on")
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.95],
                    help="kept-only score / whole-image score to reach (several: one choice each)")
    ap.add_argument("--json", type=Path, help="append one JSON line per run here")
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
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
