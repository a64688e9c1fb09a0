"""Dataset formats: VOC (default and custom classes), COCO, folder; split rules; prepare."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import default_objects, make_coco_dataset, make_folder_dataset, make_voc_dataset, write_mask_png
from wsss.data import available_splits, detect_format, open_dataset
from wsss.data.voc import VOC_CLASSES
from wsss.io import DataError, read_mask


def expected_tags(ids, num_fg):
    return {i: sorted({c for c, _ in objs}) for i, objs in default_objects(ids, num_fg).items()}


# ------------------------------------------------------------------------------------------------ VOC


@pytest.mark.parametrize("palette", [True, False])
def test_voc_masks_tags_and_samples(tmp_path, palette):
    root = make_voc_dataset(tmp_path, n=4, palette=palette)
    assert detect_format(root) == "voc"
    ds = open_dataset(root, "train")
    assert ds.class_names == VOC_CLASSES and ds.num_classes == 21 and ds.has_masks
    assert ds.ids == ["2007_000000", "2007_000001"]
    want = expected_tags(["2007_000000", "2007_000001", "2007_000002", "2007_000003"], 20)
    for k, i in enumerate(ds.ids):
        assert ds.tags(k) == want[i]
        s = ds[k]
        assert s.id == i and s.image.mode == "RGB" and s.image.size == (40, 30)
        assert s.mask.dtype == np.uint8 and s.mask.shape == (30, 40)
        assert 255 in s.mask and set(np.unique(s.mask)) == {0, 255, *want[i]}  # VOC's ignore border
        y = ds.label_vector(k)
        assert y.dtype == np.float32 and y.shape == (20,) and set(np.flatnonzero(y) + 1) == set(want[i])
    assert open_dataset(root, "val").ids == ["2007_000002", "2007_000003"]
    assert available_splits(root) == ["train", "val"]


def test_voc_mask_tags_are_cached(voc_root, monkeypatch):
    import wsss.data.voc as voc

    calls = []
    real = voc.read_mask
    monkeypatch.setattr(voc, "read_mask", lambda p: calls.append(p) or real(p))
    ds = open_dataset(voc_root, "train")
    first = ds.tags(1)
    assert ds.tags(1) == first and len(calls) == 1
    ds.load_mask(0)  # loading a mask fills the cache too
    ds.tags(0)
    assert len(calls) == 2


def test_voc_tags_from_xml_win_over_masks(tmp_path):
    root = make_voc_dataset(tmp_path, n=2, xml=True)
    ds = open_dataset(root, "train")
    assert ds.tags(0) == [1]
    # The XML is the tag source when present: make it disagree with the mask.
    xml = root / "Annotations" / "2007_000000.xml"
    xml.write_text(xml.read_text().replace("<name>aeroplane</name>", "<name> person </name>"))
    assert open_dataset(root, "train").tags(0) == [15]
    xml.write_text(xml.read_text().replace("<name> person </name>", "<name>unicorn</name>"))
    with pytest.raises(DataError, match=r"2007_000000\.xml: unknown object name 'unicorn'"):
        open_dataset(root, "train").tags(0)


def test_voc_custom_class_names_with_spaces_and_slashes(tmp_path):
    names = ["_background_", "potted plant", "tv/monitor", "cat"]
    root = make_voc_dataset(tmp_path, n=4, class_names=names, splits=None)  # file ends with blank lines
    ds = open_dataset(root, "all")
    assert ds.class_names == names and ds.num_classes == 4
    tags = [[names[c] for c in ds.tags(k)] for k in range(len(ds))]
    assert tags == [["potted plant"], ["tv/monitor", "cat"], ["cat"], ["potted plant", "tv/monitor"]]


def test_voc_class_names_file_errors(tmp_path):
    root = make_voc_dataset(tmp_path, n=2, class_names=["bg", "a", "b"])
    (root / "class_names.txt").write_text("bg\n\na\n")
    with pytest.raises(DataError, match="class_names.txt: blank line 2"):
        open_dataset(root, "train")
    (root / "class_names.txt").write_text("bg\na\na\n")
    with pytest.raises(DataError, match="duplicate class names: a"):
        open_dataset(root, "train")


def test_voc_mask_values_beyond_classes(tmp_path):
    root = make_voc_dataset(tmp_path, n=2, class_names=["bg", "a", "b"])
    bad = np.zeros((30, 40), np.uint8)
    bad[0, 0], bad[1, 1], bad[2, 2] = 3, 7, 255
    write_mask_png(root / "SegmentationClass" / "2007_000000.png", bad)
    ds = open_dataset(root, "train")
    with pytest.raises(
        DataError, match=r"2007_000000\.png: mask values \[3, 7\] outside the 3 classes of .*class_names\.txt"
    ):
        ds.load_mask(0)
    with pytest.raises(DataError, match=r"\[3, 7\]"):
        ds.tags(0)


def test_voc_split_rules_without_imagesets(tmp_path):
    root = make_voc_dataset(tmp_path, n=3, splits=None)
    everything = ["2007_000000", "2007_000001", "2007_000002"]
    assert open_dataset(root, "all").ids == everything
    assert open_dataset(root, "train").ids == everything  # no split files at all: train = everything
    assert available_splits(root) == ["all"]
    with pytest.raises(DataError, match=r"val\.txt: split file not found \(available splits: all\)"):
        open_dataset(root, "val")


def test_voc_split_rules_with_imagesets(tmp_path):
    root = make_voc_dataset(tmp_path, n=4)
    assert len(open_dataset(root, "all")) == 4  # `all` needs no file
    with pytest.raises(
        DataError, match=r"test\.txt: split file not found \(available splits: train, val, all\)"
    ):
        open_dataset(root, "test")


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ["2007_000000", "../../etc/passwd"],
            r"train\.txt: ids must be plain image ids \(no paths\), got: \.\./\.\./etc/passwd",
        ),
        (["/etc/passwd"], r"got: /etc/passwd"),
        (["JPEGImages/2007_000000"], r"got: JPEGImages/2007_000000"),
        (
            ["2007_000000", "2007_000099", "nope"],
            r"train\.txt: names 2 images that do not exist: 2007_000099, nope",
        ),
        (["", "  ", ""], r"train\.txt: empty split"),
        (["2007_000000", "2007_000001", "2007_000000"], r"train\.txt: duplicate ids: 2007_000000"),
    ],
)
def test_voc_split_file_errors(tmp_path, lines, message):
    root = make_voc_dataset(tmp_path, n=2)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        open_dataset(root, "train")


def test_voc_split_ids_are_stripped(tmp_path):
    root = make_voc_dataset(tmp_path, n=2)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("  2007_000001 \r\n\n2007_000000\n\n")
    assert open_dataset(root, "train").ids == ["2007_000001", "2007_000000"]


def test_voc_segmentation_class_aug(tmp_path):
    root = make_voc_dataset(tmp_path, n=4, aug=True)
    ds = open_dataset(root, "train_aug")
    assert len(ds) == 4 and ds.has_masks
    assert "SegmentationClassAug" in ds.mask_path(0) and ds.load_mask(0).shape == (30, 40)


def test_voc_without_masks_uses_xml(tmp_path):
    root = make_voc_dataset(tmp_path, n=2, xml=True)
    for p in (root / "SegmentationClass").iterdir():
        p.unlink()
    ds = open_dataset(root, "train")
    assert not ds.has_masks and ds.load_mask(0) is None and ds.tags(0) == [1] and ds[0].mask is None


# ----------------------------------------------------------------------------------------------- COCO


def test_coco_masks_tags_and_classes(tmp_path):
    pytest.importorskip("pycocotools")
    root = make_coco_dataset(tmp_path)
    assert detect_format(root) == "coco" and available_splits(root) == ["train", "val"]
    train = open_dataset(root, "train")
    assert train.class_names == ["background", "person", "car", "dog"]  # sorted category ids 1, 3, 18
    assert train.ids == [
        "COCO_train2014_000000000001",
        "COCO_train2014_000000000002",
    ]  # image 3: no annotations
    assert [train.tags(0), train.tags(1)] == [[1, 3], [1, 2]]  # crowd persons count as present
    m = train.load_mask(0)
    assert m.shape == (30, 40) and m.dtype == np.uint8
    assert m[5, 5] == 1 and m[15, 15] == 3 and m[22, 25] == 3 and m[28, 35] == 0  # dog drawn later wins
    m = train.load_mask(1)
    assert m[10, 27] == 2 and m[24, 5] == 255 and m[2, 2] == 0  # crowd region ignored
    assert set(np.unique(m)) == {0, 2, 255}
    val = open_dataset(root, "val")
    assert len(val) == 3 and val.tags(2) == [] and not val.load_mask(2).any()
    assert open_dataset(root, "val2014").ids == val.ids
    with pytest.raises(DataError, match="instances_test2014.json: not found"):
        open_dataset(root, "test")


# --------------------------------------------------------------------------------------------- folder


@pytest.mark.parametrize("tags_format", ["csv", "json"])
def test_folder_tags(tmp_path, tags_format):
    root = make_folder_dataset(tmp_path, n=4, tags_format=tags_format)
    assert detect_format(root) == "folder" and available_splits(root) == ["all"]
    ds = open_dataset(root, "all")
    assert ds.class_names == ["background", "cat", "dog", "potted plant"] and not ds.has_masks
    assert ds.ids == ["img0", "img1", "img2", "img3"]
    assert [ds.tags(k) for k in range(4)] == [[1], [2, 3], [3], [1, 2]]
    assert ds[0].mask is None and open_dataset(root, "train").ids == ds.ids


def test_folder_csv_variants(tmp_path):
    root = make_folder_dataset(tmp_path, n=3)
    # No header, one name per column, '|' inside a cell, images named by id or by file name.
    (root / "tags.csv").write_text("img0.png,cat\nimg1,dog|potted plant\nimg2.png,potted plant,cat\n")
    ds = open_dataset(root, "all")
    assert [[ds.class_names[c] for c in ds.tags(k)] for k in range(3)] == [
        ["cat"],
        ["dog", "potted plant"],
        ["cat", "potted plant"],
    ]
    # A one-hot table.
    (root / "tags.csv").write_text("filename,cat,dog\nimg0.png,1,0\nimg1.png,1,1\nimg2.png,0,0\n")
    ds = open_dataset(root, "all")
    assert ds.class_names == ["background", "cat", "dog"] and [ds.tags(k) for k in range(3)] == [
        [1],
        [1, 2],
        [],
    ]


def test_folder_missing_and_unknown_tags(tmp_path):
    root = make_folder_dataset(tmp_path, n=3, classes_file=True)
    (root / "tags.csv").write_text("image,tags\nimg0.png,cat\nimg2.png,zebra\n")
    ds = open_dataset(root, "all")
    assert ds.tags(0) == [1]
    with pytest.raises(DataError, match=r"tags\.csv: no tags for image img1\.png"):
        ds.tags(1)
    with pytest.raises(DataError, match=r"tags\.csv: image img2\.png has unknown class names zebra"):
        ds.tags(2)


def test_folder_masks_classes_and_splits(tmp_path):
    root = make_folder_dataset(tmp_path, n=4, masks=True, classes_file=True)
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("img0.png\nimg1\n")
    (root / "splits" / "val.txt").write_text("img2\nimg3\n")
    assert available_splits(root) == ["all", "train", "val"]
    ds = open_dataset(root, "train")
    assert ds.ids == ["img0", "img1"] and ds.has_masks
    assert set(np.unique(ds.load_mask(1))) == {0, 2, 3}
    # Tags from the masks when there is no tags file.
    (root / "tags.csv").unlink()
    ds = open_dataset(root, "val")
    assert [ds.tags(0), ds.tags(1)] == [[3], [1, 2]]


def test_folder_tags_file_option(tmp_path):
    root = make_folder_dataset(tmp_path, n=2, tags_format="json")
    (root / "tags.json").rename(root / "labels.json")
    with pytest.raises(DataError, match="no tags.csv or tags.json"):
        open_dataset(root, "all")
    assert open_dataset(root, "all", tags_file="labels.json").tags(1) == [2, 3]


def test_unknown_format_and_missing_root(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_dataset(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="unknown dataset format 'xyz'"):
        open_dataset(tmp_path, "train", format="xyz")


# -------------------------------------------------------------------------------------------- prepare


def test_prepare_voc_with_sbd(tmp_path):
    from scipy.io import savemat

    from wsss.data.prepare import prepare_voc

    ids = [f"2007_{k:06d}" for k in range(6)]
    voc = make_voc_dataset(
        tmp_path / "VOCdevkit", ids=ids, splits={"train": ids[:2], "val": ids[2:4]}, name="VOC2012"
    )
    for i in ids[4:]:  # images SBD annotates but VOC does not
        (voc / "SegmentationClass" / f"{i}.png").unlink()
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    sbd_masks = {}
    for k, i in enumerate([ids[1], ids[2], ids[4], ids[5]]):
        seg = np.full((30, 40), k + 1, np.uint8)
        sbd_masks[i] = seg
        savemat(
            sbd / "cls" / f"{i}.mat", {"GTcls": {"Segmentation": seg, "CategoriesPresent": np.array([k + 1])}}
        )
    (sbd / "train.txt").write_text(f"{ids[4]}\n{ids[2]}\n")  # ids[2] is VOC val: excluded
    (sbd / "val.txt").write_text(f"{ids[5]}\n")

    report = prepare_voc(tmp_path / "VOCdevkit", sbd_root=tmp_path / "benchmark_RELEASE")
    assert report["train_aug"] == 4 and report["masks_from_sbd"] == 2 and report["masks_from_voc"] == 4
    assert (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split() == [
        ids[0],
        ids[1],
        ids[4],
        ids[5],
    ]
    np.testing.assert_array_equal(
        read_mask(voc / "SegmentationClassAug" / f"{ids[5]}.png"), sbd_masks[ids[5]]
    )
    # VOC's own mask wins over SBD's for the same id (it has the 255 border).
    np.testing.assert_array_equal(
        read_mask(voc / "SegmentationClassAug" / f"{ids[1]}.png"),
        read_mask(voc / "SegmentationClass" / f"{ids[1]}.png"),
    )
    assert Image.open(voc / "SegmentationClassAug" / f"{ids[5]}.png").mode == "P"
    ds = open_dataset(voc, "train_aug")
    assert len(ds) == 4 and ds.tags(3) == [4]
    assert prepare_voc(voc, sbd_root=sbd)["masks_existing"] == 6  # a re-run keeps what is there


def test_prepare_coco_reports(tmp_path):
    from wsss.data.prepare import prepare_coco

    root = make_coco_dataset(tmp_path)
    (root / "val2014" / "COCO_val2014_000000000003.jpg").unlink()
    report = prepare_coco(root)
    json.dumps(report)
    assert (
        report["splits"]["train"]["images"] == 3 and report["splits"]["train"]["images_with_annotations"] == 2
    )
    assert report["splits"]["val"]["missing_files"] == 1 and report["splits"]["train"]["categories"] == 3
    assert any("COCO_val2014_000000000003.jpg" in p for p in report["problems"])
    with pytest.raises(DataError, match="no COCO annotations"):
        prepare_coco(tmp_path / "empty")
