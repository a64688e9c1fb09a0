"""A collapse alarm that needs no ground truth: how much of each predicted mask is foreground.

A weakly supervised method can fail without any metric saying so when the split has no masks: the
background loses everywhere (every image one big object: "collapsed") or wins everywhere (no
foreground: "empty"). Both show in the predicted masks alone (uint8 label maps, 0 = background,
255 = ignore, not counted), so `wsss train` checks them at every validation pass on a fixed subset of
train images (`train_check`) and `wsss pseudo-label` over every mask it writes (`MaskStats`, in
OUT/summary.json's "diagnostics"); `alarm` turns the figures into one line, or None when they look sane.

Thresholds (module constants; the reasons):
- LOW_BACKGROUND = 0.10: an image whose background covers under 10% of its labelled pixels is "nearly
  all foreground". Segmentation benchmarks are photographs of objects in a scene: such close-ups exist
  but are a small minority (in the embedded benchmark's and the test families' ground truth, none).
- COLLAPSE_SHARE = 0.5: collapsed when at least half the images are nearly all foreground. A
  dataset of close-ups could have some; half of them is what the collapse looks like (issue 21: the
  present class covered the whole image in every image).
- COLLAPSE_FOREGROUND = 0.70: or when 70% of all labelled pixels are foreground, whatever the spread.
  Ground truth is far below: 14-22% in the embedded benchmark's families, 17% in the dataset of issue 21
  (whose collapsed masks were 83% foreground, and ViT-PCM's 73%), roughly a quarter to a third in
  PASCAL VOC. A dataset of close-ups may legitimately come near it: the line then costs a look.
- EMPTY_SHARE = 0.5: empty when at least half the images have no foreground pixel at all. With the
  image's tags (pseudo-labelling, the trainer's check) a tagged class that never wins is a failure; a
  split made mostly of untagged (negative) images is the one legitimate case, and the line says so.
- RECOGNISED_GAIN = 0.5 (the trainer's check, which also scores the images): "unrecognised" when the
  top-scored class is one of the image's tags in fewer images than halfway from chance (tags / classes)
  to all of them. A trained classifier sits near 1 (the embedded benchmark: 0.9+); one that learned
  nothing sits at chance; issue 21's digit families, whose classes the 6-epoch demo budget does not
  learn to tell apart, sit near chance with masks that look like a collapse. Needs MIN_SCORED = 8 tagged
  images. It needs the tags only, no masks.
These are deliberately loose: the alarm is for degenerate masks, not for mediocre ones (over- or
under-segmentation by a few tens of percent is for the mIoU, where there are masks, to show).

The counts are integers (plus one float sum) so shards add up: `MaskStats.__add__`, `all_reduce()`
(the trainer's DDP ranks each check their shard of the subset).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

LOW_BACKGROUND = 0.10
COLLAPSE_SHARE = 0.5
COLLAPSE_FOREGROUND = 0.70
EMPTY_SHARE = 0.5
RECOGNISED_GAIN = 0.5
MIN_SCORED = 8
# train.extend_unrecognised trains on while the top class is a tag in under 80% of the way from chance to
# every image (train.extend_gain's default): a higher bar than the alarm's, as more epochs still pay there
# for the patch presets (held-out F1: 50-72% of the train images at epoch 6, chance 20%; the embedded
# benchmark: 100%, so it stops at its 6 epochs). The CAM presets stop at 0.6 (their yaml says why).
EXTEND_GAIN = 0.8
TRAIN_CHECK_IMAGES = 32  # the trainer's fixed subset: the first N train ids (no GT masks used)
DOC = "docs/architecture.md, 'Collapse alarm'"
IGNORE = 255


@dataclass
class MaskStats:
    """Sums over masks: `add` one at a time, `+` shards, read the fractions off the properties."""

    images: int = 0  # masks with at least one labelled (non-255) pixel
    pixels: int = 0  # labelled pixels
    foreground: int = 0  # labelled pixels of a class > 0
    low_background: int = 0  # images whose background is < LOW_BACKGROUND of their labelled pixels
    no_foreground: int = 0  # images without a foreground pixel
    image_foreground: float = 0.0  # sum over images of their foreground fraction
    # Recognition (the trainer's check only: it scores the images): tagged images, those whose top-scored
    # class is one of their tags, and the sum of that event's chance (tags / classes) over them.
    tagged: int = 0
    top_hit: int = 0
    top_chance: float = 0.0

    def add(self, mask) -> float | None:
        """Count one mask (uint8 [H, W] array or tensor); returns its foreground fraction (None when it has
        no labelled pixel, then it is not counted)."""
        m = np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask)
        labelled = int(np.count_nonzero(m != IGNORE))
        if labelled == 0:
            return None
        fg = labelled - int(np.count_nonzero(m == 0))
        frac = fg / labelled
        self.images += 1
        self.pixels += labelled
        self.foreground += fg
        self.low_background += int(labelled - fg < LOW_BACKGROUND * labelled)
        self.no_foreground += int(fg == 0)
        self.image_foreground += frac
        return frac

    def __add__(self, other: MaskStats) -> MaskStats:
        return MaskStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))

    def all_reduce(self, device=None) -> MaskStats:
        """The sum over DDP ranks (this object when not distributed)."""
        from wsss.engine import distributed as D

        if not D.is_dist():
            return self
        import torch

        t = torch.tensor(dataclasses.astuple(self), dtype=torch.float64, device=device)
        D.all_reduce_sum(t)
        kinds = [f.type for f in dataclasses.fields(self)]
        return MaskStats(*(v if kind in (float, "float") else int(round(v)) for v, kind in zip(t.tolist(), kinds, strict=True)))

    def add_scores(self, scores, tags: list[int]) -> None:
        """Count one image's foreground scores [C] against its tags (class ids 1..C); untagged images are
        not counted (their top class is a hit by no definition)."""
        if not tags:
            return
        top = int(np.argmax(np.asarray(scores.cpu() if hasattr(scores, "cpu") else scores))) + 1
        self.tagged += 1
        self.top_hit += int(top in tags)
        self.top_chance += len(set(tags)) / len(scores)

    @property
    def foreground_fraction(self) -> float:
        """Foreground share of all labelled pixels."""
        return self.foreground / self.pixels if self.pixels else 0.0

    @property
    def mean_image_foreground(self) -> float:
        """Mean over images of their foreground fraction (each image weighs the same)."""
        return self.image_foreground / self.images if self.images else 0.0

    @property
    def top_hit_rate(self) -> float | None:
        """Share of tagged images whose top-scored class is a tag (None when nothing was scored)."""
        return self.top_hit / self.tagged if self.tagged else None

    @property
    def top_hit_chance(self) -> float | None:
        """What a classifier that ignores the image would score on top_hit_rate."""
        return self.top_chance / self.tagged if self.tagged else None

    @property
    def low_background_share(self) -> float:
        return self.low_background / self.images if self.images else 0.0

    @property
    def no_foreground_share(self) -> float:
        return self.no_foreground / self.images if self.images else 0.0

    def summary(self, what: str = "pseudo masks", has_background: bool | None = None) -> dict:
        """The figures as JSON (fractions rounded to 4 places) with `alarm` (a line, or None)."""
        return {
            "images": self.images,
            "foreground_fraction": round(self.foreground_fraction, 4),
            "mean_image_foreground": round(self.mean_image_foreground, 4),
            "low_background_share": round(self.low_background_share, 4),
            "no_foreground_share": round(self.no_foreground_share, 4),
            **({"scored": self.tagged, "top_hit_rate": round(self.top_hit_rate, 4),
                "top_hit_chance": round(self.top_hit_chance, 4)}
               if self.tagged else {}),
            "alarm": alarm(self, what, has_background),
        }


def mask_stats(masks) -> MaskStats:
    """MaskStats over an iterable of masks."""
    stats = MaskStats()
    for m in masks:
        stats.add(m)
    return stats


def unrecognised(stats: MaskStats) -> bool:
    """True when the classifier scores the images' tags little better than chance: the top-scored class is
    a tag in under half the way from chance to every image (and at least MIN_SCORED images were scored)."""
    if stats.tagged < MIN_SCORED:
        return False
    chance = stats.top_hit_chance
    return not picks_tags(stats.top_hit_rate, chance, RECOGNISED_GAIN)


def recognised_summary(summary: dict, gain: float = EXTEND_GAIN) -> bool | None:
    """Whether the top-scored class is a tag in at least `gain` of the way from chance to every image,
    read back from a `MaskStats.summary()`: True / False, or None when too few images were scored to say.
    The trainer's `train.extend_unrecognised` decides by it at EXTEND_GAIN."""
    if summary.get("scored", 0) < MIN_SCORED:
        return None
    return picks_tags(summary["top_hit_rate"], summary["top_hit_chance"], gain)


