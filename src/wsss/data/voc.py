"""PASCAL VOC 2012 and the VOC layout with custom classes (labelme's VOC export).

Layout (root = VOCdevkit/VOC2012 or an export folder):
  JPEGImages/<id>.jpg                    images (another image extension is accepted)
  SegmentationClassAug/<id>.png          masks, preferred per id when present (the augmented set)
  SegmentationClass/<id>.png             masks (palette or grayscale PNG, 255 = ignore)
  SegmentationClassPNG/<id>.png          masks as older labelme versions write them
  Annotations/<id>.xml                   object names -> tags (else tags come from the mask)
  ImageSets/Segmentation/<split>.txt     one id a line
  class_names.txt                        optional: one class name a line, line 0 the background

Split rule: `ImageSets/Segmentation/<split>.txt` when it exists; otherwise split `all` means every
image in JPEGImages/, and so does `train` when there are no split files at all (an export without
splits trains on everything); any other missing split is an error.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from wsss.data.base import SegmentationDataset
from wsss.io import IGNORE_INDEX, IMAGE_EXTENSIONS, DataError, read_mask

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip

MASK_DIRS = ("SegmentationClassAug", "SegmentationClass", "SegmentationClassPNG")
SPLIT_DIR = Path("ImageSets") / "Segmentation"


# ---------------------------------------------------------------------------------- helpers (shared)


def _short(items: list[str], n: int = 5) -> str:
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items)} in all)" if len(items) > n else "")


def list_images(folder: Path) -> dict[str, str]:
    """id (file stem) -> file name for the images directly in `folder`. When one stem has several
    extensions the first in IMAGE_EXTENSIONS order wins (.jpg before .png), so the choice is stable."""
    out: dict[str, str] = {}
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return out
    for name in names:
        stem, ext = os.path.splitext(name)
        ext = ext.lower()
        if ext not in rank or name.startswith("."):
            continue
        if stem not in out or rank[ext] < rank[os.path.splitext(out[stem])[1].lower()]:
            out[stem] = name
    return out


def list_stems(folder: Path, ext: str) -> set[str]:
    try:
        return {n[: -len(ext)] for n in os.listdir(folder) if n.endswith(ext) and not n.startswith(".")}
    except FileNotFoundError:
        return set()


def read_class_names(path: Path) -> list[str]:
    """One name a line, line 0 the background. Names keep inner spaces and slashes ("potted plant",
    "tv/monitor"); trailing blank lines are dropped, a blank line inside would shift every id after it."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except OSError as e:
        raise DataError(f"{path}: cannot read class names ({e.strerror or e})") from None
    while lines and not lines[-1]:
        lines.pop()
    if any(not line for line in lines):
        raise DataError(f"{path}: blank line {lines.index('') + 1} (class ids are line numbers)")
    if len(lines) < 2:
        raise DataError(f"{path}: needs the background on line 1 and at least one class after it")
    dupes = sorted({n for n in lines if lines.count(n) > 1})
    if dupes:
        raise DataError(f"{path}: duplicate class names: {_short(dupes)}")
    return lines


def read_split_file(path: Path, problems: list[str] | None = None) -> list[str]:
    """Ids of a split file: stripped, blanks skipped. An id that is a path (contains '/', '\\' or '..',
    or is absolute) is refused: a split file must not reach files outside the dataset root. Duplicates
    and an empty split are errors. With `problems` given, problems are appended there (and bad or
    repeated ids dropped) instead of raised, so `data check` can report them all."""
    try:
        raw = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except OSError as e:
        raise DataError(f"{path}: cannot read split file ({e.strerror or e})") from None
    found: list[str] = []

    def report(msg: str) -> None:
        if problems is None:
            raise DataError(msg)
        problems.append(msg)

    bad = [i for i in raw if i and ("/" in i or "\\" in i or ".." in i or os.path.isabs(i))]
    if bad:
        report(f"{path}: ids must be plain image ids (no paths), got: {_short(bad)}")
    seen: set[str] = set()
    dupes: list[str] = []
    for i in raw:
        if not i or i in bad:
            continue
        if i in seen:
            dupes.append(i)
            continue
        seen.add(i)
        found.append(i)
    if dupes:
        report(f"{path}: duplicate ids: {_short(sorted(set(dupes)))}")
    if not found:
        report(f"{path}: empty split (no image ids)")
    return found


def resolve_split(
    split_dir: Path, split: str, all_ids: list[str], problems: list[str] | None = None, ext: str = ".txt"
) -> tuple[list[str], Path | None]:
    """(ids, split file or None) by the rule in the module docstring."""
    path = split_dir / f"{split}{ext}"
    if path.is_file():
        return read_split_file(path, problems), path
    has_split_files = bool(list_stems(split_dir, ext))
    if split == "all" or (split == "train" and not has_split_files):
        if not all_ids:
            raise DataError(f"{split_dir.parent}: no images found")
        return list(all_ids), None
    available = sorted(list_stems(split_dir, ext)) + ["all"]
    raise DataError(f"{path}: split file not found (available splits: {', '.join(available)})")


