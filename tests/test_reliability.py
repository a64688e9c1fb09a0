"""Reliability as a user meets it, through the command line: bad input is named (or skipped with
--skip-bad, and listed), outputs survive kill -9 (pseudo-label and train resume to the same bytes and
weights), hostile pickles and split files that escape the dataset root are refused, a NaN loss stops
training with the last good checkpoint intact.

The kill tests run `wsss` in a subprocess and SIGKILL it mid-run; the uninterrupted references run in
this process (one torch thread on both sides, so CPU results are bit-identical).
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    default_objects,
    make_coco_dataset,
    make_folder_dataset,
    make_voc_dataset,
    render,
    run_cli,
    write_mask_png,
)
from engine_fakes import make_cfg, make_voc  # importing engine_fakes registers the "fake" method
from wsss import cli
from wsss.config import DataConfig, save_config
from wsss.data import open_dataset
from wsss.data.check import check_dataset
from wsss.data.transforms import EvalTransform, TransformedDataset
from wsss.errors import DataError
from wsss.io import load_checkpoint, read_image

CLASSES = ["background", "a", "b"]
SIZE = (40, 30)  # W, H of the conftest images


def error_line(err: str) -> str:
    """The CLI's one-line error; asserts there is exactly one and no traceback anywhere."""
    assert "Traceback" not in err and "Caught DataError" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def kill_when(cmd: list[str], ready, log: Path, timeout: float = 120.0) -> None:
    """Run `wsss CMD` in a subprocess and SIGKILL it as soon as `ready()` holds; fails if it ends first."""
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "wsss", *map(str, cmd)], stdout=f, stderr=f,
                                env=_subprocess_env())
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"`wsss {' '.join(map(str, cmd))}` ended (rc {proc.returncode}) before the kill:\n"
                            + log.read_text(errors="replace")[-3000:])
            if time.time() > deadline:
                pytest.fail("timed out waiting for the moment to kill")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- image conversions


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 [30, 40, 3], mask) with two class rectangles on a dark background."""
    return render([(1, (2, 3, 18, 26)), (2, (22, 4, 37, 27))], SIZE)


def _gray_with_white(image: np.ndarray) -> np.ndarray:
    gray = np.asarray(Image.fromarray(image).convert("L")).copy()
    gray[0, 0] = 255  # full range: 16-bit -> 8-bit is then exact
    return gray


def write_variant(path: Path, image: np.ndarray, kind: str) -> np.ndarray:
    """Write `image` as `kind`; returns the RGB pixels read_image must give back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(image)
    if kind == "cmyk":
        im.convert("CMYK").save(path, "JPEG", quality=95, subsampling=0)
        return image
    if kind == "gray":
        gray = np.asarray(im.convert("L"))
        Image.fromarray(gray).save(path)
        return np.repeat(gray[..., None], 3, axis=2)
    if kind == "rgba":
        alpha = np.full(image.shape[:2], 255, np.uint8)
        alpha[:, : SIZE[0] // 2] = 0  # the left half fully transparent: composited on white
        Image.fromarray(np.dstack([image, alpha]), mode="RGBA").save(path)
        out = image.copy()
        out[:, : SIZE[0] // 2] = 255
        return out
    if kind == "16bit":
        gray = _gray_with_white(image)
        im16 = Image.fromarray(gray.astype(np.uint16) * 257)
        assert im16.mode.startswith("I;16")
        im16.save(path)
        assert Image.open(path).mode.startswith("I")  # really a 16-bit PNG on disk
        return np.repeat(gray[..., None], 3, axis=2)
    if kind == "exif":  # stored rotated, with EXIF orientation 6: displayed upright as `image`
        exif = Image.Exif()
        exif[0x0112] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
        assert Image.open(path).size == (SIZE[1], SIZE[0])
        return image
    raise ValueError(kind)


VARIANTS = {"cmyk": ".jpg", "gray": ".png", "rgba": ".png", "16bit": ".png", "exif": ".jpg"}
LOSSY = {"cmyk", "exif"}


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_read_image_converts(tmp_path, kind):
    image, _ = _scene()
    path = tmp_path / f"x{VARIANTS[kind]}"
    expected = write_variant(path, image, kind)
    got = read_image(path)
    assert got.mode == "RGB" and got.size == SIZE
    diff = np.abs(np.asarray(got, np.int16) - expected.astype(np.int16))
    if kind in LOSSY:
        assert diff.mean() < 4, diff.mean()
        # orientation: each rectangle's colour is where it belongs
        assert np.abs(np.asarray(got, np.int16)[15, 10] - image[15, 10]).max() < 30
        assert np.abs(np.asarray(got, np.int16)[15, 30] - image[15, 30]).max() < 30
    else:
        assert diff.max() == 0


def test_converted_images_through_a_dataset(monkeypatch, capsys, tmp_path):
    """CMYK, grayscale, RGBA, 16-bit and EXIF-rotated images are data, not errors: `data check` passes
    and the engine's dataset yields upright RGB tensors of the mask's size."""
    ids = [f"img_{k}" for k in VARIANTS]
    root = make_voc_dataset(tmp_path, ids=ids, class_names=CLASSES, splits={"train": ids})
    objects = default_objects(ids, len(CLASSES) - 1, SIZE)
    expected = {}
    for i, kind in zip(ids, VARIANTS, strict=True):
        (root / "JPEGImages" / f"{i}.jpg").unlink()
        image, mask = render(objects[i], SIZE)
        expected[i] = write_variant(root / "JPEGImages" / f"{i}{VARIANTS[kind]}", image, kind)
    assert check_dataset(root) == []
    code, out, err = run_cli(monkeypatch, capsys, "data", "check", root)
    assert code == 0 and "OK" in out, err

    ds = open_dataset(root, "train")
    cfg = DataConfig(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])  # the tensor is the pixels / 255
    loader = TransformedDataset(ds, EvalTransform(cfg, size=0))
    for k, (i, kind) in enumerate(zip(ids, VARIANTS, strict=True)):
        item = loader[k]
        assert item["id"] == i and item["image"].shape == (3, SIZE[1], SIZE[0]) and item["mask"].shape == SIZE[::-1]
        pixels = (item["image"].permute(1, 2, 0).numpy() * 255).round()
        assert np.abs(pixels - expected[i]).mean() < (4 if kind in LOSSY else 1e-3), kind


# ------------------------------------------------------------------------------------------ `data check`


def _truncate_jpeg(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)  # scan data well past the header
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def test_data_check_names_every_bad_input(monkeypatch, capsys, tmp_path):
    ids = [f"2007_{k:06d}" for k in range(9)]
    root = make_voc_dataset(tmp_path, ids=ids, class_names=CLASSES, xml=True, splits={"train": ids[:5], "val": ids[5:]})
    jpg, seg, sets = root / "JPEGImages", root / "SegmentationClass", root / "ImageSets" / "Segmentation"
    _truncate_jpeg(jpg / f"{ids[0]}.jpg")
    (jpg / f"{ids[1]}.jpg").unlink()
    (jpg / f"{ids[1]}.png").write_bytes(b"<html>not a picture</html>")  # a non-image named .png
    write_mask_png(seg / f"{ids[2]}.png", np.zeros((20, 20), np.uint8))  # mask of another size
    bad = np.zeros(SIZE[::-1], np.uint8)
    bad[4, 4] = 7
    write_mask_png(seg / f"{ids[3]}.png", bad)  # a value outside the 3 classes (not 255)
    xml = root / "Annotations" / f"{ids[4]}.xml"
    xml.write_text(xml.read_text().replace("<name>a</name>", "<name>horse</name>"))  # not in class_names.txt
    (sets / "val.txt").write_text("\n".join([*ids[5:], ids[5], "2011_999999", "../outside", "/etc/passwd"]) + "\n")
    (sets / "test.txt").write_text("\n\n")

    code, out, err = run_cli(monkeypatch, capsys, "data", "check", root)
    assert code == 1 and "Traceback" not in err and "OK" not in out
    expected = [
        f"{jpg / ids[0]}.jpg: corrupt or truncated image",
        f"{jpg / ids[1]}.png: not an image",
        f"{seg / ids[2]}.png: mask is 20x20 but its image {ids[2]}.jpg is 40x30",
        f"{seg / ids[3]}.png: mask values [7] outside the 3 classes of {root / 'class_names.txt'}",
        f"{xml}: unknown object name 'horse' (not in {root / 'class_names.txt'})",
        f"{sets / 'val.txt'}: duplicate ids: {ids[5]}",
        f"{sets / 'val.txt'}: names 1 images that do not exist: 2011_999999",
        f"{sets / 'val.txt'}: ids must be plain image ids (no paths), got: ../outside, /etc/passwd",
        f"{sets / 'test.txt'}: empty split (no image ids)",
    ]
    lines = err.splitlines()
    for e in expected:
        assert any(ln.startswith(e) for ln in lines), f"missing {e!r} in:\n{err}"
    assert lines[-1] == f"{len(expected)} problem(s) in {root}"
    assert len(lines) == len(expected) + 1, err


def test_data_check_truncated_jpeg_and_fake_png(monkeypatch, capsys, tmp_path):
    """The issue's "done when": both named, exit 1."""
    root = make_voc_dataset(tmp_path, n=4, class_names=CLASSES)
    _truncate_jpeg(root / "JPEGImages" / "2007_000000.jpg")
    (root / "JPEGImages" / "2007_000003.jpg").unlink()
    (root / "JPEGImages" / "2007_000003.png").write_text("GIF89a? no.")
    code, _, err = run_cli(monkeypatch, capsys, "data", "check", root)
    assert code == 1 and "Traceback" not in err
    assert "2007_000000.jpg: corrupt or truncated image" in err and "2007_000003.png: not an image" in err


# ------------------------------------------------------------------------------------------ `wsss train`


def _break(root: Path, case: str) -> str:
    """Break a 6 train + 2 val dataset one way; the problem text the user must see."""
    jpg, seg, sets = root / "JPEGImages", root / "SegmentationClass", root / "ImageSets" / "Segmentation"
    train_txt = sets / "train.txt"
    if case == "truncated_jpeg":
        _truncate_jpeg(jpg / "2007_000001.jpg")
        return f"{jpg / '2007_000001.jpg'}: corrupt or truncated image"
    if case == "fake_png":
        (jpg / "2007_000002.jpg").unlink()
        (jpg / "2007_000002.png").write_text("definitely not a PNG")
        return f"{jpg / '2007_000002.png'}: not an image"
    if case == "mask_size":
        write_mask_png(seg / "2007_000003.png", np.zeros((10, 10), np.uint8))
        return f"{seg / '2007_000003.png'}: mask is 10x10 but its image is 40x30"
    if case == "mask_values":
        bad = np.zeros(SIZE[::-1], np.uint8)
        bad[1, 1] = 9
        write_mask_png(seg / "2007_000004.png", bad)
        return f"{seg / '2007_000004.png'}: mask values [9] outside the 3 classes of {root / 'class_names.txt'}"
    if case == "class_names":  # one class short of what the masks hold
        (root / "class_names.txt").write_text("background\na\n")
        return f"outside the 2 classes of {root / 'class_names.txt'}"
    if case == "missing_file":
        train_txt.write_text(train_txt.read_text() + "2011_999999\n")
        return f"{train_txt}: names 1 images that do not exist: 2011_999999"
    if case == "duplicate_id":
        train_txt.write_text(train_txt.read_text() + "2007_000000\n")
        return f"{train_txt}: duplicate ids: 2007_000000"
    if case == "path_escape":
        train_txt.write_text(train_txt.read_text() + "../../etc/passwd\n/etc/hosts\n")
        return f"{train_txt}: ids must be plain image ids (no paths), got: ../../etc/passwd, /etc/hosts"
    if case == "empty_split":
        train_txt.write_text("\n")
        return f"{train_txt}: empty split (no image ids)"
    if case == "bad_val_image":
        _truncate_jpeg(jpg / "2007_000007.jpg")
        return f"{jpg / '2007_000007.jpg'}: corrupt or truncated image"
    raise ValueError(case)


CASES = ["truncated_jpeg", "fake_png", "mask_size", "mask_values", "class_names", "missing_file", "duplicate_id",
         "path_escape", "empty_split", "bad_val_image"]
UNSKIPPABLE = {"empty_split"}  # nothing left to train on


def _train_setup(tmp_path: Path, case: str, workers: int = 0, **train) -> tuple[Path, str]:
    ids = [f"2007_{k:06d}" for k in range(8)]
    root = make_voc_dataset(tmp_path, ids=ids, class_names=CLASSES, splits={"train": ids[:6], "val": ids[6:]})
    problem = _break(root, case) if case else ""
    cfg = make_cfg(root, epochs=1, batch_size=2, **train)
    cfg.data.num_workers = workers
    save_config(cfg, tmp_path / "fake.yaml")
    return tmp_path / "fake.yaml", problem


@pytest.mark.parametrize("case", CASES)
def test_train_bad_input_is_named(monkeypatch, capsys, tmp_path, case):
    config, problem = _train_setup(tmp_path, case)
    code, _, err = run_cli(monkeypatch, capsys, "train", config, "--out", tmp_path / "run")
    assert code == 1
    assert problem in error_line(err)

    code, out, err = run_cli(monkeypatch, capsys, "train", config, "--out", tmp_path / "skip", "--skip-bad")
    if case in UNSKIPPABLE:
        assert code == 1 and problem in error_line(err)
        return
    assert code == 0, err
    listed = (tmp_path / "skip" / "skipped.txt").read_text()
    assert problem in listed, listed
    assert json.loads(out)["epochs"] == 1 and (tmp_path / "skip" / "last.pt").is_file()
    if case not in ("missing_file", "duplicate_id", "path_escape"):  # file problems: in the epoch's log line too
        (record,) = [json.loads(ln) for ln in (tmp_path / "skip" / "log.jsonl").read_text().splitlines()]
        assert any(problem in s for s in record["skipped"]), record


@pytest.mark.slow
def test_train_bad_input_in_loader_workers(monkeypatch, capsys, tmp_path):
    """In worker processes: the error is still one line (not the worker's traceback), and the skipped
    samples, which only the worker sees, reach the run log."""
    config, problem = _train_setup(tmp_path, "truncated_jpeg", workers=1)
    code, _, err = run_cli(monkeypatch, capsys, "train", config, "--out", tmp_path / "run")
    assert code == 1 and problem in error_line(err)

    code, _, err = run_cli(monkeypatch, capsys, "train", config, "--out", tmp_path / "skip", "--skip-bad",
                           "-o", "train.epochs=2")
    assert code == 0, err
    assert problem in (tmp_path / "skip" / "skipped.txt").read_text()
    records = [json.loads(ln) for ln in (tmp_path / "skip" / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(any(problem in s for s in r["skipped"]) for r in records)


def test_nan_loss_stops_with_last_good_checkpoint(monkeypatch, capsys, tmp_path):
    steps = 3  # 6 images / batch 2
    config, _ = _train_setup(tmp_path, "", method={"nan_at_step": steps + 1})  # epoch 2, step 2
    code, _, err = run_cli(monkeypatch, capsys, "train", config, "--out", tmp_path / "run", "-o", "train.epochs=3")
    assert code == 1
    line = error_line(err)
    assert "non-finite loss at epoch 2, step 2" in line and str(tmp_path / "run" / "last.pt") in line
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1 and state["global_step"] == steps
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 1


# --------------------------------------------------------------------------------------------- security


class _Hostile:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture
def hostile(tmp_path) -> tuple[Path, Path, Path]:
    """(torch.save-format file, raw pickle file, marker) - both files would create the marker."""
    marker = tmp_path / "pwned"
    zipped, raw = tmp_path / "evil.pt", tmp_path / "evil.pkl"
    torch.save({"model": _Hostile(marker), "epoch": 1}, zipped)
    raw.write_bytes(pickle.dumps({"model": _Hostile(marker)}, protocol=2))
    yield zipped, raw, marker
    assert not marker.exists()
    pickle.loads(raw.read_bytes())  # the payload is live: an unsafe load would have run it
    assert marker.exists()
    marker.unlink()


def test_hostile_checkpoint_for_pseudo_label_is_refused(monkeypatch, capsys, tmp_path, hostile, tkp_run):
    run, data = tkp_run
    for evil in hostile[:2]:
        code, _, err = run_cli(monkeypatch, capsys, "pseudo-label", run, "--data", data, "--split", "val",
                               "--out", tmp_path / "masks", "--checkpoint", evil)
        assert code == 1
        line = error_line(err)
        assert line.startswith(f"error: {evil}: refused to load: not a plain tensor checkpoint") and "posix.system" in line
        assert not hostile[2].exists()
    truncated = tmp_path / "truncated.pt"  # as a kill -9 during a non-atomic copy would leave it
    truncated.write_bytes((run / "last.pt").read_bytes()[:5000])
    for bad in (truncated, tmp_path / "missing.pt"):
        code, _, err = run_cli(monkeypatch, capsys, "pseudo-label", run, "--data", data, "--split", "val",
                               "--out", tmp_path / "masks", "--checkpoint", bad)
        assert code == 1 and error_line(err).startswith(f"error: {bad}: ")


def test_hostile_backbone_weights_and_resume_are_refused(monkeypatch, capsys, tmp_path, hostile):
    zipped, raw, marker = hostile
    root = make_voc(tmp_path / "data", n_train=4, n_val=2)
    for evil in (zipped, raw):
        code, _, err = run_cli(monkeypatch, capsys, "train", "demo/tkp", "--out", tmp_path / "run", "-o",
                               f"data.root={root}", "-o", f"model.backbone.weights={evil}", "-o", "data.num_workers=0")
        assert code == 1 and str(evil) in error_line(err) and "refused to load" in err
        assert not marker.exists()
    config, _ = _train_setup(tmp_path / "fake", "")
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / "last.pt").write_bytes(zipped.read_bytes())
    code, _, err = run_cli(monkeypatch, capsys, "train", config, "--out", tmp_path / "resume", "--resume")
    assert code == 1 and "last.pt: refused to load" in error_line(err)


def test_split_files_cannot_leave_the_dataset_root(tmp_path):
    root = make_voc_dataset(tmp_path, n=4, class_names=CLASSES)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes((root / "JPEGImages" / "2007_000000.jpg").read_bytes())
    sets = root / "ImageSets" / "Segmentation"
    for bad in ["../../secret", "../secret", str(tmp_path / "secret"), "..\\..\\secret", "JPEGImages/../../secret"]:
        (sets / "train.txt").write_text(f"2007_000000\n{bad}\n")
        with pytest.raises(DataError, match="ids must be plain image ids"):
            open_dataset(root, "train")
        assert open_dataset(root, "train", strict=False).ids == ["2007_000000"]  # dropped, never followed

    folder = make_folder_dataset(tmp_path)
    (folder / "splits").mkdir()
    (folder / "splits" / "train.txt").write_text("img0\n../voc/JPEGImages/2007_000000.jpg\n")
    with pytest.raises(DataError, match="ids must be plain image ids"):
        open_dataset(folder, "train")

    pytest.importorskip("pycocotools")
    coco = make_coco_dataset(tmp_path)
    ann = coco / "annotations" / "instances_val2014.json"
    spec = json.loads(ann.read_text())
    spec["images"][0]["file_name"] = "../../secret.jpg"
    ann.write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"instances_val2014.json: file_name must be inside .* ../../secret.jpg"):
        open_dataset(coco, "val")


# ------------------------------------------------------------------------------------------- kill -9


TKP_OVERRIDES = ["train.epochs=3", "train.max_steps_per_epoch=2", "train.batch_size=4", "data.crop_size=64",
                 "model.backbone.pretrained=false", "data.num_workers=1", "train.extend_unrecognised=0"]


def _tkp_args(root: Path) -> list[str]:
    return [a for o in [f"data.root={root}", *TKP_OVERRIDES] for a in ("-o", o)]


@pytest.fixture(scope="module")
def tkp_run(tmp_path_factory):
    """(run, data): the demo/tkp preset (MobileNetV2, frozen first epoch, a loader worker), trained
    uninterrupted through the CLI on a tiny dataset."""
    tmp = tmp_path_factory.mktemp("tkp")
    data = make_voc(tmp / "data")
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(sys, "argv", ["wsss", "train", "demo/tkp", "--out", str(tmp / "run"), *_tkp_args(data)])
        with pytest.raises(SystemExit) as e:
            cli.main()
        assert e.value.code in (0, None)
    finally:
        mp.undo()
    return tmp / "run", data


@pytest.mark.slow
def test_kill_during_training_then_resume_is_exact(monkeypatch, capsys, tmp_path, tkp_run):
    straight, data = tkp_run
    killed = tmp_path / "killed"
    kill_when(["train", "demo/tkp", "--out", killed, *_tkp_args(data)], lambda: (killed / "last.pt").is_file(),
              tmp_path / "train.log")
    assert load_checkpoint(killed / "last.pt")["epoch"] < 3  # killed mid-run

    code, out, err = run_cli(monkeypatch, capsys, "train", "demo/tkp", "--out", killed, "--resume", *_tkp_args(data))
    assert code == 0, err
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(straight / name), load_checkpoint(killed / name)
        assert a["epoch"] == b["epoch"] and same_state(a["model"], b["model"]), name
    losses = [[json.loads(ln)["loss"] for ln in (r / "log.jsonl").read_text().splitlines()] for r in (straight, killed)]
    assert losses[0] == losses[1] and len(losses[0]) == 3

    mious = []
    for run in (straight, killed):
        code, out, err = run_cli(monkeypatch, capsys, "pseudo-label", run, "--data", data, "--split", "val",
                                 "--out", tmp_path / f"masks_{run.name}")
        assert code == 0, err
        mious.append(json.loads(out)["miou"])
    assert mious[0] == mious[1] and mious[0] is not None


N_BIG = 30


@pytest.fixture(scope="module")
def big_data(tmp_path_factory) -> Path:
    """N_BIG training images, enough for a kill to land mid-run (~0.1 s an image)."""
    return make_voc(tmp_path_factory.mktemp("big") / "data", n_train=N_BIG, n_val=1, seed=1)


@pytest.mark.slow
def test_kill_during_pseudo_label_then_rerun_is_byte_identical(monkeypatch, capsys, tmp_path, tkp_run, big_data):
    run, _ = tkp_run
    n, data = N_BIG, big_data
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    kill_when(["pseudo-label", run, "--data", data, "--split", "train", "--out", killed],
              lambda: len(list(killed.glob("*.png"))) >= 3, tmp_path / "pl.log")
    assert 3 <= len(list(killed.glob("*.png"))) < n  # killed mid-run

    code, out, err = run_cli(monkeypatch, capsys, "pseudo-label", run, "--data", data, "--split", "train", "--out", killed)
    assert code == 0, err
    resumed = json.loads(out)
    assert 0 < resumed["computed"] < n
    code, out, err = run_cli(monkeypatch, capsys, "pseudo-label", run, "--data", data, "--split", "train", "--out", clean)
    assert code == 0, err
    assert json.loads(out)["computed"] == n and json.loads(out)["miou"] == resumed["miou"]

    names = sorted(p.name for p in clean.glob("*.png"))
    assert len(names) == n and names == sorted(p.name for p in killed.glob("*.png"))
    for name in [*names, "summary.json"]:
        assert (clean / name).read_bytes() == (killed / name).read_bytes(), name


@pytest.mark.slow
def test_kill_during_predict_then_rerun_is_byte_identical(monkeypatch, capsys, tmp_path, tkp_run, big_data):
    run, _ = tkp_run
    images = big_data / "JPEGImages"
    n = len(list(images.glob("*.png")))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    kill_when(["predict", run, images, "--out", killed, "--overlay"],
              lambda: len([p for p in killed.glob("*.png")]) >= 3, tmp_path / "predict.log")
    assert 3 <= len(list(killed.glob("*.png"))) < n  # killed mid-run

    code, out, err = run_cli(monkeypatch, capsys, "predict", run, images, "--out", killed, "--overlay")
    assert code == 0, err
    assert 0 < json.loads(out)["computed"] < n and json.loads(out)["failed"] == []
    code, out, err = run_cli(monkeypatch, capsys, "predict", run, images, "--out", clean, "--overlay")
    assert code == 0 and json.loads(out)["computed"] == n, err

    names = sorted(p.name for p in clean.iterdir())
    assert len(names) == 2 * n and names == sorted(p.name for p in killed.iterdir() if not p.name.startswith("."))
    for name in names:
        assert (clean / name).read_bytes() == (killed / name).read_bytes(), name


def test_pseudo_label_skip_bad(monkeypatch, capsys, tmp_path, tkp_run):
    """Bad images stop pseudo-labelling with their name (read in a loader worker: still one line); with
    --skip-bad the others are written and the bad ones listed in the summary."""
    run, _ = tkp_run
    data = make_voc(tmp_path / "data", n_train=4, n_val=1)
    jpg = data / "JPEGImages"
    (jpg / "tr01.png").write_bytes((jpg / "tr01.png").read_bytes()[:300])  # truncated PNG
    (jpg / "tr02.png").write_text("not a PNG")
    args = ["pseudo-label", run, "--data", data, "--split", "train"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "strict")
    assert code == 1 and f"{jpg / 'tr01.png'}: corrupt or truncated image" in error_line(err)

    code, out, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "masks", "--skip-bad")
    assert code == 0, err
    skipped = json.loads(out)["skipped"]
    assert [s.split(":")[0] for s in skipped] == [str(jpg / "tr01.png"), str(jpg / "tr02.png")]
    assert "not an image" in skipped[1]
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.png")) == ["tr00.png", "tr03.png"]
    assert json.loads((tmp_path / "masks" / "summary.json").read_text())["skipped"] == skipped
