"""`wsss run`: the whole chain on tiny data, resumable stage by stage, every number with its protocol."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import run_cli
from wsss.pipeline import STAGE_MARKER
from wsss.provenance import PROTOCOL_KEYS

TINY = ["data.crop_size=32", "data.num_workers=0", "train.batch_size=4", "train.trainable_blocks=2",
        "train.epochs=1", "train.freeze_backbone_epochs=0", "infer.crf.workers=0", "infer.scales=[1.0]",
        "infer.size=64", "train.amp=off"]


def _args(voc, out, *extra):
    args = ["run", "demo/tkp_pcl", "--data", voc, "--out", out, *extra]
    for o in TINY:
        args += ["-o", o]
    return args


@pytest.mark.slow
def test_run_end_to_end_then_resume_redoes_only_the_missing_stage(monkeypatch, capsys, voc, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_cli(monkeypatch, capsys, *_args(voc, out, "-o", "reference.pseudo_val_crf=50.0",
                                                             "-o", "reference.source=a paper"))
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    for key in ("pseudo_val", "pseudo_val_crf", "pseudo_train_crf", "segment_val", "segment_val_crf"):
        assert 0 <= summary[f"{key}_miou"] <= 1, key
        assert set(PROTOCOL_KEYS) <= set(summary["protocols"][key]), key
        folder_summary = json.loads((out / {"pseudo_val": "pseudo/val", "pseudo_val_crf": "pseudo/val_crf",
                                            "pseudo_train_crf": "pseudo/train_crf", "segment_val": "predict/val",
                                            "segment_val_crf": "predict/val_crf"}[key] / "summary.json").read_text())
        assert folder_summary["protocol"] == summary["protocols"][key]
    p = summary["protocols"]
    assert p["pseudo_val"]["stage"] == "seeds" and p["pseudo_val_crf"]["stage"] == "crf"
    assert p["pseudo_val_crf"]["crf"] == "psa" and p["pseudo_val"]["crf"] is None
    assert p["pseudo_val"]["tags"] == "gt" and p["segment_val"]["tags"] == "predicted"
    assert p["segment_val"]["stage"] == "stage2" and p["pseudo_train_crf"]["split"] == "train"
    assert p["pseudo_val"]["checkpoint"] in ("last", "best on val")
    for folder in ("run", "segment", "pseudo/val", "predict/val_crf", "."):
        env = json.loads((out / folder / "env.json").read_text())
        assert env["torch"] == torch.__version__ and env["world_size"] == 1
    assert (out / "run" / "report.html").is_file()
    assert "reference" in stdout and "a paper" in stdout and "pseudo_val_crf" in stdout
    assert summary["reference"]["pseudo_val_crf"] == 50.0
    assert set(summary["redone"]) == {"train", "pseudo_val", "pseudo_val_crf", "pseudo_train_crf", "segment",
                                      "segment_val", "segment_val_crf"}
    before = {f: (out / f / STAGE_MARKER).stat().st_mtime_ns for f in ("run", "segment", "pseudo/val")}

    shutil.rmtree(out / "pseudo" / "val_crf")  # one stage's output lost
    code, _, err = run_cli(monkeypatch, capsys, *_args(voc, out))
    assert code == 0, err
    again = json.loads((out / "summary.json").read_text())
    assert again["redone"] == ["pseudo_val_crf"]
    assert again["pseudo_val_crf_miou"] == summary["pseudo_val_crf_miou"]
    assert {f: (out / f / STAGE_MARKER).stat().st_mtime_ns for f in before} == before

    shutil.rmtree(out / "segment")  # stage 2 again: its predictions follow it
    code, _, err = run_cli(monkeypatch, capsys, *_args(voc, out))
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["redone"] == ["segment", "segment_val", "segment_val_crf"]


@pytest.mark.slow
def test_run_seeds_mean_sd_and_cam_sweep(monkeypatch, capsys, voc, tmp_path):
    """--seeds 2 on a CAM method: one chain per seed, the background threshold swept on train and
    labelled so, mean +- sd in the summary."""
    out = tmp_path / "out"
    args = _args(voc, out, "--seeds", "2", "--no-crf", "--no-segment")
    args[1] = "demo/cam_cnn"
    code, stdout, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    for s in (0, 1):
        run = summary["runs"][str(s)]
        assert run["protocols"]["pseudo_val"]["bg_threshold_chosen"] == "swept on train"
        assert run["protocols"]["pseudo_val"]["bg_threshold"] == run["bg_threshold"]
        assert (out / f"seed{s}" / "pseudo" / "train_sweep" / "sweep.json").is_file()
    assert set(summary["mean"]) == {"pseudo_val_miou", "pseudo_train_miou"} and "pseudo_val_miou" in summary["sd"]
    assert "mean +- sd" in stdout
