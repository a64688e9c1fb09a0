"""`wsss data prepare voc|coco`: turn downloaded archives into the layout the loaders read.

VOC: the augmented training set of the WSSS literature. From an extracted VOCdevkit/VOC2012 and,
optionally, SBD (benchmark_RELEASE/dataset/cls/*.mat), write SegmentationClassAug/<id>.png (the VOC mask
where VOC has one, else the SBD mask) and ImageSets/Segmentation/train_aug.txt = (SBD train + SBD val +
VOC train) - VOC val (10,582 images with the full SBD). Masks are written before the split file, each
atomically, and existing masks are kept, so an interrupted run is finished by running it again.

COCO: masks are rendered on the fly from the instance annotations, so there is nothing to convert;
`prepare_coco` validates the layout and reports what is there.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from wsss.data.voc import SPLIT_DIR, _short, list_images, list_stems, read_split_file
from wsss.io import DataError, atomic_write_text, read_mask, write_mask


def _find_dir(root: Path, candidates: list[Path], marker: str, what: str) -> Path:
    for d in candidates:
        if (d / marker).is_dir():
            return d
    raise DataError(
        f"{root}: no {marker}/ found here or in {', '.join(str(c.relative_to(root)) for c in candidates[1:])} ({what})"
    )


def read_sbd_mask(path: str | Path) -> np.ndarray:
    """The class mask of an SBD cls/<id>.mat (GTcls.Segmentation: 0 background, 1..20 classes)."""
    from scipy.io import loadmat

    try:
        seg = loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise DataError(f"{path}: cannot read SBD mask ({e})") from None
    seg = np.asarray(seg)
    if seg.ndim != 2 or seg.size == 0 or seg.max() > 255 or seg.min() < 0:
        raise DataError(f"{path}: SBD mask is not a 2-D array of class ids")
    return seg.astype(np.uint8)


def prepare_voc(root: str | Path, sbd_root: str | Path | None = None, workers: int = 0) -> dict:
    """Write SegmentationClassAug/ and train_aug.txt under the VOC2012 folder (`root` may also be the
    VOCdevkit folder or its parent; `sbd_root` may be benchmark_RELEASE, its parent or its dataset/).
    Returns a summary dict. Ids without an image or any mask are left out of train_aug and listed."""
    given = Path(root)
    voc = _find_dir(
        given,
        [given, given / "VOC2012", given / "VOCdevkit" / "VOC2012"],
        "JPEGImages",
        "expected an extracted VOCdevkit/VOC2012",
    )
    split_dir = voc / SPLIT_DIR
    voc_train = read_split_file(split_dir / "train.txt")
    voc_val = read_split_file(split_dir / "val.txt")
    images = list_images(voc / "JPEGImages")
    voc_masks = list_stems(voc / "SegmentationClass", ".png")

    sbd_dir, sbd_mats, sbd_ids = None, set(), set()
    if sbd_root is not None:
        s = Path(sbd_root)
        sbd_dir = _find_dir(
            s,
            [s, s / "dataset", s / "benchmark_RELEASE" / "dataset"],
            "cls",
            "expected SBD's benchmark_RELEASE/dataset",
        )
        sbd_mats = list_stems(sbd_dir / "cls", ".mat")
        for name in ("train.txt", "val.txt"):
            if (sbd_dir / name).is_file():
                sbd_ids |= set(read_split_file(sbd_dir / name))
        sbd_ids = sbd_ids or set(sbd_mats)  # no split files: every SBD mask

    wanted = (sbd_ids | set(voc_train)) - set(voc_val)
    out_dir = voc / "SegmentationClassAug"
    existing = list_stems(out_dir, ".png")
    skipped = sorted(
        i for i in wanted | set(voc_val) if i not in images or (i not in voc_masks and i not in sbd_mats)
    )
    todo = sorted((wanted | set(voc_val)) - set(skipped))

    def convert(i: str) -> str:
        if i in existing:
            return "existing"
        if i in voc_masks:
            write_mask(out_dir / f"{i}.png", read_mask(voc / "SegmentationClass" / f"{i}.png"))
            return "voc"
        write_mask(out_dir / f"{i}.png", read_sbd_mask(sbd_dir / "cls" / f"{i}.mat"))
        return "sbd"

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        kinds = list(pool.map(convert, todo))
    train_aug = sorted(wanted - set(skipped))
    if not train_aug:
        raise DataError(f"{voc}: no training image with a mask (train_aug would be empty)")
    # The split file last: it exists only once every mask it names has been written.
    atomic_write_text(split_dir / "train_aug.txt", "\n".join(train_aug) + "\n")
    return {
        "root": str(voc),
        "sbd_root": str(sbd_dir) if sbd_dir else None,
        "mask_dir": str(out_dir),
        "split_file": str(split_dir / "train_aug.txt"),
        "train_aug": len(train_aug),
        "val": len(voc_val),
        "masks_from_voc": kinds.count("voc"),
        "masks_from_sbd": kinds.count("sbd"),
        "masks_existing": kinds.count("existing"),
        "skipped": skipped,
    }


def prepare_coco(root: str | Path) -> dict:
    """Validate a COCO 2014 root (train2014/, val2014/, annotations/instances_*2014.json) and report
    image and annotation counts, images without annotations and image files that are missing."""
    from wsss.data.coco import find_annotation_file

    root = Path(root)
    report: dict = {"root": str(root), "splits": {}, "problems": []}
    try:
        import pycocotools  # noqa: F401

        report["pycocotools"] = True
    except ImportError:
        report["pycocotools"] = False
        report["problems"].append("pycocotools is not installed: pip install 'wsss[coco]'")
    for split in ("train", "val"):
        try:
            ann = find_annotation_file(root, split)
        except DataError as e:
            report["problems"].append(str(e))
            continue
        image_dir = root / ann.stem.removeprefix("instances_")
        try:
            data = json.loads(ann.read_text(encoding="utf-8"))
            images, anns, cats = data["images"], data["annotations"], data["categories"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            report["problems"].append(f"{ann}: not a COCO instances file ({e})")
            continue
        files = set(os.listdir(image_dir)) if image_dir.is_dir() else set()
        if not image_dir.is_dir():
            report["problems"].append(f"{image_dir}: image folder not found")
        missing = [im["file_name"] for im in images if im["file_name"] not in files]
        if missing and files:
            report["problems"].append(
                f"{image_dir}: {len(missing)} images of {ann.name} are missing: {_short(missing)}"
            )
        annotated = {a["image_id"] for a in anns}
        report["splits"][split] = {
            "annotation_file": str(ann),
            "image_dir": str(image_dir),
            "images": len(images),
            "images_with_annotations": sum(im["id"] in annotated for im in images),
            "annotations": len(anns),
            "crowd_annotations": sum(bool(a.get("iscrowd", 0)) for a in anns),
            "categories": len(cats),
            "missing_files": len(missing),
        }
    if not report["splits"]:
        raise DataError(
            f"{root}: no COCO annotations/instances_*.json found ({'; '.join(report['problems'])})"
        )
    return report
