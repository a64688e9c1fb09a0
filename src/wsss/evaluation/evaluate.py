"""Evaluate a folder of predicted masks (`<id>.png`) against a dataset split's ground truth."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss.evaluation.metrics import ConfusionMatrix
from wsss.io import DataError, read_mask


def evaluate_dir(
    pred_dir: str | Path,
    data_root: Any,
    split: str = "val",
    format: str = "auto",
    num_workers: int = 4,
) -> dict:
    """mIoU of the predictions in `pred_dir` over every id of `split` of the dataset at `data_root`.

    `data_root` may also be an opened `SegmentationDataset`. Returns a JSON-able dict: `miou` (a fraction),
    `per_class` {name: {iou, precision, recall}} (None where undefined), `pixel_accuracy`, `num_images`,
    `split`, `pred_dir`, and `protocol` (wsss.provenance): the folder's own (its summary.json, else its
    pseudo_label.json settings) with the evaluated split, or "unknown" fields for masks wsss did not write."""
    pred_dir = Path(pred_dir)
    if isinstance(data_root, (str, Path)):
        from wsss.data import open_dataset

        ds = open_dataset(data_root, split, format=format)
    else:
        ds = data_root
    if not ds.has_masks:
        raise DataError(
            f"{getattr(ds, 'root', data_root)}: split {split!r} has no ground-truth masks to evaluate"
        )
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder not found")
    paths = [pred_dir / f"{i}.png" for i in ds.ids]
    missing = [i for i, p in zip(ds.ids, paths, strict=True) if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(f"{pred_dir}: {len(missing)} of {len(ds.ids)} predictions missing ({shown})")

    def load(index: int) -> tuple[np.ndarray, np.ndarray]:
        pred, gt = read_mask(paths[index]), ds.load_mask(index)
        if gt is None:
            raise DataError(f"{ds.ids[index]}: no ground-truth mask")
        if pred.shape != gt.shape:
            raise DataError(
                f"{paths[index]}: prediction is {pred.shape[1]}x{pred.shape[0]} (WxH) but the ground truth"
                f" of {ds.ids[index]} is {gt.shape[1]}x{gt.shape[0]}"
            )
        # Writable copies (decoded PNGs are read-only buffers, which torch warns about), made in the worker.
        return np.array(pred), np.array(gt)

    cm = ConfusionMatrix(ds.num_classes)
    for pred, gt in _ordered_map(load, range(len(ds.ids)), num_workers):
        cm.update(torch.from_numpy(pred), torch.from_numpy(gt))
    return {
        **cm.as_json(ds.class_names),
        "num_images": len(ds.ids),
        "split": split,
        "pred_dir": str(pred_dir),
        "protocol": folder_protocol(pred_dir, split),
    }


def folder_protocol(pred_dir: str | Path, split: str) -> dict:
    """The protocol of a mask folder (see evaluate_dir), for `split`."""
    import json

    from wsss.provenance import unknown_protocol

    pred_dir = Path(pred_dir)

    def read(name: str):
        try:
            return json.loads((pred_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    summary = read("summary.json")
    if isinstance(summary, dict) and isinstance(summary.get("protocol"), dict):
        return {**summary["protocol"], "split": split}
    settings = read("pseudo_label.json")
    proto = unknown_protocol(split)
    if isinstance(settings, dict):  # older folders: what their settings tell
        crf = settings.get("crf_config") or {}
        proto.update(stage="crf" if settings.get("crf") else "seeds",
                     tags="predicted" if settings.get("predicted_tags") else "gt",
                     scales=settings.get("scales", "unknown"), flip=settings.get("flip", "unknown"),
                     crf=crf.get("preset") if settings.get("crf") else None)
    return proto


def _ordered_map(fn: Callable, items: Any, num_workers: int) -> Iterator:
    """`map(fn, items)` decoded in threads (PNG/JPEG decoding releases the GIL), in order, with a bounded
    number in flight so memory stays flat on 40k-image splits."""
    if num_workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(num_workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
