"""`wsss segment`: train the stage-2 segmentation network on pseudo masks.

The training split's masks are replaced by `<pseudo_dir>/<id>.png` (what `wsss pseudo-label` writes);
validation, when the val split has masks, is against the real ground truth. Training itself is the one
engine trainer (`wsss.engine.trainer.train`): same run folder, checkpoints, log and `--resume`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wsss.data.base import SegmentationDataset
from wsss.errors import ConfigError, DataError
from wsss.io import IGNORE_INDEX, atomic_write_json, read_mask


class PseudoMaskDataset(SegmentationDataset):
    """A dataset split whose masks are read from a folder of `<id>.png` pseudo masks instead."""

    def __init__(self, base: SegmentationDataset, pseudo_dir: str | Path):
        self.base = base
        self.pseudo_dir = Path(pseudo_dir)
        self.root, self.split, self.class_names, self.ids = base.root, base.split, base.class_names, base.ids
        if not self.pseudo_dir.is_dir():
            raise DataError(f"{self.pseudo_dir}: pseudo-mask folder not found (make it with `wsss pseudo-label`)")
        # Fail before training, naming a file, rather than at some epoch in a loader worker.
        missing = [i for i in self.ids if not (self.pseudo_dir / f"{i}.png").is_file()]
        if missing:
            raise DataError(
                f"{self.pseudo_dir / (missing[0] + '.png')}: pseudo mask not found ({len(missing)} of "
                f"{len(self.ids)} images of split {self.split!r} have none; "
                f"`wsss pseudo-label RUN --split {self.split} --out {self.pseudo_dir}` makes them)"
            )

    @property
    def has_masks(self) -> bool:
        return True

    def image_path(self, index: int) -> str:
        return self.base.image_path(index)

    def load_image(self, index: int):
        return self.base.load_image(index)

    def mask_path(self, index: int) -> Path:
        return self.pseudo_dir / f"{self.ids[index]}.png"

    def load_mask(self, index: int) -> np.ndarray:
        mask = read_mask(self.mask_path(index))
        bad = (mask >= self.num_classes) & (mask != IGNORE_INDEX)
        if bad.any():
            raise DataError(
                f"{self.mask_path(index)}: class id {int(mask[bad].max())} out of range "
                f"(the dataset has {self.num_classes} classes, 255 = ignore)"
            )
        return mask

    def tags(self, index: int) -> list[int]:
        return self.base.tags(index)


def train_segmenter(cfg, pseudo_dir: str | Path, out_dir: str | Path, resume: bool = False) -> dict:
    """Train `cfg` (a segmentation method, e.g. `method.name: deeplab`) on the pseudo masks in
    `pseudo_dir` for `cfg.data.train_split`; RUN = out_dir. Returns the trainer's summary
    ({"epochs", "best_miou", "miou", "seconds", "out_dir"}) plus "pseudo_dir"."""
    from wsss.data import open_dataset
    from wsss.engine.trainer import train
    from wsss.methods import METHODS

    method_cls = METHODS.get(cfg.method.name)
    if method_cls is None or method_cls.target != "mask":
        segmenters = ", ".join(k for k, v in METHODS.items() if v.target == "mask")
        raise ConfigError(
            f"method.name: `wsss segment` trains a segmentation network ({segmenters}), "
            f"got {cfg.method.name!r}; a weakly supervised method trains with `wsss train`"
        )
    d = cfg.data
    dataset = PseudoMaskDataset(open_dataset(d.root, d.train_split, d.format, d.tags_file), pseudo_dir)
    out_dir = Path(out_dir)
    summary = train(cfg, out_dir, resume=resume, train_dataset=dataset)
    if int(os.environ.get("RANK", "0")) == 0:  # provenance (read by the report): what it learned from
        atomic_write_json(
            out_dir / "segment.json",
            {"pseudo_dir": str(Path(pseudo_dir).resolve()), "train_split": d.train_split, "num_images": len(dataset)},
        )
    return {**summary, "pseudo_dir": str(pseudo_dir)}
