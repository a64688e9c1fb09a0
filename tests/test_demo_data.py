"""The embedded benchmark: deterministic, VOC layout, masks with an ignore band, 1-3 objects an image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.data.demo import CLASS_NAMES, MARKER, MNIST_CLASS_NAMES, ensure_demo, make_demo
from wsss.io import read_mask

SMALL = {"num_train": 12, "num_val": 6}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo")
    return root, make_demo(root, seed=0, **SMALL)


def test_same_seed_same_bytes_other_seed_differs(demo, tmp_path):
    root, _ = demo
    make_demo(tmp_path / "again", seed=0, **SMALL)
    make_demo(tmp_path / "other", seed=1, **SMALL)
    a, b, c = _files(root), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert a == b
    assert a.keys() == c.keys()
    assert a["JPEGImages/train_00000.jpg"] != c["JPEGImages/train_00000.jpg"]


def test_voc_layout(demo):
    root, summary = demo
    names = (root / "class_names.txt").read_text().splitlines()
    assert names == CLASS_NAMES and names[0] == "background" and any(" " in n for n in names)
    assert summary["num_train"] == 12 and summary["num_val"] == 6 and summary["class_names"] == names
    assert "licen" in (root / "README.txt").read_text().lower()
    splits = {s: (root / "ImageSets/Segmentation" / f"{s}.txt").read_text().split() for s in ("train", "val")}
    assert len(splits["train"]) == 12 and len(splits["val"]) == 6
    assert not set(splits["train"]) & set(splits["val"])
    for iid in splits["train"] + splits["val"]:
        with Image.open(root / "JPEGImages" / f"{iid}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            size = im.size
        with Image.open(root / "SegmentationClass" / f"{iid}.png") as m:
            assert m.mode == "P"
        mask = read_mask(root / "SegmentationClass" / f"{iid}.png")
        assert mask.shape == (size[1], size[0]) and 200 <= min(size) and max(size) <= 256
        values = set(np.unique(mask).tolist())
        assert values <= set(range(len(names))) | {255}
        tags = sorted(values - {0, 255})
        assert 1 <= len(tags) <= 3, (iid, tags)
        # The ignore band separates every object from the background: no fg pixel touches a bg one.
        fg = (mask > 0) & (mask < 255)
        assert 255 in values
        assert not (fg[:, 1:] & (mask[:, :-1] == 0)).any() and not (fg[:, :-1] & (mask[:, 1:] == 0)).any()
        # Objects are big enough for stride 16: each class covers at least a few 16x16 cells.
        for t in tags:
            assert (mask == t).sum() >= 2 * 256, (iid, t)


def test_ensure_demo_builds_only_when_needed(tmp_path):
    root = tmp_path / "d"
    first = ensure_demo(root, seed=0, num_train=2, num_val=1, size=160)
    assert first["built"] and (root / MARKER).is_file()
    assert not ensure_demo(root, seed=0, num_train=2, num_val=1, size=160)["built"]
    (root / MARKER).unlink()  # as after an interrupted build
    assert ensure_demo(root, seed=0, num_train=2, num_val=1, size=160)["built"]
    assert ensure_demo(root, seed=3, num_train=2, num_val=1, size=160)["built"]  # other settings


# ------------------------------------------------------------------------------- the benchmark family


def _extent(mask: np.ndarray, cls: int) -> int:
    ys, xs = np.nonzero(mask == cls)
    return max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)


def test_default_is_the_embedded_benchmark_byte_for_byte(demo, tmp_path):
    """Every family option at its demo value (or the variant named) gives today's files, marker included."""
    root, _ = demo
    make_demo(tmp_path / "explicit", seed=0, variant="demo", source="demo", overlap=True, clutter=0, **SMALL)
    assert _files(root) == _files(tmp_path / "explicit")
    assert set(json.loads((root / MARKER).read_text())) == {"version", "seed", "num_train", "num_val", "size"}