def picks_tags(hit_rate: float, chance: float, gain: float = EXTEND_GAIN) -> bool:
    """True when a top-class hit rate is at least `gain` of the way from `chance` to 1."""
    return hit_rate >= chance + gain * (1 - chance)


def verdict(stats: MaskStats) -> str | None:
    """"unrecognised", "collapsed", "empty" or None (healthy, or nothing counted), by the module's
    thresholds. Unrecognised comes first: masks from a classifier that cannot tell the classes apart
    mean nothing, whatever their extent (issue 21's held-out digit families)."""
    if unrecognised(stats):
        return "unrecognised"
    if stats.images == 0:
        return None
    if stats.low_background_share >= COLLAPSE_SHARE or stats.foreground_fraction >= COLLAPSE_FOREGROUND:
        return "collapsed"
    if stats.no_foreground_share >= EMPTY_SHARE:
        return "empty"
    return None


def alarm(stats: MaskStats, what: str = "pseudo masks", has_background: bool | None = None) -> str | None:
    """One line naming the symptom and what to try, or None when the masks look sane. `has_background`:
    whether the method predicts its own background channel (False: CAM-style, a background threshold;
    None: unknown, both hints)."""
    kind = verdict(stats)
    if kind is None:
        return None
    fg = f"{100 * stats.foreground_fraction:.0f}% of pixels foreground"
    if kind == "unrecognised":
        return (f"the classifier has not learned to tell the classes apart: its top-scored class is one of the "
                f"image's tags in {100 * stats.top_hit_rate:.0f}% of {stats.tagged} tagged images (chance: "
                f"{100 * stats.top_hit_chance:.0f}%), so its masks ({fg}) mean nothing; train longer, add images, "
                f"or make the objects larger at the input (data.crop_size, infer.size) (see {DOC})")
    figures = (f"{fg}, {100 * stats.low_background_share:.0f}% of images with <{100 * LOW_BACKGROUND:.0f}% background"
               if kind == "collapsed" else f"{100 * stats.no_foreground_share:.0f}% of images with no foreground, {fg}")
    figures += f" ({stats.images} images)"
    threshold, channel = "infer.bg_threshold", "infer.size / infer.scales against the object size"
    if kind == "collapsed":
        hints = {False: f"try a higher {threshold} (or --sweep-threshold on a split with masks) or infer.bg_alpha > 0",
                 True: f"the background channel loses everywhere: check {channel}, train longer, try another preset, or "
                       f"give the background the patches an absent class wins (infer.absent=won, `wsss pseudo-label "
                       f"--absent won`: ViT-PCM on held-out F4, 0.13 -> 0.28 val mIoU)"}
    else:
        hints = {False: f"try a lower {threshold}",
                 True: "the foreground never wins: train longer, check the tags (a split of mostly untagged "
                       "images is legitimately empty)"}
    hint = hints[has_background] if has_background is not None else f"{hints[False]}; {hints[True]}"
    return f"{what} look {kind}: {figures}; {hint} (see {DOC})"


