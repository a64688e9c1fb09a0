"""The masks' extent checked against the run's own classifier (issue 21, `infer.extent_guard`).

A fixed background knob cannot suit every dataset: on the held-out benchmark families the masks are too
large on cluttered images and too small on the ten digits (benchmarks/RESULTS.md, "Transfer", twenty-fifth
session). The guard asks the classifier itself whether a run's masks are far too small, with no pixel label:
on the first `infer.extent_images` tagged train images it keeps only each tag's mask (the rest of the image at
the mean colour, 0 after normalising) and compares the classifier's score for the tag with the whole image's.
Where the masks keep under `infer.extent_guard` of that score, most of the evidence the classifier used lies
outside them, and the knob moves to the smallest setting whose masks keep that share (none: the largest masks
on the grid). Runs already right keep 66-99% of the score, the under-covering digit runs 10-38%, while
over-covering runs (1.02-1.06) are not told apart from right ones (0.99) by this score (RESULTS.md, rule 21).
So the shrink side is triggered by the masks' area instead: where they cover more than
`infer.extent_max_area` (0.4) of the pixels on average, far above the objects' share in VOC (about a quarter),
COCO's things (about a third) and every benchmark family (6-22%), the knob moves to the largest masks that
cover at most `infer.extent_target_area` (0.25, VOC's share; rule 25). The score cannot pick that size, as
every smaller setting keeps it too: taking the smallest masks that keep the bar (rule 24, target area 0) lands
on the grid's end, which cuts into the objects of the small-image family.

The knob: the constant background score (`infer.bg_threshold`) for methods without a background channel,
the power on the background channel (`infer.bg_power`, > 1 grows the masks) for those with one. The choice
is a property of the trained weights, so it is made once per checkpoint and cached in the run folder
(RUN/extent_<checkpoint stem>.json): the train and val masks of a run, and every later call, use one setting.
The saliency literature calls the score test the preservation game (smallest sufficient region); no library
implements it for class maps, hence the code here.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from wsss.engine.inference import _threshold_mask, eval_transform, seed_mask, seed_probs, with_bg_power
from wsss.errors import DataError
from wsss.io import atomic_write_json

DEFAULT_GUARD = 0.5  # `--extent-guard` on a run whose config has it off: half of the whole image's score
LABELLED_SPLIT = "the labelled split"  # the record's source when the run's own train split could not be opened
THRESHOLDS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]  # methods without a background channel: its constant score
# methods with one: background channel ** p. Capped at 4: where no setting keeps the bar, the classifier's
# score is no guide and powers 8-16 over-grew the 400-image digit runs (RESULTS.md, rules 21 and 23).
POWERS = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0]


def knob(method) -> str:
    return "bg_power" if method.has_background else "bg_threshold"


def current(method, infer) -> float:
    """The knob's setting in `infer` (the config's, unless something moved it)."""
    return float(getattr(infer, knob(method)))


def grid(method, infer) -> list[float]:
    """The knob's settings, the current one among them."""
    return sorted({*(POWERS if method.has_background else THRESHOLDS), current(method, infer)})


def masks_at(method, keep: list[int], probs: torch.Tensor, setting: float) -> torch.Tensor:
    """uint8 class ids [H, W] from `seed_probs` output (made at bg_power 1) with the knob at `setting`."""
    if method.has_background:
        return torch.from_numpy(seed_mask(keep, with_bg_power(probs, setting)))
    return _threshold_mask(keep, probs, setting)


class Calibration:
    """A run's class maps on the first `images` tagged images of `dataset`, computed once; `row(setting)`
    gives that setting's mean mask area and its kept-only score over the whole image's (per setting, lazily:
    a run the guard leaves alone costs one setting)."""

    @torch.no_grad()
    def __init__(self, method, cfg, dataset, images: int):
        self.method = method
        infer = copy.deepcopy(cfg.infer)
        infer.bg_power = 1.0  # the maps before the knob; `masks_at` applies it
        transform = eval_transform(cfg)
        device = next(method.parameters()).device
        self.samples, self.full_score, self.pairs = [], 0.0, 0
        for index in range(len(dataset)):
            if len(self.samples) == images:
                break
            try:
                sample = dataset[index]
            except DataError:  # an unreadable image only leaves the check; labelling reports it itself
                continue
            if not sample.tags:
                continue
            x = transform(sample, method.num_classes)["image"].to(device)
            keep, probs = seed_probs(method, x, sample.tags, infer, x.shape[-2:])
            full = method.image_scores(x[None]).float()[0]
            self.full_score += float(sum(full[c - 1] for c in sample.tags))
            self.pairs += len(sample.tags)
            self.samples.append((x, sample.tags, keep, probs))
        self._rows: dict[float, dict] = {}

    @torch.no_grad()
    def row(self, setting: float) -> dict:
        if setting not in self._rows:
            area, kept = 0.0, 0.0
            for x, tags, keep, probs in self.samples:
                m = masks_at(self.method, keep, probs, setting).to(x.device)
                area += float((m > 0).float().mean())
                batch = torch.stack([x * (m == c).to(x.dtype) for c in tags])  # one kept-only image per tag
                scores = self.method.image_scores(batch).float()
                kept += float(sum(scores[j, c - 1] for j, c in enumerate(tags)))
            n = max(1, len(self.samples))
            self._rows[setting] = {"area": area / n, "kept_ratio": kept / self.full_score if self.full_score else 0.0}
        return self._rows[setting]

    def rows(self, settings) -> dict:
        return {s: self.row(s) for s in settings}