def check_missing(
    ids: list[str],
    known: dict[str, str] | set[str],
    split_file: Path | None,
    what: str,
    problems: list[str] | None,
) -> list[str]:
    """Ids of a split that have no image: an error naming the split file and the ids."""
    missing = [i for i in ids if i not in known]
    if missing:
        msg = f"{split_file}: names {len(missing)} {what} that do not exist: {_short(missing)}"
        if problems is None:
            raise DataError(msg)
        problems.append(msg)
        ids = [i for i in ids if i in known]
    return ids


def tags_from_mask(mask: np.ndarray, num_classes: int, path: str | Path, class_source: str) -> list[int]:
    """Present foreground classes of a mask; values beyond the classes (other than 255) are an error."""
    counts = np.bincount(mask.ravel(), minlength=256)
    present = np.flatnonzero(counts)
    bad = [int(v) for v in present if num_classes <= v != IGNORE_INDEX]
    if bad:
        raise DataError(
            f"{path}: mask values {bad} outside the {num_classes} classes of {class_source}"
            f" (ids 0..{num_classes - 1}, 255 = ignore)"
        )
    return [int(v) for v in present if 0 < v < num_classes]


# --------------------------------------------------------------------------------------------- dataset


class VOCDataset(SegmentationDataset):
    """A VOC-layout dataset. `strict=False` (used by `data check`) records split problems in
    `self.problems` and drops the bad ids instead of raising."""

    def __init__(self, root: str | Path, split: str = "train", strict: bool = True):
        self.root = str(root)
        self.split = split
        self.problems: list[str] = []
        problems = None if strict else self.problems
        r = Path(root)
        self._image_dir = r / "JPEGImages"
        if not self._image_dir.is_dir():
            raise DataError(f"{self._image_dir}: not found (a VOC dataset has its images there)")
        names_file = r / "class_names.txt"
        if names_file.is_file():
            self.class_names = read_class_names(names_file)
            self._class_source = str(names_file)
        else:
            self.class_names = list(VOC_CLASSES)
            self._class_source = "PASCAL VOC (no class_names.txt)"
        self._images = list_images(self._image_dir)
        ids, self.split_file = resolve_split(r / SPLIT_DIR, split, sorted(self._images), problems)
        self.ids = check_missing(ids, self._images, self.split_file, "images", problems)
        # Per id, the first mask folder that has it (SegmentationClassAug also holds val in the
        # standard augmented set; falling back keeps a partly augmented root working).
        self._mask_dirs = [(r / d, list_stems(r / d, ".png")) for d in MASK_DIRS]
        self._ann_dir = r / "Annotations"
        self._xml = list_stems(self._ann_dir, ".xml")
        self._has_masks = any(i in stems for i in self.ids for _, stems in self._mask_dirs)
        self._tag_cache: dict[str, list[int]] = {}
        self._name_to_index = {n: k for k, n in enumerate(self.class_names)}
        self._name_to_index.update({n.lower(): k for k, n in enumerate(self.class_names)})

    @property
    def has_masks(self) -> bool:
        return self._has_masks

    def image_path(self, index: int) -> str:
        return str(self._image_dir / self._images[self.ids[index]])

    def mask_path(self, index: int) -> str | None:
        i = self.ids[index]
        for d, stems in self._mask_dirs:
            if i in stems:
                return str(d / f"{i}.png")
        return None

    def load_mask(self, index: int) -> np.ndarray | None:
        if not self._has_masks:
            return None
        path = self.mask_path(index)
        if path is None:
            raise DataError(
                f"{self._image_dir / self._images[self.ids[index]]}: no mask in {', '.join(MASK_DIRS)}"
            )
        mask = read_mask(path)
        tags = tags_from_mask(mask, self.num_classes, path, self._class_source)  # validates the values
        if self.ids[index] not in self._xml:  # tags come from the XML when there is one (see `tags`)
            self._tag_cache.setdefault(self.ids[index], tags)
        return mask

    def tags(self, index: int) -> list[int]:
        i = self.ids[index]
        if i in self._tag_cache:
            return self._tag_cache[i]
        if i in self._xml:
            tags = self._tags_from_xml(self._ann_dir / f"{i}.xml")
        elif self.mask_path(index) is not None:
            path = self.mask_path(index)
            tags = tags_from_mask(read_mask(path), self.num_classes, path, self._class_source)
        else:
            raise DataError(f"{self.image_path(index)}: no tags (neither Annotations/{i}.xml nor a mask)")
        self._tag_cache[i] = tags
        return tags

    def _tags_from_xml(self, path: Path) -> list[int]:
        try:
            tree = ET.parse(path)
        except (ET.ParseError, OSError) as e:
            raise DataError(f"{path}: cannot parse annotation XML ({e})") from None
        tags: set[int] = set()
        for name_el in tree.getroot().iter("object"):
            name = (name_el.findtext("name") or "").strip()
            k = self._name_to_index.get(name, self._name_to_index.get(name.lower()))
            if k is None:
                raise DataError(f"{path}: unknown object name {name!r} (not in {self._class_source})")
            if k > 0:
                tags.add(k)
        return sorted(tags)


def voc_splits(root: str | Path) -> list[str]:
    """The splits a VOC-layout root offers: its split files, else `all`."""
    return sorted(list_stems(Path(root) / SPLIT_DIR, ".txt")) or ["all"]