def test_size_scale_and_object_count(tmp_path):
    root = tmp_path / "f"
    s = make_demo(root, seed=0, num_train=16, num_val=4, size=128, source="mnist", object_scale=(0.3, 0.5),
                  objects=(2, 3), overlap=False)
    assert (root / "class_names.txt").read_text().splitlines() == MNIST_CLASS_NAMES
    assert set(s["objects_per_image"]) <= {2, 3} and sum(s["objects_per_image"].values()) == 20
    for iid in (root / "ImageSets/Segmentation/train.txt").read_text().split():
        with Image.open(root / "JPEGImages" / f"{iid}.jpg") as im:
            assert im.size == (128, 128)
        mask = read_mask(root / "SegmentationClass" / f"{iid}.png")
        tags = sorted(set(np.unique(mask).tolist()) - {0, 255})
        assert 1 <= len(tags) <= 3
        for t in tags:  # a digit's mask spans about its drawn size (rotated up to 15 degrees, 2 px bands)
            if (mask == t).sum() and len(tags) == 3:  # one object per class when three classes show
                assert 0.3 * 0.6 * 128 <= _extent(mask, t) <= 0.5 * 1.45 * 128, (iid, t, _extent(mask, t))
    big = make_demo(tmp_path / "big", seed=0, num_train=3, num_val=1, size=(480, 512), source="mnist",
                    object_scale=0.1, objects=4)
    assert big["objects_per_image"] == {4: 4}
    for iid in (tmp_path / "big/ImageSets/Segmentation/train.txt").read_text().split():
        with Image.open(tmp_path / "big/JPEGImages" / f"{iid}.jpg") as im:
            assert 480 <= min(im.size) and max(im.size) <= 512
        mask = read_mask(tmp_path / "big/SegmentationClass" / f"{iid}.png")
        fg = (mask > 0) & (mask < 255)
        assert 0 < fg.mean() < 0.05  # four small digits on a large image


def test_objects_larger_than_the_texture_photos(tmp_path):
    # the upper end of object_scale (0.9 of a 384 px side) on the embedded objects, whose textures are
    # smaller than that: they are tiled, not a crash
    s = make_demo(tmp_path / "large", seed=0, num_train=4, num_val=1, size=384, object_scale=(0.85, 0.9), objects=1)
    assert s["objects_per_image"] == {1: 5}
    for iid in (tmp_path / "large/ImageSets/Segmentation/train.txt").read_text().split():
        mask = read_mask(tmp_path / "large/SegmentationClass" / f"{iid}.png")
        assert ((mask > 0) & (mask < 255)).mean() > 0.1  # one object, most of the image


def test_options_change_the_images_and_same_seed_same_bytes(tmp_path):
    kw = dict(seed=0, num_train=6, num_val=2, size=160, variant="hard")
    make_demo(tmp_path / "a", **kw)
    make_demo(tmp_path / "b", **kw)
    make_demo(tmp_path / "c", **{**kw, "clutter": 0})
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a["JPEGImages/train_00000.jpg"] != c["JPEGImages/train_00000.jpg"]
    assert json.loads((tmp_path / "a" / MARKER).read_text())["options"]["variant"] == "hard"
    assert "variant hard" in (tmp_path / "a" / "README.txt").read_text()


def test_clutter_is_background(tmp_path):
    """Distractors change the pixels but never the mask."""
    kw = dict(seed=4, num_train=4, num_val=1, size=160, source="mnist", object_scale=(0.3, 0.4), objects=1)
    make_demo(tmp_path / "plain", **kw)
    make_demo(tmp_path / "clutter", **kw, clutter=6)
    for iid in ("train_00000", "train_00001"):
        ma = read_mask(tmp_path / "plain/SegmentationClass" / f"{iid}.png")
        mb = read_mask(tmp_path / "clutter/SegmentationClass" / f"{iid}.png")
        assert set(np.unique(ma).tolist()) - {0, 255} == set(np.unique(mb).tolist()) - {0, 255}


def test_hard_variant_has_many_instances_per_class():
    from wsss.data.demo import _mnist_pools

    pools = _mnist_pools()
    assert sorted(pools) == list(range(1, 11))
    for c, p in pools.items():
        assert len(p["train"]) >= 300 and len(p["val"]) >= 70, c


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"size": 50}, "size"),
        ({"size": (300, 200)}, "size"),
        ({"variant": "nope"}, "variant"),
        ({"source": "cifar"}, "source"),
        ({"object_scale": (0.5, 0.2)}, "object_scale"),
        ({"object_scale": 1.5}, "object_scale"),
        ({"objects": (0, 2)}, "objects"),
        ({"objects": "3-1"}, "objects"),
        ({"clutter": -1}, "clutter"),
        ({"num_train": -1}, "num_train"),
    ],
)
def test_bad_option_values_are_clear_errors(tmp_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        make_demo(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()  # checked before anything is written


def test_ensure_demo_keys_on_the_family_options(tmp_path):
    root = tmp_path / "d"
    kw = dict(seed=0, num_train=2, num_val=1, size=128)
    assert ensure_demo(root, **kw, source="mnist", object_scale=(0.3, 0.7))["built"]
    assert not ensure_demo(root, **kw, source="mnist", object_scale=(0.3, 0.7))["built"]
    assert ensure_demo(root, **kw, source="mnist", object_scale=(0.3, 0.6))["built"]
    assert ensure_demo(root, **kw)["built"]  # back to the embedded benchmark