# ---------------------------------------------------------------------------------------- the trainer's


def train_check(method, dataset, cfg, info=None, n: int = TRAIN_CHECK_IMAGES) -> dict:
    """The trainer's check at a validation pass: seed masks (the image's tags, no CRF; no GT mask used)
    of the first `n` images of `dataset`, sharded over DDP ranks (`info`) and summed. Unreadable samples
    are left out (the training loader reports them). Returns `MaskStats.summary()`, or None for a method
    without class maps (AffinityNet)."""
    import torch

    from wsss.data.base import checked_sample
    from wsss.engine import distributed as D
    from wsss.engine.inference import eval_transform, seed_mask, seed_probs
    from wsss.errors import DataError

    stats = MaskStats()
    tf = eval_transform(cfg)
    count = min(n, len(dataset))
    no_maps = False  # a method without class maps (AffinityNet): nothing to check
    scores_ok = True
    param_device = next(method.parameters()).device
    with torch.no_grad():
        for i in D.shard(count, info) if info is not None else range(count):
            try:
                sample = checked_sample(dataset, i)
            except DataError:
                continue
            x = tf(sample, dataset.num_classes)["image"]
            try:
                keep, probs = seed_probs(method, x, sample.tags, cfg.infer, (sample.image.height, sample.image.width))
            except NotImplementedError:
                no_maps = True
                break
            stats.add(seed_mask(keep, probs))
            if scores_ok:
                try:
                    scores = method.image_scores(x[None].to(param_device))[0].float()
                except NotImplementedError:  # a method with maps but no image scores: masks only
                    scores_ok = False
                else:
                    stats.add_scores(scores, sample.tags)
    device = info.device if info is not None else None
    if D.any_rank(no_maps, device if device is not None else torch.device("cpu")):  # every rank returns alike
        return None
    what = "train pseudo masks" if getattr(method, "uses_tags", True) else "train predictions"
    return stats.all_reduce(device).summary(what, bool(method.has_background) if method.uses_tags else True)


def tensorboard_scalars(tb, summary: dict, step: int, prefix: str = "masks") -> None:
    """The numeric figures of a summary as TensorBoard scalars (`masks/foreground_fraction`, ...)."""
    for k, v in summary.items():
        if k != "images" and isinstance(v, (int, float)) and not isinstance(v, bool):
            tb.add_scalar(f"{prefix}/{k}", v, step)


def run_alarm(run_dir) -> str | None:
    """The alarm of a run folder's last training check (RUN/log.jsonl "masks"), or None."""
    import json
    from pathlib import Path

    path = Path(run_dir) / "log.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    for line in reversed(lines):
        try:
            masks = json.loads(line).get("masks")
        except (ValueError, AttributeError):
            continue
        if isinstance(masks, dict):
            return masks.get("alarm")
    return None
