"""Seeds: multi-scale + flip class maps of a trained run, restricted to the image's classes, and the
pseudo mask of one image. `engine/pseudo_masks.py` streams them over a split.

The recipe (docs/architecture.md, "Seeds"): class maps averaged over scales and flips at full
resolution; only background + the image's tags (GT, or predicted by `image_scores > 0.5`) are kept;
each foreground map is divided by its max; the background is the method's channel 0 (max-normalised
likewise, to the power `bg_power`) or, for methods without one (CAM), `(1 - max_c fg)^bg_alpha` when bg_alpha > 0, else the
constant `bg_threshold`. The argmax over those channels is the pseudo mask.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsss.data.base import checked_sample
from wsss.errors import ConfigError, DataError
from wsss.io import load_checkpoint

EPS = 1e-5
ABSENT_MODES = ("drop", "background", "won")  # InferConfig.absent


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu; anything else as torch spells it."""
    if isinstance(device, torch.device):
        return device
    if device in ("auto", "", None):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_workers(n: int) -> int:
    """-1: leave a core for the main process, at most 4 (loading is not the bottleneck past that)."""
    if n >= 0:
        return n
    return max(0, min(4, (os.cpu_count() or 1) - 1))


@contextlib.contextmanager
def loader_iter(loader) -> Iterator:
    """iter(loader), its worker processes shut down on the way out, an error included. Left to torch, an
    iterator that an error's traceback keeps alive is shut down later by the garbage collector, which
    then waits 5 s for each worker."""
    it = iter(loader)
    try:
        yield it
    finally:
        getattr(it, "_shutdown_workers", lambda: None)()  # multi-process iterators only; idempotent


# ------------------------------------------------------------------------------------------------- runs


