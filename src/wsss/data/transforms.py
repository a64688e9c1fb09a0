"""RawSample -> tensors. Output of every transform (docs/architecture.md):
{"image": float32 [3, H, W] normalised, "label": float32 [C] multi-hot over the foreground classes,
 "mask": int64 [H, W] class ids (all 255 when the sample has no mask), "id": str}.

Randomness comes from torch's RNG. `TransformedDataset(seed=...)` seeds it per sample from (seed, epoch,
index), so a sample's augmentation does not depend on which process or loader worker draws it: a run
under torchrun with N processes sees the very images one process sees (see the trainer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wsss.data.base import RawSample, SegmentationDataset, checked_sample
from wsss.io import IGNORE_INDEX, DataError

log = logging.getLogger("wsss.data")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def backbone_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) a backbone's weights were trained with: timm's `pretrained_cfg` for a timm name (e.g.
    `vit_base_patch16_224.orig_in21k_ft_in1k` -> 0.5 / 0.5), ImageNet's for the wsss offline names
    and for a name timm does not know (creating the backbone reports that)."""
    from wsss.models.backbones import BACKBONES

    if name in BACKBONES:
        return IMAGENET_MEAN, IMAGENET_STD
    return _timm_normalisation(name)


_TIMM_NORM: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}


def _timm_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if name not in _TIMM_NORM:
        pcfg = None
        try:
            from timm.models import get_pretrained_cfg

            pcfg = get_pretrained_cfg(name)
        except Exception:  # unknown name or tag: the backbone factory raises the useful error
            pass
        mean, std = getattr(pcfg, "mean", None), getattr(pcfg, "std", None)
        ok = all(isinstance(v, (tuple, list)) and len(v) == 3 for v in (mean, std))
        _TIMM_NORM[name] = (tuple(map(float, mean)), tuple(map(float, std))) if ok else (IMAGENET_MEAN, IMAGENET_STD)
    return _TIMM_NORM[name]


def label_vector(tags: Sequence[int], num_classes: int) -> torch.Tensor:
    y = torch.zeros(num_classes - 1, dtype=torch.float32)
    for c in tags:
        y[c - 1] = 1.0
    return y


