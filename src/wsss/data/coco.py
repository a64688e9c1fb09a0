"""MS COCO 2014 (or 2017) through pycocotools; masks are rendered from the instance annotations.

Layout: root/train2014/, root/val2014/, root/annotations/instances_{train,val}2014.json. Split `train`
reads instances_train2014.json (else the one instances_train*.json there), `val` likewise; a full name
such as `val2014` works too. Category ids map to classes 1..80 in sorted id order, names from the file.

Masks: crowd regions are 255 (ignore), then non-crowd instances are drawn in annotation order, so a
later instance overwrites an earlier one and a labelled instance wins over a crowd region around it.
Tags come from the annotations (crowd ones included: the class is in the image) without decoding.
Images without any annotation are skipped in training splits (names starting with `train`): they carry
no tag to learn from; evaluation splits keep them (all background).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from wsss.data.base import SegmentationDataset
from wsss.io import IGNORE_INDEX, DataError


def find_annotation_file(root: str | Path, split: str) -> Path:
    ann_dir = Path(root) / "annotations"
    for name in (f"instances_{split}2014.json", f"instances_{split}.json"):
        if (ann_dir / name).is_file():
            return ann_dir / name
    matches = sorted(ann_dir.glob(f"instances_{split}*.json"))
    if matches:
        return matches[0]
    available = sorted(p.stem.removeprefix("instances_") for p in ann_dir.glob("instances_*.json"))
    raise DataError(
        f"{ann_dir}/instances_{split}2014.json: not found (available: {', '.join(available) or 'none'})"
    )


def coco_splits(root: str | Path) -> list[str]:
    """Split names a COCO root offers (`train`, `val` for the 2014 files, else the files' own names)."""
    out = []
    for p in sorted((Path(root) / "annotations").glob("instances_*.json")):
        name = p.stem.removeprefix("instances_")
        out.append(name[:-4] if name.endswith("2014") else name)
    return out


def _load_coco(path: Path):
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise DataError("COCO datasets need pycocotools: pip install 'wsss[coco]'") from None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            return COCO(str(path))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise DataError(f"{path}: cannot load COCO annotations ({e})") from None


class COCODataset(SegmentationDataset):
    def __init__(self, root: str | Path, split: str = "train", skip_empty: bool | None = None):
        self.root = str(root)
        self.split = split
        self.problems: list[str] = []
        self.annotation_file = find_annotation_file(root, split)
        self._image_dir = Path(root) / self.annotation_file.stem.removeprefix("instances_")
        if not self._image_dir.is_dir():
            raise DataError(f"{self._image_dir}: image folder not found (for {self.annotation_file.name})")
        self.coco = _load_coco(self.annotation_file)
        cat_ids = sorted(self.coco.getCatIds())
        self._cat_to_class = {c: k + 1 for k, c in enumerate(cat_ids)}
        self.class_names = ["background"] + [self.coco.cats[c]["name"] for c in cat_ids]
        if skip_empty is None:
            skip_empty = split.startswith("train")
        img_ids = sorted(self.coco.getImgIds())
        if skip_empty:
            img_ids = [i for i in img_ids if self.coco.imgToAnns.get(i)]
        if not img_ids:
            raise DataError(f"{self.annotation_file}: no images{' with annotations' if skip_empty else ''}")
        escaping = [
            name for name in (str(self.coco.imgs[i]["file_name"]) for i in img_ids)
            if Path(name).is_absolute() or ".." in Path(name.replace("\\", "/")).parts
        ]
        if escaping:  # the annotation file must not reach files outside the dataset root
            raise DataError(f"{self.annotation_file}: file_name must be inside {self._image_dir}, got: "
                            f"{', '.join(escaping[:5])}{' ...' if len(escaping) > 5 else ''}")
        self._img_ids = img_ids
        self.ids = [Path(self.coco.imgs[i]["file_name"]).stem for i in img_ids]
        self._tags = [
            sorted({self._cat_to_class[a["category_id"]] for a in self.coco.imgToAnns.get(i, [])})
            for i in img_ids
        ]

    @property
    def has_masks(self) -> bool:
        return True

    def image_path(self, index: int) -> str:
        return str(self._image_dir / self.coco.imgs[self._img_ids[index]]["file_name"])

    def tags(self, index: int) -> list[int]:
        return self._tags[index]

    def load_mask(self, index: int) -> np.ndarray:
        img = self.coco.imgs[self._img_ids[index]]
        mask = np.zeros((img["height"], img["width"]), dtype=np.uint8)
        anns = self.coco.imgToAnns.get(self._img_ids[index], [])
        # Crowd first so that instances drawn afterwards win over the ignore region.
        for ann in sorted(anns, key=lambda a: not a.get("iscrowd", 0)):
            try:
                m = self.coco.annToMask(ann).astype(bool)
            except Exception as e:  # pycocotools raises bare errors on malformed segmentations
                raise DataError(
                    f"{self.annotation_file}: annotation {ann.get('id')} of image "
                    f"{img['file_name']} cannot be rendered ({e})"
                ) from None
            if m.shape != mask.shape:
                raise DataError(
                    f"{self.annotation_file}: annotation {ann.get('id')} has mask size "
                    f"{m.shape} but image {img['file_name']} is {mask.shape}"
                )
            mask[m] = IGNORE_INDEX if ann.get("iscrowd", 0) else self._cat_to_class[ann["category_id"]]
        return mask
