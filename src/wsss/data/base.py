"""The one dataset interface every format implements (VOC, VOC-with-custom-classes, COCO, folder).

A dataset is a list of ids with class names; it yields raw samples. Transforms (data/transforms.py)
turn raw samples into tensors; the formats know nothing about training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class RawSample:
    id: str
    image: Image.Image  # RGB
    tags: list[int]  # present foreground class indices, sorted, each in 1..num_classes-1
    mask: np.ndarray | None  # uint8 [H, W] class ids, 255 = ignore; None when the dataset has no masks


class SegmentationDataset:
    """Base class. Subclasses set `root`, `split`, `class_names` (index 0 = background) and `ids`, and
    implement `image_path`, `load_mask` (or return None) and `tags`."""

    root: str
    split: str
    class_names: list[str]
    ids: list[str]

    @property
    def num_classes(self) -> int:
        """Including the background."""
        return len(self.class_names)

    @property
    def has_masks(self) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> str:
        raise NotImplementedError

    def load_image(self, index: int) -> Image.Image:
        from wsss.io import read_image

        return read_image(self.image_path(index))

    def load_mask(self, index: int) -> np.ndarray | None:
        raise NotImplementedError

    def tags(self, index: int) -> list[int]:
        """Present foreground classes of image `index` (cheap: no image decoding where avoidable)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> RawSample:
        return RawSample(self.ids[index], self.load_image(index), self.tags(index), self.load_mask(index))

    def label_vector(self, index: int) -> np.ndarray:
        """Multi-hot float32 over the C = num_classes - 1 foreground classes (column c-1 is class c)."""
        y = np.zeros(self.num_classes - 1, dtype=np.float32)
        for c in self.tags(index):
            y[c - 1] = 1.0
        return y


def checked_sample(dataset: SegmentationDataset, index: int) -> RawSample:
    """dataset[index], its mask checked against its image: a mask of another size than its image is a
    DataError naming the mask file (the engine's loaders all read samples through this)."""
    from wsss.io import DataError

    sample = dataset[index]
    if sample.mask is not None and sample.mask.shape != (sample.image.height, sample.image.width):
        mh, mw = sample.mask.shape
        where = getattr(dataset, "mask_path", None)
        path = (where(index) if where else None) or dataset.image_path(index)
        raise DataError(f"{path}: mask is {mw}x{mh} but its image is {sample.image.width}x{sample.image.height}")
    return sample
