"""`wsss data check ROOT`: decode everything once and list every problem, never stopping at the first.

Reported: split files that are missing, empty, name missing images, contain duplicates or paths;
unreadable, truncated or fake images; masks that are unreadable, of another size than their image, or
hold values outside the classes (e.g. class_names.txt shorter than the masks need); images without a
tag source (no tags entry, no XML and no mask). An image with an empty tag list (background only) is
not a problem.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import ImageFile

from wsss.data import available_splits, detect_format, open_dataset
from wsss.data.base import SegmentationDataset
from wsss.io import DataError, read_image


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Truncated images must fail to load; another library may have switched PIL's leniency on."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _check_sample(ds: SegmentationDataset, index: int) -> list[str]:
    out: list[str] = []
    size = None
    try:
        size = read_image(ds.image_path(index)).size
    except DataError as e:
        out.append(str(e))
    if ds.has_masks:
        try:
            mask = ds.load_mask(index)
            if mask is not None and size is not None and mask.shape != (size[1], size[0]):
                where = getattr(ds, "mask_path", lambda i: None)(index) or ds.image_path(index)
                out.append(
                    f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"{os.path.basename(ds.image_path(index))} is {size[0]}x{size[1]}"
                )
        except DataError as e:
            out.append(str(e))
    try:
        ds.tags(index)
    except DataError as e:
        out.append(str(e))
    return out


def check_dataset(
    root: str | Path,
    format: str = "auto",
    splits: Sequence[str] | None = None,
    tags_file: str = "",
    workers: int = 0,
) -> list[str]:
    """Every problem found, each "PATH: problem" (empty list = clean). `splits` defaults to all the
    splits the dataset offers. Images in several splits are decoded once. Decoding runs on `workers`
    threads (0: up to 8; PIL releases the GIL while decoding)."""
    problems: list[str] = []
    try:
        fmt = detect_format(root) if format == "auto" else format
        names = list(splits) if splits else available_splits(root, fmt)
    except DataError as e:
        return [str(e)]
    seen: set[str] = set()
    workers = workers or min(8, os.cpu_count() or 1)
    with _strict_decoding(), ThreadPoolExecutor(max_workers=workers) as pool:
        for split in names:
            try:
                ds = open_dataset(root, split, fmt, tags_file=tags_file, strict=False)
            except DataError as e:
                problems.append(str(e))
                continue
            problems.extend(getattr(ds, "problems", []))
            todo = []
            for i in range(len(ds)):
                path = ds.image_path(i)
                if path not in seen:
                    seen.add(path)
                    todo.append(i)
            for found in pool.map(lambda i, ds=ds: _check_sample(ds, i), todo):
                problems.extend(found)
    return list(dict.fromkeys(problems))  # one message once, in the order found