def guarded_choice(cal, settings: list[float], current: float, bar: float, max_area: float = 0.0,
                   target_area: float = 0.0) -> tuple[float, dict]:
    """The current setting unless its masks are far off. Too small (they keep under `bar` of the whole image's
    score): the smallest-area setting that keeps `bar`, else the largest-area one. Too large (they cover more
    than `max_area` of the pixels on average; 0: never): the largest-area setting within `target_area`, else
    the smallest-area one; `target_area` 0: the smallest-area setting that keeps `bar`, never larger than the
    current one, which keeps it. Returns (setting, rows computed)."""
    row = cal.row(current)
    too_small = row["kept_ratio"] < bar
    if not too_small and not 0 < max_area < row["area"]:
        return current, cal.rows([current])
    rows = cal.rows(settings)
    if too_small or target_area <= 0:
        return smallest_sufficient(rows, bar), rows
    return largest_within(rows, target_area), rows


def smallest_sufficient(rows: dict, bar: float) -> float:
    """The smallest-area setting whose masks keep `bar` of the whole image's score; else the largest-area one."""
    sufficient = [s for s in rows if rows[s]["kept_ratio"] >= bar]
    if sufficient:
        return min(sufficient, key=lambda s: rows[s]["area"])
    return max(rows, key=lambda s: rows[s]["area"])


def largest_within(rows: dict, area: float) -> float:
    """The largest-area setting whose masks cover at most `area` of the pixels; else the smallest-area one."""
    within = [s for s in rows if rows[s]["area"] <= area]
    if within:
        return max(within, key=lambda s: rows[s]["area"])
    return min(rows, key=lambda s: rows[s]["area"])


def _checkpoint_stamp(checkpoint: Path) -> dict:
    st = checkpoint.stat()
    return {"checkpoint": checkpoint.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _calibration_split(cfg, fallback):
    """The run's own train split (tags only), else `fallback` (the split being labelled)."""
    from wsss.data import open_dataset

    try:
        return open_dataset(cfg.data.root, cfg.data.train_split, cfg.data.format, cfg.data.tags_file), \
            f"{cfg.data.root} {cfg.data.train_split}"
    except (DataError, OSError, ValueError):
        return fallback, LABELLED_SPLIT if fallback is not None else ""


def apply_extent_guard(run_dir, cfg, method, checkpoint: Path, fallback) -> dict | None:
    """Sets cfg.infer's knob as the guard decides for these weights (cached per checkpoint, see module doc)
    and returns the record (None: guard off, or no tagged images to calibrate on). `fallback`: the dataset
    to calibrate on when the run's own train split cannot be opened (None: then the knob is left alone)."""
    bar = float(cfg.infer.extent_guard)
    if bar <= 0 or not method.uses_tags or (not method.has_background and cfg.infer.bg_alpha > 0):
        return None
    name = knob(method)
    shipped = current(method, cfg.infer)
    cache = Path(run_dir) / f"extent_{Path(checkpoint).stem}.json"
    infer = cfg.infer  # what makes the maps: a decision cached for other maps is made again
    maps = {"scales": [float(v) for v in infer.scales], "flip": bool(infer.flip), "size": infer.size,
            "resize": infer.resize, "normalise": infer.normalise, "absent": infer.absent}
    max_area, target_area = float(infer.extent_max_area), float(infer.extent_target_area)
    stamp = {**_checkpoint_stamp(Path(checkpoint)), "guard": bar, "max_area": max_area, "target_area": target_area,
             "images": int(infer.extent_images), "knob": name, "shipped": shipped, "maps": maps}
    try:
        record = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or unreadable: made again (it is a cache)
        record = None
    if not record or {k: record.get(k) for k in stamp} != stamp:
        dataset, source = _calibration_split(cfg, fallback)
        if dataset is None:  # nothing tagged to ask the classifier about: the knob as configured
            return None
        cal = Calibration(method, cfg, dataset, int(cfg.infer.extent_images))
        if not cal.pairs:
            return None
        chosen, rows = guarded_choice(cal, grid(method, cfg.infer), shipped, bar, max_area, target_area)
        record = {**stamp, "chosen": chosen, "source": source, "calibration_images": len(cal.samples),
                  "settings": {f"{s:g}": r for s, r in sorted(rows.items())}}
        try:
            atomic_write_json(cache, record)
        except OSError as e:  # a read-only run folder: decided again next time, nothing else lost
            print(f"warning: {cache}: cannot cache the extent guard's decision ({e})", file=sys.stderr)
    if record["chosen"] != shipped:
        at = record["settings"][f"{shipped:g}"]
        why = (f"keep {100 * at['kept_ratio']:.0f}% of the classifier's score for their classes (under "
               f"{100 * bar:.0f}%: too small)" if at["kept_ratio"] < bar else
               f"cover {100 * at['area']:.0f}% of the pixels (over {100 * max_area:.0f}%: too large)")
        print(f"note: {run_dir}: the masks at {name}={shipped:g} {why}; {name}={record['chosen']:g} instead "
              f"(infer.extent_guard / infer.extent_max_area / infer.extent_target_area)", file=sys.stderr)
    setattr(cfg.infer, name, float(record["chosen"]))
    return record
