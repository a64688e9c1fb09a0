"""The command line as a user runs it: exit codes, one-line errors, JSON outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, write_image, write_mask_png
from wsss.data.demo import make_demo
from wsss.io import read_mask

CLASSES = ["background", "potted plant", "tv/monitor", "dining table"]


@pytest.fixture(scope="module")
def photo_voc(tmp_path_factory):
    """A VOC-layout folder of real photos (scikit-image's, via the demo builder) relabelled with class
    names that contain spaces and slashes; half the images carry XML tags, half get tags from masks."""
    tmp = tmp_path_factory.mktemp("photo_voc")
    demo = tmp / "demo"
    make_demo(demo, seed=3, num_train=6, num_val=6)
    root = tmp / "voc"
    ids = (demo / "ImageSets/Segmentation/val.txt").read_text().split()
    remap = np.full(256, 255, np.uint8)
    remap[0] = 0
    for c in range(1, 255):
        remap[c] = 1 + (c - 1) % (len(CLASSES) - 1)  # demo classes folded onto ours
    expected = {}
    for k, i in enumerate(ids):
        image = np.asarray(Image.open(demo / "JPEGImages" / f"{i}.jpg").convert("RGB"))
        mask = remap[read_mask(demo / "SegmentationClass" / f"{i}.png")]
        write_image(root / "JPEGImages" / f"{i}.jpg", image)
        write_mask_png(root / "SegmentationClass" / f"{i}.png", mask)
        tags = sorted({CLASSES[c] for c in np.unique(mask) if c not in (0, 255)})
        expected[i] = tags
        if k % 2 == 0:
            objects = "".join(f"<object><name>{t}</name></object>" for t in tags)
            (root / "Annotations").mkdir(parents=True, exist_ok=True)
            (root / "Annotations" / f"{i}.xml").write_text(f"<annotation>{objects}</annotation>")
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    (root / "class_names.txt").write_text("\n".join(CLASSES) + "\n")
    return root, expected


def test_data_info_json_gives_each_images_tags(monkeypatch, capsys, photo_voc, tmp_path):
    root, expected = photo_voc
    code, out, _ = run_cli(monkeypatch, capsys, "data", "info", root, "--json", tmp_path / "info.json")
    assert code == 0
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["classes"] == CLASSES
    assert {k: sorted(v) for k, v in info["tags"].items()} == expected
    assert "potted plant" in out


def independent_miou(preds: list[np.ndarray], gts: list[np.ndarray], n: int) -> float:
    tp = np.zeros(n)
    gt_count = np.zeros(n)
    pred_count = np.zeros(n)
    for p, g in zip(preds, gts, strict=True):
        valid = g != 255
        for c in range(n):
            tp[c] += np.sum((p == c) & (g == c) & valid)
            gt_count[c] += np.sum((g == c) & valid)
            pred_count[c] += np.sum((p == c) & valid)
    union = gt_count + pred_count - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


def test_evaluate_matches_independent_miou(monkeypatch, capsys, photo_voc, tmp_path):
    root, _ = photo_voc
    rng = np.random.default_rng(0)
    preds, gts = [], []
    for path in sorted((root / "SegmentationClass").glob("*.png")):
        gt = read_mask(path)
        pred = gt.copy()
        pred[pred == 255] = 0
        noise = rng.random(gt.shape) < 0.2  # a fifth of the pixels relabelled at random
        pred[noise] = rng.integers(0, len(CLASSES), noise.sum())
        write_mask_png(tmp_path / "pred" / path.name, pred, palette=bool(rng.integers(2)))
        preds.append(pred)
        gts.append(gt)
    code, out, _ = run_cli(
        monkeypatch, capsys, "evaluate", tmp_path / "pred", "--data", root, "--split", "val", "--json", tmp_path / "r.json"
    )
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert abs(result["miou"] - independent_miou(preds, gts, len(CLASSES))) < 1e-4
    assert set(result["per_class"]) == set(CLASSES)
    assert "tv/monitor" in out


def test_data_check_names_every_bad_file(monkeypatch, capsys, photo_voc, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(photo_voc[0], root)
    jpgs = sorted((root / "JPEGImages").glob("*.jpg"))
    jpgs[0].write_bytes(jpgs[0].read_bytes()[:600])  # truncated JPEG
    jpgs[1].unlink()
    (root / "JPEGImages" / f"{jpgs[1].stem}.png").write_text("not an image")  # a fake PNG
    code, _, err = run_cli(monkeypatch, capsys, "data", "check", root)
    assert code == 1
    assert jpgs[0].name in err and f"{jpgs[1].stem}.png" in err
    assert "Traceback" not in err

    code, out, _ = run_cli(monkeypatch, capsys, "data", "check", photo_voc[0])
    assert code == 0 and "OK" in out


def test_user_errors_are_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "train", "demo/tkp_pcl", "-o", "train.epoch=3")
    assert code == 1 and "did you mean 'train.epochs'" in err and "Traceback" not in err
    code, _, err = run_cli(monkeypatch, capsys, "data", "info", tmp_path / "nowhere")
    assert code == 1 and "nowhere" in err and "Traceback" not in err


def test_presets_and_make_demo(monkeypatch, capsys, tmp_path):
    code, out, _ = run_cli(monkeypatch, capsys, "presets")
    assert code == 0 and "demo/tkp_pcl" in out.split()
    code, out, _ = run_cli(
        monkeypatch, capsys, "data", "make-demo", "--out", tmp_path / "d", "--num-train", "4", "--num-val", "2"
    )
    assert code == 0
    assert (tmp_path / "d" / "ImageSets/Segmentation/val.txt").read_text().split().__len__() == 2