def _normalise(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8/float HWC pixels in 0..255 -> normalised float32 CHW tensor."""
    x = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _mask_tensor(mask: np.ndarray | None, size_hw: tuple[int, int]) -> torch.Tensor:
    if mask is None:
        return torch.full(size_hw, IGNORE_INDEX, dtype=torch.int64)
    return torch.from_numpy(np.array(mask, dtype=np.int64))  # a copy: PIL arrays are read-only


def _scaled(image: Image.Image, ratio: float) -> Image.Image:
    """The image scaled by `ratio`, aspect kept (itself when the size does not change)."""
    w, h = image.size
    size = (max(1, round(w * ratio)), max(1, round(h * ratio)))
    return image if size == image.size else image.resize(size, Image.BILINEAR)


def _resize(image: Image.Image, side: float, mode: str) -> Image.Image:
    """short / long: that side becomes `side`; square: both sides (aspect not kept); native: `side` is a
    factor on the image's own size."""
    w, h = image.size
    if mode == "square":
        size = (max(1, round(side)), max(1, round(side)))
        return image if size == image.size else image.resize(size, Image.BILINEAR)
    if mode == "native":
        return _scaled(image, side)
    return _scaled(image, side / (min(w, h) if mode == "short" else max(w, h)))


RESIZE_MODES = ("short", "long", "square", "native")
AUGMENTS = ("crop", "timm")  # data.augment: ours (resize + crop + flips + jitter) or timm's ImageNet pipeline
TIMM_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"  # MCTformer main.py --aa
TIMM_RE_PROB = 0.25  # MCTformer main.py --reprob (mode pixel, count 1)


def _check_resize(mode: str, key: str) -> str:
    if mode not in RESIZE_MODES:
        from wsss.errors import ConfigError

        raise ConfigError(f"{key}: unknown resize {mode!r} ({', '.join(RESIZE_MODES)})")
    return mode


def _crop_window(length: int, crop: int) -> tuple[int, int, int]:
    """(source start, destination start, extent) of a random crop along one axis. A side shorter than
    the crop is placed at a random offset in the padded canvas instead."""
    if length >= crop:
        return int(torch.randint(0, length - crop + 1, ()).item()), 0, crop
    return 0, int(torch.randint(0, crop - length + 1, ()).item()), length


class _Base:
    def __init__(self, data_cfg, num_classes: int | None = None):
        self.mean = np.asarray(data_cfg.mean, dtype=np.float32)
        self.std = np.asarray(data_cfg.std, dtype=np.float32)
        self.num_classes = num_classes

    def _label(self, sample: RawSample, num_classes: int | None) -> torch.Tensor:
        n = num_classes or self.num_classes
        if not n:
            raise ValueError("the transform needs num_classes (pass it, or use TransformedDataset)")
        return label_vector(sample.tags, n)


class TrainTransform(_Base):
    """Random resize, random crop, flips, optional colour jitter, normalisation.

    Resize rule: s ~ U(scale_range) and the image's short side becomes s * crop_size, whatever the
    source resolution, so s = 1 makes the crop span the short side and s < 1 pads. With `data.resize:
    long` the long side becomes s * crop_size instead (SEAM's RandomResizeLong). With `data.resize:
    native` the image keeps its own resolution, times s (objects keep their pixel size, whatever the
    image size). With `data.resize: square` the whole image becomes (s * crop_size) squared instead
    (aspect ratio not kept; ViT-PCM's 384 x 384 with s = 1: no crop). The crop is crop_size x crop_size;
    padding is the mean colour (0 after normalisation) and 255 in the mask. Then h-flip (`hflip`),
    v-flip (`vflip`) and transpose (`transpose`), each with p = 0.5. Geometric ops are applied identically to the mask
    (nearest neighbour); jitter (`color_jitter`, or per-factor ranges `brightness` / `contrast` /
    `saturation`, and `hue`) and greying (`grey_p`) touch the image only.

    `data.augment: timm` replaces all of that with timm's ImageNet training pipeline as MCTformer
    builds it (`create_transform(is_training=True)`: RandomResizedCrop(crop_size, scale 0.08-1), h-flip,
    `color_jitter`, RandAugment `rand-m9-mstd0.5-inc1`, bicubic, random erasing p 0.25 per pixel). It
    moves pixels without a mask to follow, so the mask comes back all 255: classification training only.
    """

    def __init__(self, data_cfg, num_classes: int | None = None):
        super().__init__(data_cfg, num_classes)
        self.crop = int(data_cfg.crop_size)
        augment = getattr(data_cfg, "augment", "crop")
        if augment not in AUGMENTS:
            from wsss.errors import ConfigError

            raise ConfigError(f"data.augment: unknown {augment!r} ({', '.join(AUGMENTS)})")
        self.timm = None
        if augment == "timm":
            from timm.data import create_transform

            self.timm = create_transform(
                input_size=self.crop, is_training=True, hflip=0.5 if data_cfg.hflip else 0.0,
                color_jitter=float(data_cfg.color_jitter), auto_augment=TIMM_AUTO_AUGMENT,
                interpolation="bicubic", re_prob=TIMM_RE_PROB, re_mode="pixel", re_count=1,
                mean=tuple(float(v) for v in data_cfg.mean), std=tuple(float(v) for v in data_cfg.std))
        lo, hi = (float(v) for v in data_cfg.scale_range)
        if not 0 < lo <= hi:
            raise ValueError(
                f"data.scale_range must be [lo, hi] with 0 < lo <= hi, got {data_cfg.scale_range}"
            )
        self.scale_range = (lo, hi)
        self.hflip = bool(data_cfg.hflip)
        self.resize = _check_resize(getattr(data_cfg, "resize", "short"), "data.resize")
        self.vflip = bool(getattr(data_cfg, "vflip", False))
        self.transpose = bool(getattr(data_cfg, "transpose", False))
        hue = float(getattr(data_cfg, "hue", 0.0))
        self.grey_p = float(getattr(data_cfg, "grey_p", 0.0))
        if not 0 <= hue <= 0.5 or not 0 <= self.grey_p <= 1:
            raise ValueError(f"data.hue must be in [0, 0.5] and data.grey_p in [0, 1], got {hue}, {self.grey_p}")
        self.jitter = None
        j = float(data_cfg.color_jitter)
        strengths = {}  # torchvision's ColorJitter: a strength j means factors in [1 - j, 1 + j]
        for key in ("brightness", "contrast", "saturation"):
            rng = list(getattr(data_cfg, key, None) or [])
            if rng and (len(rng) != 2 or not 0 <= rng[0] <= rng[1]):
                raise ValueError(f"data.{key} must be a factor range [lo, hi] with 0 <= lo <= hi, got {rng}")
            strengths[key] = tuple(float(v) for v in rng) if rng else j
        if any(v != 0 for v in strengths.values()) or hue > 0:
            from torchvision.transforms import ColorJitter

            self.jitter = ColorJitter(**strengths, **({"hue": hue} if hue > 0 else {}))

    def __call__(self, sample: RawSample, num_classes: int | None = None) -> dict:
        if self.timm is not None:
            return self._timm(sample, num_classes)
        lo, hi = self.scale_range
        s = lo + (hi - lo) * torch.rand(()).item()
        # native: the image's own resolution x s (objects keep their pixel size); else a side of s * crop
        side = s if self.resize == "native" else max(1, round(s * self.crop))
        image = _resize(sample.image, side, self.resize)
        w, h = image.size
        mask = None
        if sample.mask is not None:
            mask = np.asarray(Image.fromarray(sample.mask).resize((w, h), Image.NEAREST))
        if self.jitter is not None:
            image = self.jitter(image)
        if self.grey_p > 0 and torch.rand(()).item() < self.grey_p:
            image = image.convert("L").convert("RGB")

        c = self.crop
        out = np.empty((c, c, 3), dtype=np.float32)
        out[:] = self.mean * 255.0  # normalises to exactly 0
        out_mask = np.full((c, c), IGNORE_INDEX, dtype=np.uint8)
        ys, yd, ly = _crop_window(h, c)
        xs, xd, lx = _crop_window(w, c)
        out[yd : yd + ly, xd : xd + lx] = np.asarray(image)[ys : ys + ly, xs : xs + lx]
        if mask is not None:
            out_mask[yd : yd + ly, xd : xd + lx] = mask[ys : ys + ly, xs : xs + lx]
        if self.hflip and torch.rand(()).item() < 0.5:
            out, out_mask = out[:, ::-1], out_mask[:, ::-1]
        if self.vflip and torch.rand(()).item() < 0.5:
            out, out_mask = out[::-1], out_mask[::-1]
        if self.transpose and torch.rand(()).item() < 0.5:
            out, out_mask = out.transpose(1, 0, 2), out_mask.T
        return {
            "image": _normalise(out, self.mean, self.std),
            "label": self._label(sample, num_classes),
            "mask": torch.from_numpy(np.ascontiguousarray(out_mask)).to(torch.int64),
            "id": sample.id,
        }

    def _timm(self, sample: RawSample, num_classes: int | None) -> dict:
        import random

        # timm draws from Python's `random` and NumPy's global RNG (RandAugment's op choice); seed both
        # from torch's stream, which TransformedDataset seeds per sample, so a sample's augmentation is
        # the same whatever the workers or ranks. The callers' states are put back.
        py_state, np_state = random.getstate(), np.random.get_state()
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        random.seed(seed)
        np.random.seed(seed)
        try:
            image = self.timm(sample.image.convert("RGB"))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return {
            "image": image,
            "label": self._label(sample, num_classes),
            "mask": torch.full((self.crop, self.crop), IGNORE_INDEX, dtype=torch.int64),
            "id": sample.id,
        }


class EvalTransform(_Base):
    """Resize the short side to `size` (0 = keep), or with `resize="square"` the whole image to size x
    size (`infer.resize`; ViT-PCM's 960 x 960), and normalise. The mask stays at the image's ORIGINAL
    resolution: class maps are upsampled to the original size before they are compared."""

    def __init__(self, data_cfg, size: int = 0, num_classes: int | None = None, resize: str = "short"):
        super().__init__(data_cfg, num_classes)
        self.size = int(size)
        self.resize = _check_resize(resize, "infer.resize")

    def __call__(self, sample: RawSample, num_classes: int | None = None) -> dict:
        w, h = sample.image.size
        if self.size <= 0 or self.resize == "native":
            image = sample.image
        else:
            image = _resize(sample.image, self.size, self.resize)
        return {
            "image": _normalise(np.asarray(image), self.mean, self.std),
            "label": self._label(sample, num_classes),
            "mask": _mask_tensor(sample.mask, (h, w)),
            "id": sample.id,
        }


class TransformedDataset(torch.utils.data.Dataset):
    """The torch Dataset the engine loads: dataset[i] through `transform`.

    A mask whose size differs from its image is a DataError here. With `skip_bad`, a sample raising
    DataError is replaced by the next good one and its id appended to `self.skipped` (logged as a
    warning on the "wsss.data" logger). In DataLoader worker processes that list lives in the worker,
    so with `skip_bad` every item also carries "skipped": the messages ("PATH: problem") of the bad
    samples passed over to reach it, joined by newlines ("" when none); batches carry them to the
    main process, which lists them in the run log (`wsss.engine.trainer`).
    """

    def __init__(self, dataset: SegmentationDataset, transform: Callable, skip_bad: bool = False,
                 seed: int | None = None):
        self.dataset = dataset
        self.transform = transform
        self.skip_bad = skip_bad
        self.seed = seed  # None: the ambient torch RNG; else per-sample seeds from (seed, epoch, index)
        self.epoch = 0
        self.skipped: list[str] = []
        self._bad: dict[int, str] = {}  # index -> its error message

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the per-sample seeds (set before the epoch's loader iterator is made)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int) -> dict:
        sample = checked_sample(self.dataset, index)
        if self.seed is None:
            return self._transform(sample)
        with torch.random.fork_rng(devices=[]):  # the caller's RNG (dropout with num_workers=0) is untouched
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63)
            return self._transform(sample)

    def _transform(self, sample: RawSample) -> dict:
        if isinstance(self.transform, _Base):
            return self.transform(sample, self.dataset.num_classes)
        out = self.transform(sample)
        out.setdefault("label", label_vector(sample.tags, self.dataset.num_classes))
        return out

    def __getitem__(self, index: int) -> dict:
        n = len(self.dataset)
        passed: list[str] = []  # messages of the bad samples passed over
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                passed.append(self._bad[i])
                continue
            try:
                out = self._load(i)
            except DataError as e:
                if not self.skip_bad:
                    raise
                self._bad[i] = " ".join(str(e).split())  # one line
                self.skipped.append(self.dataset.ids[i])
                passed.append(self._bad[i])
                log.warning("skipping sample %s: %s", self.dataset.ids[i], e)
                continue
            if self.skip_bad:
                out["skipped"] = "\n".join(passed)
            return out
        raise DataError(f"{self.dataset.root}: no readable sample left in split {self.dataset.split!r}")


def multiscale_flip_inputs(
    image: torch.Tensor, scales: Sequence[float], flip: bool
) -> list[tuple[torch.Tensor, float, bool]]:
    """Test-time inputs: `image` ([3,H,W] or [B,3,H,W]) bilinearly resized by each scale, each followed
    by its horizontal flip when `flip`. The caller un-flips the outputs and resizes them back."""
    batched = image.dim() == 4
    x4 = image if batched else image.unsqueeze(0)
    h, w = x4.shape[-2:]
    out = []
    for s in scales:
        if s == 1:
            x = x4
        else:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            x = F.interpolate(x4, size=size, mode="bilinear", align_corners=False)
        x = x if batched else x.squeeze(0)
        out.append((x, float(s), False))
        if flip:
            out.append((x.flip(-1), float(s), True))
    return out
