"""A plain folder of images with a tags file: the user's own data.

Layout:
  images/ (or the root itself)        the images; an image's id is its file stem
  tags.csv | tags.json                tags (or `tags_file`, relative to the root or absolute)
  classes.txt | class_names.txt       optional: one name a line, line 0 the background;
                                      default: "background" + the sorted union of all tags
  masks/<id>.png                      optional class-id masks (then evaluation is possible)
  splits/<split>.txt                  optional split files (ids or file names)

tags.csv: the first cell of a row names the image (file name or id), every further cell holds class
names separated by ';' or '|' (so both `image,tags` with "cat;person" and one name per column work).
A header row (first cell image/filename/file/id) is skipped; a header with class names over 0/1 cells
is read as a one-hot table. tags.json: {"image id or file name": ["cat", "person"], ...}.
With no tags file but masks and a classes file, tags come from the masks.
Splits follow the VOC rule (wsss.data.voc): `all` = every image, `train` too when there is no
splits/ folder, otherwise splits/<split>.txt.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from wsss.data.base import SegmentationDataset
from wsss.data.voc import (
    _short,
    check_missing,
    list_images,
    list_stems,
    read_class_names,
    resolve_split,
    tags_from_mask,
)
from wsss.io import DataError, read_mask

_HEADER_KEYS = {"image", "images", "filename", "file", "file_name", "id", "image_id", "name", "path"}


def _read_tags_csv(path: Path) -> dict[str, list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [[c.strip() for c in row] for row in csv.reader(f) if any(c.strip() for c in row)]
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read tags CSV ({e})") from None
    if rows and rows[0] and rows[0][0].lower() in _HEADER_KEYS:
        header, rows = rows[0], rows[1:]
        one_hot = (len(header) > 2 or (len(header) == 2 and header[1].lower() != "tags")) and all(
            c in ("0", "1", "") for row in rows for c in row[1:]
        )
        if one_hot and rows:
            return {row[0]: [header[k] for k, c in enumerate(row) if k > 0 and c == "1"] for row in rows}
    out: dict[str, list[str]] = {}
    for row in rows:
        names = [t.strip() for cell in row[1:] for t in re.split(r"[;|]", cell) if t.strip()]
        out.setdefault(row[0], []).extend(names)
    return out


def _read_tags_json(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read tags JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object {{image: [class names]}}, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        if isinstance(value, str):
            value = [t for t in re.split(r"[;|]", value)]
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise DataError(f"{path}: tags of {key!r} must be a list of class names")
        out[key] = [t.strip() for t in value if t.strip()]
    return out


def find_tags_file(root: Path, tags_file: str = "") -> Path | None:
    if tags_file:
        p = Path(tags_file)
        p = p if p.is_absolute() or not (root / p).exists() else root / p
        if not p.is_file():
            raise DataError(f"{p}: tags file not found")
        return p
    for name in ("tags.csv", "tags.json"):
        if (root / name).is_file():
            return root / name
    return None


class FolderDataset(SegmentationDataset):
    def __init__(self, root: str | Path, split: str = "all", tags_file: str = "", strict: bool = True):
        self.root = str(root)
        self.split = split
        self.problems: list[str] = []
        r = Path(root)
        if not r.is_dir():
            raise DataError(f"{r}: dataset folder not found")
        self._image_dir = r / "images" if (r / "images").is_dir() else r
        self._images = list_images(self._image_dir)
        if not self._images:
            raise DataError(f"{self._image_dir}: no images found")
        self._mask_dir = r / "masks"
        self._masks = list_stems(self._mask_dir, ".png")
        classes_file = next((r / n for n in ("classes.txt", "class_names.txt") if (r / n).is_file()), None)
        self.tags_file = find_tags_file(r, tags_file)
        if self.tags_file is None and not (self._masks and classes_file):
            raise DataError(
                f"{r}: no tags.csv or tags.json (and no masks/ with a classes.txt to read tags from)"
            )

        raw: dict[str, list[str]] = {}
        if self.tags_file is not None:
            reader = _read_tags_json if self.tags_file.suffix.lower() == ".json" else _read_tags_csv
            by_name = {name: stem for stem, name in self._images.items()}
            for key, names in reader(self.tags_file).items():
                k = Path(key.replace("\\", "/")).name
                stem = by_name.get(k, k if k in self._images else None)
                if stem is not None:
                    raw.setdefault(stem, []).extend(names)
        self._raw_tags = raw

        if classes_file is not None:
            self.class_names = read_class_names(classes_file)
            self._class_source = str(classes_file)
        else:
            union = sorted({n for names in raw.values() for n in names} - {"background"})
            self.class_names = ["background"] + union
            self._class_source = f"the tags of {self.tags_file}"
        self._name_to_index = {n: k for k, n in enumerate(self.class_names)}

        def to_id(i: str) -> str:  # split files may name files instead of ids
            return i if i in self._images else Path(i).stem if Path(i).stem in self._images else i

        ids, self.split_file = resolve_split(
            r / "splits", split, sorted(self._images), None if strict else self.problems
        )
        self.ids = check_missing(
            [to_id(i) for i in ids],
            self._images,
            self.split_file,
            "images",
            None if strict else self.problems,
        )
        self._mask_cache: dict[str, list[int]] = {}

    @property
    def has_masks(self) -> bool:
        return bool(self._masks)

    def image_path(self, index: int) -> str:
        return str(self._image_dir / self._images[self.ids[index]])

    def mask_path(self, index: int) -> str | None:
        i = self.ids[index]
        return str(self._mask_dir / f"{i}.png") if i in self._masks else None

    def load_mask(self, index: int) -> np.ndarray | None:
        if not self._masks:
            return None
        path = self.mask_path(index)
        if path is None:
            raise DataError(f"{self._mask_dir / (self.ids[index] + '.png')}: mask not found")
        mask = read_mask(path)
        self._mask_cache.setdefault(
            self.ids[index], tags_from_mask(mask, self.num_classes, path, self._class_source)
        )
        return mask

    def tags(self, index: int) -> list[int]:
        i = self.ids[index]
        if self.tags_file is None:  # tags from the masks
            if i not in self._mask_cache:
                self.load_mask(index)
            return self._mask_cache[i]
        if i not in self._raw_tags:
            raise DataError(f"{self.tags_file}: no tags for image {self._images[i]}")
        names = [n for n in self._raw_tags[i] if n.lower() != "background"]
        unknown = [n for n in names if n not in self._name_to_index]
        if unknown:
            raise DataError(
                f"{self.tags_file}: image {self._images[i]} has unknown class names "
                f"{_short(unknown)} (not in {self._class_source})"
            )
        return sorted({self._name_to_index[n] for n in names} - {0})


def folder_splits(root: str | Path) -> list[str]:
    return ["all"] + sorted(list_stems(Path(root) / "splits", ".txt") - {"all"})
