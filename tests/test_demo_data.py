"""The embedded benchmark: deterministic, VOC layout, masks with an ignore band, 1-3 objects an image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.data.demo import CLASS_NAMES, MARKER, ensure_demo, make_demo
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
