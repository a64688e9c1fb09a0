"""Datasets: PASCAL VOC (and the VOC layout with custom classes), MS COCO 2014, a plain folder.

`open_dataset(root, split)` is the one entry point; the formats share the interface in `base.py`.
Transforms live in `wsss.data.transforms` (imported on demand: it pulls in torch).
"""

from __future__ import annotations

from pathlib import Path

from wsss.data.base import RawSample, SegmentationDataset
from wsss.io import DataError

FORMATS = ("voc", "coco", "folder")

__all__ = ["FORMATS", "RawSample", "SegmentationDataset", "available_splits", "detect_format", "open_dataset"]


def detect_format(root: str | Path) -> str:
    """`coco` when annotations/instances_*.json exist, `voc` when JPEGImages/ does, else `folder`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if any((root / "annotations").glob("instances_*.json")):
        return "coco"
    if (root / "JPEGImages").is_dir():
        return "voc"
    return "folder"


def _resolve_format(root: str | Path, format: str) -> str:
    fmt = detect_format(root) if format == "auto" else format
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {format!r} (choose auto, {', '.join(FORMATS)})")
    return fmt


def open_dataset(
    root: str | Path, split: str, format: str = "auto", tags_file: str = "", strict: bool = True
) -> SegmentationDataset:
    """Open split `split` of the dataset at `root`. `strict=False` (VOC, folder) records split-file
    problems in `dataset.problems` and drops the bad ids instead of raising; `data check` uses it."""
    fmt = _resolve_format(root, format)
    if fmt == "voc":
        from wsss.data.voc import VOCDataset

        return VOCDataset(root, split, strict=strict)
    if fmt == "coco":
        from wsss.data.coco import COCODataset

        return COCODataset(root, split)
    from wsss.data.folder import FolderDataset

    return FolderDataset(root, split, tags_file=tags_file, strict=strict)


def available_splits(root: str | Path, format: str = "auto") -> list[str]:
    """The split names a dataset offers (VOC: its split files or `all`; COCO: its annotation files;
    folder: `all` plus splits/*.txt)."""
    fmt = _resolve_format(root, format)
    if fmt == "voc":
        from wsss.data.voc import voc_splits

        return voc_splits(root)
    if fmt == "coco":
        from wsss.data.coco import coco_splits

        return coco_splits(root)
    from wsss.data.folder import folder_splits

    return folder_splits(root)