def run_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """The weights a run is used with: `checkpoint` if given, else RUN/best.pt if present, else RUN/last.pt."""
    if checkpoint is not None:
        return Path(checkpoint)
    run_dir = Path(run_dir)
    return run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"):
    """(cfg, method in eval mode, class_names) from a run folder: config.yaml, classes.json and
    best.pt if present else last.pt (or `checkpoint`), loaded with weights_only=True."""
    from wsss.config import load_config
    from wsss.methods import create_method

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{run_dir}: not a run folder (no config.yaml; make one with `wsss train`)")
    cfg = load_config(run_dir / "config.yaml")
    try:
        class_names = json.loads((run_dir / "classes.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{run_dir / 'classes.json'}: cannot read class names ({e})") from None
    checkpoint = run_checkpoint(run_dir, checkpoint)
    state = load_checkpoint(checkpoint)
    if "model" not in state:
        raise DataError(f"{checkpoint}: not a wsss checkpoint (no 'model' entry)")
    # The checkpoint overwrites every weight: skip the pretrained download / weights file.
    build_cfg = copy.deepcopy(cfg)
    build_cfg.model.backbone.pretrained = False
    build_cfg.model.backbone.weights = ""
    method = create_method(build_cfg, len(class_names))
    try:
        method.load_state_dict(state["model"])
    except RuntimeError as e:
        raise DataError(f"{checkpoint}: weights do not fit the run's config ({str(e).splitlines()[0]})") from None
    dev = resolve_device(device)
    return cfg, method.to(dev).eval(), class_names


# ------------------------------------------------------------------------------------------------ seeds


def eval_transform(cfg):
    """The inference input: short side resized to infer.size (0: the training crop size; -1: as it is), or the whole
    image to that square with `infer.resize: square`; normalised."""
    from wsss.data.transforms import EvalTransform

    return EvalTransform(cfg.data, size=cfg.infer.size or cfg.data.crop_size, resize=cfg.infer.resize)


@torch.no_grad()
def seed_probs(method, image: torch.Tensor, tags: list[int] | None, infer_cfg, out_size) -> tuple[list[int], torch.Tensor]:
    """The kept classes [0, *tags] and their probabilities float32 [K, H0, W0] (K = 1 + len(tags)).

    Only the kept channels are upsampled, so memory is O(K H0 W0), not O(num_classes H0 W0).
    A method with `uses_tags = False` (a segmentation net, stage 2) keeps every class, ignores `tags` and
    returns its averaged probabilities as they are (no max-normalisation): the plain argmax.
    """
    plain = not method.uses_tags
    grid = getattr(infer_cfg, "normalise", "full")
    if grid not in ("full", "grid"):
        raise ConfigError(f"infer.normalise: unknown mode {grid!r} (full, grid)")
    grid = grid == "grid" and not plain
    absent = getattr(infer_cfg, "absent", "drop")
    if absent not in ABSENT_MODES:
        raise ConfigError(f"infer.absent: unknown mode {absent!r} ({', '.join(ABSENT_MODES)})")
    absent = absent if method.has_background and not plain else "drop"
    device = next(method.parameters()).device
    image = image.to(device, torch.float32)
    h, w = image.shape[-2:]
    passes = []  # class maps at feature resolution, one [b, num_classes, h', w'] per scale
    scores = []
    for s in infer_cfg.scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = image[None] if size == (h, w) else F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
        if infer_cfg.flip:
            x = torch.cat([x, x.flip(-1)])
        passes.append(method.class_maps(x).float().clamp_min(0))
        if tags is None and not plain:
            scores.append(method.image_scores(x).float().mean(0))
    if plain:
        tags = list(range(1, method.num_classes))
    elif tags is None:
        fg = (torch.stack(scores).mean(0) > 0.5).nonzero().flatten()
        tags = [int(c) + 1 for c in fg.tolist()]
    tags = sorted(set(int(t) for t in tags))
    keep = [0, *tags]
    idx = torch.tensor(keep, device=device)
    acc = None
    n = 0
    for maps in passes:
        kept = maps[:, idx]
        if absent != "drop":  # the ruled-out classes' mass joins the background (see InferConfig.absent)
            moved = (maps.sum(dim=1) - kept.sum(dim=1)).clamp_min(0)
            if absent == "won":  # only where a ruled-out class is the patch's top class
                top = maps.argmax(dim=1, keepdim=True)
                moved = moved * ~(top == idx.view(1, -1, 1, 1)).any(dim=1)
            kept[:, 0] += moved
        maps = kept
        if grid:  # ViT-PCM: kept classes / their max, / their sum over classes, at the grid (each view)
            maps = maps / (maps.amax(dim=(2, 3), keepdim=True) + EPS)
            if method.has_background:
                maps = maps / (maps.sum(dim=1, keepdim=True) + EPS)
        up = F.interpolate(maps, size=tuple(out_size), mode="bilinear", align_corners=False)
        if infer_cfg.flip:
            up = up[:1] + up[1:].flip(-1)  # the flipped view's maps, flipped back
            n += 2
        else:
            n += 1
        acc = up[0] if acc is None else acc + up[0]
    acc = acc / n
    if plain:
        return keep, acc.float()
    fg = acc[1:] if grid else acc[1:] / (acc[1:].amax(dim=(1, 2), keepdim=True) + EPS)
    if method.has_background:
        bg = acc[:1] if grid else acc[:1] / (acc[:1].amax(dim=(1, 2), keepdim=True) + EPS)
        # the extent knob of these methods (wsss.engine.extent)
        return keep, with_bg_power(torch.cat([bg, fg]).float(), float(getattr(infer_cfg, "bg_power", 1.0)))
    if infer_cfg.bg_alpha > 0:
        top = fg.amax(0, keepdim=True) if len(tags) else torch.zeros_like(acc[:1])
        bg = (1 - top).clamp_min(0).pow(infer_cfg.bg_alpha)
    else:
        bg = torch.full_like(acc[:1], float(infer_cfg.bg_threshold))
    return keep, torch.cat([bg, fg]).float()


def with_bg_power(probs: torch.Tensor, power: float) -> torch.Tensor:
    """`seed_probs` output with its background channel (in [0, 1]) to `power`: > 1 lowers it, so the masks
    grow; 1 leaves the tensor as it is."""
    if power == 1.0:
        return probs
    return torch.cat([probs[:1].clamp_min(0).pow(power), probs[1:]])


def class_probabilities(method, image: torch.Tensor, tags: list[int] | None, infer_cfg, out_size) -> torch.Tensor:
    """float32 [num_classes, H0, W0] on the method's device: background + tags (see module doc), other
    channels 0. Its argmax is the pseudo mask. `tags=None`: predicted tags (image_scores > 0.5)."""
    keep, probs = seed_probs(method, image, tags, infer_cfg, out_size)
    full = probs.new_zeros((method.num_classes, *probs.shape[1:]))
    full[keep] = probs
    return full


def predicted_classes(keep: list[int], probs: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """`seed_probs` output cut to the background + the classes that win at least one pixel: what a
    segmentation net (no tags) predicts is there, and the CRF runs over those classes only."""
    won = torch.zeros(len(keep), dtype=torch.bool, device=probs.device)
    won[probs.argmax(0).unique()] = True
    won[0] = True
    idx = won.nonzero().flatten()
    return [keep[i] for i in idx.tolist()], probs[idx]


def crf_channels(method, keep: list[int], probs: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """The channels a CRF refines: the kept ones (background + tags) for a seed method; a segmentation
    net's predicted classes (`predicted_classes`), as it keeps every class."""
    return (keep, probs) if method.uses_tags else predicted_classes(keep, probs)


def seed_mask(keep: list[int], probs: torch.Tensor) -> np.ndarray:
    """uint8 class ids [H, W] from `seed_probs` output."""
    lut = torch.tensor(keep, dtype=torch.uint8, device=probs.device)
    return lut[probs.argmax(0)].cpu().numpy()


def _threshold_mask(keep: list[int], probs: torch.Tensor, thr: float) -> torch.Tensor:
    """Mask with a constant background `thr` instead of channel 0 (ties go to the background, as argmax)."""
    lut = torch.tensor(keep, dtype=torch.uint8, device=probs.device)
    if len(keep) == 1:
        return torch.zeros(probs.shape[1:], dtype=torch.uint8, device=probs.device)
    top, arg = probs[1:].max(0)
    return torch.where(top > thr, lut[1:][arg], torch.zeros_like(arg, dtype=torch.uint8))


def evaluate_seeds(method, dataset, cfg, indices=None, progress: bool = False, skipped: list[str] | None = None):
    """A ConfusionMatrix of pseudo masks (GT tags, no CRF) over `indices` of a dataset with masks: the
    trainer's val metric. The caller all-reduces it under DDP (each rank passes its shard). A bad sample
    is a DataError, or with `skipped` given (data.skip_bad), left out and its message appended there."""
    from wsss.evaluation.metrics import ConfusionMatrix, mask_tensor

    cm = ConfusionMatrix(dataset.num_classes, device=next(method.parameters()).device)  # NCCL reduces on GPU
    tf = eval_transform(cfg)
    indices = range(len(dataset)) if indices is None else indices
    for i in _progress(indices, progress, "val"):
        try:
            sample = checked_sample(dataset, i)
        except DataError as e:
            if skipped is None:
                raise
            skipped.append(" ".join(str(e).split()))
            continue
        x = tf(sample, dataset.num_classes)["image"]
        keep, probs = seed_probs(method, x, sample.tags, cfg.infer, (sample.image.height, sample.image.width))
        cm.update(torch.from_numpy(seed_mask(keep, probs)), mask_tensor(sample.mask))
    return cm


def _progress(it, enabled: bool, desc: str, total=None):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, dynamic_ncols=True, leave=False)
