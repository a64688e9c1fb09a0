"""The HTML report: sections, embedded images only (no external references), escaping, the discovery of
outputs, and a render in headless Chromium when it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import make_voc_dataset
from wsss.config import load_config, save_config
from wsss.io import atomic_write_json, read_mask, write_mask
from wsss.report import write_report

CLASSES = ["background", "red", "green"]


def _fake_run(tmp_path, data_root):
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("demo/tkp_pcl", [f"data.root={data_root}"]), run / "config.yaml")
    with open(run / "config.yaml", "a") as f:
        f.write("# <script>alert('x')</script>\n")
    (run / "classes.json").write_text(json.dumps(CLASSES))
    log = [{"epoch": e, "loss": 1.0 / e, "mce": 0.8 / e, "pce": 0.2 / e, "lr": 1e-3, "step": 4 * e,
            "seconds": 2.5, "img_s": 10.0, "miou": 0.2 + 0.1 * e, "val_seconds": 0.5} for e in (1, 2, 3)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"epoch": 4, "lo')  # torn line
    return run


def _outputs(folder, root, ids, miou, crf=False, foreground=None):
    """A mask folder as `wsss pseudo-label` leaves it: the GT masks shifted a little, and a summary."""
    for i in ids:
        write_mask(folder / f"{i}.png", np.roll(read_mask(root / "SegmentationClass" / f"{i}.png"), 2, axis=1))
    per_class = {c: {"iou": miou, "precision": 0.9, "recall": 0.8} for c in CLASSES}
    summary = {"miou": miou, "per_class": per_class, "split": "val", "crf": crf}
    if foreground:  # summaries from before wsss recorded the split have none
        summary["foreground"] = foreground
    atomic_write_json(folder / "summary.json", summary)


@pytest.fixture
def demo(tmp_path):
    ids = [f"img{k}" for k in range(12)]
    demo = tmp_path / "demo"
    root = make_voc_dataset(demo, ids=ids, class_names=CLASSES, size=(48, 40), name="data",
                            splits={"train": ids[:2], "val": ids[2:]})
    val = ids[2:]
    _outputs(demo / "pseudo" / "val", root, val, 0.5)
    _outputs(demo / "pseudo" / "val_crf", root, val, 0.6, crf=True,
             foreground={"iou": 0.725, "precision": 0.8, "recall": 0.9, "class_accuracy": 0.9})
    _outputs(demo / "predict" / "val", root, val[:3], 0.55)  # partial: missing cells shown as "-"
    atomic_write_json(demo / "summary.json", {"seconds": {"data": 1.0, "train": 20.5}, "total_seconds": 21.5})
    return demo, root


def test_report_content(demo, tmp_path):
    demo_dir, root = demo
    run = _fake_run(tmp_path, root)
    path = write_report(run, demo_dir=demo_dir)
    assert path == run / "report.html"
    text = path.read_text(encoding="utf-8")
    for section in ("curves", "per-class", "gallery", "timings", "config"):
        assert f'id="{section}"' in text
    assert not re.search(r"https?://", text)  # self-contained: nothing fetched from anywhere
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    gallery = text.split('id="gallery"')[1].split('id="timings"')[0]
    # 8 rows: image + ground truth + pseudo + pseudo + CRF, + stage 2 for the first 3 only
    assert len(re.findall(r"<img ", gallery)) == 8 * 4 + 3 and gallery.count("<tr>") == 9
    for label in ("pseudo", "pseudo + CRF", "stage 2", "ground truth"):
        assert f"<th>{label}</th>" in gallery
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text and "<script>" not in text
    assert "20.5" in text and "best val mIoU 50.00%" in text
    # the mIoU's split into extent and class assignment, where the summary has it, blank where not
    assert "<td>60.00</td><td>72.5</td><td>90.0</td>" in text and "<td>50.00</td><td></td><td></td>" in text
    # a decoded gallery image is a real PNG
    import base64
    import io

    im = Image.open(io.BytesIO(base64.b64decode(srcs[-1].split(",", 1)[1])))
    assert im.format == "PNG" and max(im.size) <= 224


def test_report_plain_run_discovers_outputs_inside(demo, tmp_path):
    _, root = demo
    run = _fake_run(tmp_path, root)
    _outputs(run / "pseudo_val", root, [f"img{k}" for k in range(2, 12)], 0.4)
    text = write_report(run).read_text(encoding="utf-8")
    gallery = text.split('id="gallery"')[1].split('id="timings"')[0]
    assert "<th>pseudo_val</th>" in gallery and len(re.findall(r"<img ", gallery)) == 8 * 3
    assert "<td class=l>pseudo_val</td>" in text


def test_report_bare_run(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    text = write_report(run).read_text(encoding="utf-8")
    assert "No training log" in text and "No evaluated outputs" in text
    assert not re.search(r"https?://", text)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_chromium(demo, tmp_path):
    demo_dir, root = demo
    path = write_report(_fake_run(tmp_path, root), demo_dir=demo_dir)
    shot = tmp_path / "shot.png"
    cmd = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
        path.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2000, 1200) and pixels.std() > 10  # not blank: text, plots and images drawn
