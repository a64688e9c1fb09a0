"""`data check` finds every problem in one run; `data info` counts tags right."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import make_coco_dataset, make_folder_dataset, make_voc_dataset, write_mask_png
from wsss.data.check import check_dataset
from wsss.data.info import dataset_info, format_info


def test_clean_datasets_have_no_problems(tmp_path):
    assert check_dataset(make_voc_dataset(tmp_path, n=4, xml=True)) == []
    assert (
        check_dataset(
            make_voc_dataset(tmp_path, n=3, class_names=["bg", "a b", "c/d"], splits=None, name="custom")
        )
        == []
    )
    assert check_dataset(make_folder_dataset(tmp_path, masks=True)) == []
    pytest.importorskip("pycocotools")
    assert check_dataset(make_coco_dataset(tmp_path)) == []


def test_check_finds_every_problem_in_one_run(tmp_path):
    ids = [f"2007_{k:06d}" for k in range(8)]
    root = make_voc_dataset(tmp_path, ids=ids, splits={"train": ids[:4], "val": ids[4:]})
    jpg, seg, sets = root / "JPEGImages", root / "SegmentationClass", root / "ImageSets" / "Segmentation"
    noise = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(jpg / "2007_000000.jpg", quality=95)  # scan data well past the header
    data = (jpg / "2007_000000.jpg").read_bytes()
    (jpg / "2007_000000.jpg").write_bytes(data[: len(data) * 3 // 4])  # truncated JPEG
    (jpg / "2007_000001.jpg").unlink()
    (jpg / "2007_000001.png").write_text("I am not a PNG")  # fake image
    (seg / "2007_000002.png").write_text("nor am I")  # fake mask
    write_mask_png(seg / "2007_000003.png", np.zeros((20, 20), np.uint8))  # wrong size
    bad = np.zeros((30, 40), np.uint8)
    bad[5, 5] = 42
    write_mask_png(seg / "2007_000004.png", bad)  # value outside the 21 classes
    (seg / "2007_000005.png").unlink()  # no mask, no XML: no tags either
    (sets / "val.txt").write_text("\n".join(ids[4:] + ["2007_000004", "2011_999999", "../outside"]) + "\n")
    (sets / "test.txt").write_text("\n\n")

    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as another library may leave it: check must override it
    try:
        problems = check_dataset(root)
    finally:
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    text = "\n".join(problems)

    expected = [
        r"2007_000000.jpg: corrupt or truncated image",
        r"2007_000001.png: not an image",
        r"2007_000002.png: not an image",
        r"2007_000003.png: mask is 20x20 but its image 2007_000003.jpg is 40x30",
        r"2007_000004.png: mask values [42] outside the 21 classes",
        r"2007_000005.jpg: no mask in",
        r"2007_000005.jpg: no tags",
        r"val.txt: names 1 images that do not exist: 2011_999999",
        r"val.txt: duplicate ids: 2007_000004",
        r"val.txt: ids must be plain image ids (no paths), got: ../outside",
        r"test.txt: empty split",
    ]
    for e in expected:
        assert e in text, f"missing {e!r} in:\n{text}"
    assert len(problems) == len(expected), text
    assert all(p.startswith(str(root)) for p in problems)  # each names its file


def test_check_class_names_shorter_than_masks(tmp_path):
    root = make_voc_dataset(tmp_path, n=4, class_names=["bg", "a", "b", "c"], splits=None)
    (root / "class_names.txt").write_text("bg\na\nb\n")
    problems = check_dataset(root)
    assert len(problems) == 2 and all(
        "mask values [3] outside the 3 classes of" in p and "class_names.txt" in p for p in problems
    )


def test_check_folder_images_without_tags(tmp_path):
    root = make_folder_dataset(tmp_path, n=3)
    (root / "tags.csv").write_text("image,tags\nimg0.png,cat\n")
    problems = check_dataset(root)
    assert problems == [
        f"{root / 'tags.csv'}: no tags for image img1.png",
        f"{root / 'tags.csv'}: no tags for image img2.png",
    ]


def test_check_missing_root(tmp_path):
    assert check_dataset(tmp_path / "nope") == [f"{tmp_path / 'nope'}: dataset folder not found"]


def test_dataset_info(tmp_path):
    root = make_voc_dataset(tmp_path, n=4, class_names=["bg", "cat", "potted plant", "tv/monitor"])
    info = dataset_info(root)
    json.dumps(info)
    assert info["format"] == "voc" and info["num_classes"] == 4 and info["has_masks"]
    assert info["splits"] == {"train": 2, "val": 2} and info["num_images"] == 4
    assert info["tags"] == {
        "2007_000000": ["cat"],
        "2007_000001": ["potted plant", "tv/monitor"],
        "2007_000002": ["tv/monitor"],
        "2007_000003": ["cat", "potted plant"],
    }
    assert info["tag_counts"] == {"cat": 2, "potted plant": 2, "tv/monitor": 2}
    assert info["images_per_num_tags"] == {"1": 2, "2": 2}
    text = format_info(info)
    assert "images: 4 unique; splits: train 2, val 2; masks: yes" in text and "tv/monitor" in text


def test_dataset_info_folder_and_coco(tmp_path):
    info = dataset_info(make_folder_dataset(tmp_path, n=4, tags_format="json"))
    assert info["format"] == "folder" and info["splits"] == {"all": 4} and not info["has_masks"]
    assert info["tags"]["img1"] == ["dog", "potted plant"]
    pytest.importorskip("pycocotools")
    info = dataset_info(make_coco_dataset(tmp_path))
    assert info["splits"] == {"train": 2, "val": 3} and info["num_images"] == 5
    assert info["tags"]["COCO_train2014_000000000002"] == ["person", "car"]
    assert info["tag_counts"] == {"person": 4, "car": 2, "dog": 2}
    assert info["images_per_num_tags"] == {"0": 1, "2": 4}


def test_palette_png_masks_are_read_as_ids(tmp_path):
    root = make_voc_dataset(tmp_path, n=2)
    im = Image.open(root / "SegmentationClass" / "2007_000001.png")
    assert im.mode == "P"  # the fixture writes real palette PNGs; ids are the indices, not colours
    assert dataset_info(root)["tags"]["2007_000001"] == ["bicycle", "bird"]
