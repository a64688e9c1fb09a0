"""Shared fixtures: tiny datasets on disk, made of real JPEG/PNG files.

Import the builders from other test files with `from conftest import make_voc_dataset` (pytest puts
tests/ on sys.path). Every builder is deterministic: `default_objects(ids, num_fg)` tells which class
rectangles each image holds, so a test knows the expected tags and masks. Image pixels carry the
colour `class_colour(c)` of the class under them (VOC palette colours), so alignment can be checked.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.data.voc import VOC_CLASSES
from wsss.io import voc_palette

# One intra-op thread: the suite's models are tiny, and on a 2-core machine torch's thread pool
# fighting with the other process (a worker, a second rank) slows steps down 5-20x.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _threads():
    """Every test starts at one thread (as the subprocesses, OMP_NUM_THREADS=1: bit-identical CPU
    results), whatever the test before it set."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """engine_fakes' small two-class VOC-layout dataset, once per test module."""
    from engine_fakes import make_voc

    return make_voc(tmp_path_factory.mktemp("voc"))

def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run `wsss ARGS` in-process as a user would: (exit code, stdout, stderr)."""
    from wsss import cli

    monkeypatch.setattr(sys, "argv", ["wsss", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


def class_colour(c: int) -> tuple[int, int, int]:
    p = voc_palette()
    return (p[3 * c], p[3 * c + 1], p[3 * c + 2]) if c else (40, 40, 40)


def default_objects(
    ids: list[str], num_fg: int, size: tuple[int, int] = (40, 30)
) -> dict[str, list[tuple[int, Box]]]:
    """Image k: class 1 + k % num_fg in its left part; odd k also class 1 + (k+1) % num_fg on the right."""
    w, h = size
    out = {}
    for k, i in enumerate(ids):
        objs = [(1 + k % num_fg, (2, 3, w // 2 - 2, h - 4))]
        if k % 2 == 1 and num_fg > 1:
            objs.append((1 + (k + 1) % num_fg, (w // 2 + 2, 4, w - 3, h - 3)))
        out[i] = objs
    return out


def render(
    objects: list[tuple[int, Box]], size: tuple[int, int], border: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image uint8 [H,W,3], mask uint8 [H,W]) with each rectangle in its class colour; with
    `border`, a 1-pixel 255 ring (VOC's ignore band) around every object in the mask."""
    w, h = size
    image = np.empty((h, w, 3), np.uint8)
    image[:] = class_colour(0)
    mask = np.zeros((h, w), np.uint8)
    for c, (x0, y0, x1, y1) in objects:
        if border:
            mask[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = 255
        image[y0:y1, x0:x1] = class_colour(c)
        mask[y0:y1, x0:x1] = c
    return image, mask


def write_image(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opts = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(image).save(path, **opts)
    return path


def write_mask_png(path: Path, mask: np.ndarray, palette: bool = True) -> Path:
    """A palette PNG (as VOC and labelme write masks) or a grayscale one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    if palette:
        im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
        im.putpalette(voc_palette())
    else:
        im = Image.fromarray(mask, mode="L")
    im.save(path)
    return path


def _voc_xml(image_id: str, size: tuple[int, int], names: list[str]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
        f"<xmax>2</xmax><ymax>2</ymax></bndbox></object>"
        for n in names
    )
    return (
        f"<annotation><filename>{image_id}.jpg</filename><size><width>{size[0]}</width>"
        f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>"
    )


def make_voc_dataset(
    tmp_path: Path,
    n: int = 4,
    ids: list[str] | None = None,
    class_names: list[str] | None = None,
    objects: dict | None = None,
    size: tuple[int, int] = (40, 30),
    splits: dict[str, list[str]] | None | str = "default",
    xml: bool = False,
    aug: bool = False,
    palette: bool = True,
    border: bool = True,
    name: str = "voc",
) -> Path:
    """A VOC-layout dataset under tmp_path/name. `class_names` None: the 21 PASCAL VOC classes and no
    class_names.txt; a list: written to class_names.txt (line 0 the background). `splits` "default":
    train = first half, val = the rest; None: no ImageSets folder. `xml`: Annotations/<id>.xml. `aug`:
    masks in SegmentationClassAug/ plus a train_aug split (all ids) instead of SegmentationClass/."""
    root = tmp_path / name
    ids = ids or [f"2007_{k:06d}" for k in range(n)]
    names = class_names or VOC_CLASSES
    objects = objects or default_objects(ids, len(names) - 1, size)
    for i in ids:
        image, mask = render(objects[i], size, border)
        write_image(root / "JPEGImages" / f"{i}.jpg", image)
        write_mask_png(
            root / ("SegmentationClassAug" if aug else "SegmentationClass") / f"{i}.png", mask, palette
        )
        if xml:
            (root / "Annotations").mkdir(parents=True, exist_ok=True)
            (root / "Annotations" / f"{i}.xml").write_text(
                _voc_xml(i, size, [names[c] for c, _ in objects[i]])
            )
    if class_names is not None:
        (root / "class_names.txt").write_text("\n".join(class_names) + "\n\n")
    if splits == "default":
        half = max(1, len(ids) // 2)
        splits = {"train": ids[:half], "val": ids[half:]}
        if aug:
            splits["train_aug"] = list(ids)
    if splits:
        d = root / "ImageSets" / "Segmentation"
        d.mkdir(parents=True, exist_ok=True)
        for s, members in splits.items():
            (d / f"{s}.txt").write_text("".join(f"{m}\n" for m in members))
    return root


def make_folder_dataset(
    tmp_path: Path,
    n: int = 4,
    classes: list[str] | None = None,
    tags_format: str = "csv",
    masks: bool = False,
    classes_file: bool = False,
    size: tuple[int, int] = (40, 30),
    name: str = "folder",
) -> Path:
    """A plain folder: images/<id>.png, tags.csv (`image,tags` with ';') or tags.json, optional
    masks/ and classes.txt. Classes default to ["cat", "dog", "potted plant"]."""
    root = tmp_path / name
    classes = classes or ["cat", "dog", "potted plant"]
    ids = [f"img{k}" for k in range(n)]
    objects = default_objects(ids, len(classes), size)
    tags = {}
    for i in ids:
        image, mask = render(objects[i], size, border=False)
        write_image(root / "images" / f"{i}.png", image)
        if masks:
            write_mask_png(root / "masks" / f"{i}.png", mask)
        tags[f"{i}.png"] = sorted({classes[c - 1] for c, _ in objects[i]})
    if tags_format == "csv":
        with open(root / "tags.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "tags"])
            for k, v in tags.items():
                w.writerow([k, ";".join(v)])
    else:
        (root / "tags.json").write_text(json.dumps({Path(k).stem: v for k, v in tags.items()}))
    if classes_file:
        (root / "classes.txt").write_text("\n".join(["background", *classes]) + "\n")
    return root


def make_coco_dataset(tmp_path: Path, name: str = "coco") -> Path:
    """COCO 2014 layout with 3 images per split and 3 categories (ids 1, 3, 18 -> classes 1, 2, 3):
    image 1: a person polygon and a dog polygon overlapping it (dog drawn later wins);
    image 2: a car polygon and a crowd (RLE) of persons; image 3: no annotation."""
    root = tmp_path / name
    cats = [
        {"id": 18, "name": "dog", "supercategory": "animal"},
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
    ]
    from pycocotools import mask as mask_utils

    for split in ("train2014", "val2014"):
        images = []
        for k in (1, 2, 3):
            fname = f"COCO_{split}_{k:012d}.jpg"
            write_image(root / split / fname, np.full((30, 40, 3), 60 * k, np.uint8))
            images.append({"id": k, "file_name": fname, "width": 40, "height": 30})
        crowd = np.zeros((30, 40), np.uint8, order="F")
        crowd[20:28, 0:10] = 1
        rle = mask_utils.encode(np.asfortranarray(crowd))
        rle = {
            "size": list(rle["size"]),
            "counts": rle["counts"].decode("ascii"),
        }  # compressed RLE, as COCO stores crowds
        anns = [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "area": 100.0,
                "bbox": [0, 0, 20, 20],
                "segmentation": [[0, 0, 20, 0, 20, 20, 0, 20]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 18,
                "iscrowd": 0,
                "area": 100.0,
                "bbox": [10, 10, 20, 15],
                "segmentation": [[10, 10, 30, 10, 30, 25, 10, 25]],
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 3,
                "iscrowd": 0,
                "area": 100.0,
                "bbox": [20, 5, 15, 10],
                "segmentation": [[20, 5, 35, 5, 35, 15, 20, 15]],
            },
            {
                "id": 4,
                "image_id": 2,
                "category_id": 1,
                "iscrowd": 1,
                "area": 80.0,
                "bbox": [0, 20, 10, 8],
                "segmentation": rle,
            },
        ]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )
    return root


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    """A 4-image PASCAL-VOC-classes dataset with train/val splits and palette masks."""
    return make_voc_dataset(tmp_path)


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    return make_folder_dataset(tmp_path)


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    return make_coco_dataset(tmp_path)
