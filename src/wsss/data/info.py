"""`wsss data info ROOT`: what a dataset holds, as a JSON-ready dict (no image is decoded; tags from
masks read the masks once)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from wsss.data import available_splits, detect_format, open_dataset


def dataset_info(root: str | Path, format: str = "auto", tags_file: str = "") -> dict:
    """{"root", "format", "classes", "num_classes", "splits": {name: num_images}, "num_images" (unique
    over the splits), "has_masks", "tag_counts": {class: images}, "images_per_num_tags": {"k": images},
    "tags": {image_id: [class names]}}; tags are over the union of the splits. Raises DataError."""
    fmt = detect_format(root) if format == "auto" else format
    splits: dict[str, int] = {}
    tags: dict[str, list[int]] = {}
    class_names: list[str] = []
    has_masks = False
    for split in available_splits(root, fmt):
        ds = open_dataset(root, split, fmt, tags_file=tags_file)
        class_names = ds.class_names
        splits[split] = len(ds)
        has_masks = has_masks or ds.has_masks
        for i, image_id in enumerate(ds.ids):
            if image_id not in tags:
                tags[image_id] = ds.tags(i)
    counts = Counter(c for t in tags.values() for c in t)
    per_num = Counter(len(t) for t in tags.values())
    return {
        "root": str(root),
        "format": fmt,
        "classes": list(class_names),
        "num_classes": len(class_names),
        "splits": splits,
        "num_images": len(tags),
        "has_masks": has_masks,
        "tag_counts": {name: counts.get(k, 0) for k, name in enumerate(class_names) if k > 0},
        "images_per_num_tags": {str(k): per_num[k] for k in sorted(per_num)},
        "tags": {i: [class_names[c] for c in t] for i, t in sorted(tags.items())},
    }


def format_info(info: dict) -> str:
    """A person's summary of `dataset_info` (everything but the per-image tags)."""
    splits = ", ".join(f"{k} {v}" for k, v in info["splits"].items())
    width = max((len(n) for n in info["tag_counts"]), default=0)
    lines = [
        f"{info['root']} ({info['format']})",
        f"  images: {info['num_images']} unique; splits: {splits}; masks: {'yes' if info['has_masks'] else 'no'}",
        f"  classes: {info['num_classes']} (background: {info['classes'][0]!r})"
        if info["classes"]
        else "  classes: 0",
        "  images per class:",
        *(f"    {name:<{width}}  {n}" for name, n in info["tag_counts"].items()),
        "  images by number of tags: "
        + ", ".join(f"{k}: {v}" for k, v in info["images_per_num_tags"].items()),
    ]
    return "\n".join(lines)
