"""Provenance (env.json in every run folder) and the protocol on every mIoU written."""

from __future__ import annotations

import html
import json
import subprocess
import sys

import pytest
import torch

from conftest import run_cli
from engine_fakes import make_cfg
from wsss.provenance import PROTOCOL_KEYS, environment, git_info, protocol_text, write_env


def test_environment_content(monkeypatch):
    import timm

    import wsss

    monkeypatch.setattr(sys, "argv", ["wsss", "train", "x.yaml"])
    env = environment(world_size=3)
    assert env["wsss"] == wsss.__version__ and env["argv"] == ["wsss", "train", "x.yaml"]
    assert env["torch"] == torch.__version__ and env["timm"] == timm.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3])) and env["world_size"] == 3
    assert env["cuda"] == torch.version.cuda and "cudnn" in env and env["devices"]
    assert env["threads"] == torch.get_num_threads() and isinstance(env["cpu"], str)
    json.dumps(env)  # JSON-able


def test_git_info_in_a_checkout_and_silent_outside(tmp_path):
    assert git_info(tmp_path) == {}  # not a repo: nothing, no error
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no git")
    repo = tmp_path / "repo"
    repo.mkdir()
    run = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (repo / "f.txt").write_text("a")
    run("add", "f.txt")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    info = git_info(repo)
    assert len(info["commit"]) == 40 and info["dirty"] is False
    (repo / "f.txt").write_text("b")
    assert git_info(repo)["dirty"] is True


def test_train_and_pseudo_label_folders_have_env_and_protocol(voc, tmp_path, monkeypatch, capsys):
    """env.json in the run and pseudo-label folders; the protocol in summary.json, sweep.json,
    `wsss evaluate --json` and the report."""
    from wsss.engine.pseudo_masks import pseudo_label
    from wsss.engine.trainer import train
    from wsss.report.html import write_report

    run = tmp_path / "run"
    train(make_cfg(voc, epochs=1, val_every=1), run, progress=False)
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] == torch.__version__

    res = pseudo_label(run, voc, "val", run / "pseudo_val", predicted_tags=True, progress=False)
    summary = json.loads((run / "pseudo_val" / "summary.json").read_text())
    assert (run / "pseudo_val" / "env.json").is_file()
    p = summary["protocol"]
    assert set(PROTOCOL_KEYS) <= set(p) and p == res["protocol"]
    assert p["split"] == "val" and p["stage"] == "seeds" and p["tags"] == "predicted" and p["crf"] is None
    assert p["scales"] == [1.0] and p["flip"] is False and p["checkpoint"] == "best on val"

    code, _, err = run_cli(monkeypatch, capsys, "evaluate", run / "pseudo_val", "--data", voc, "--split", "val",
                           "--json", tmp_path / "eval.json")
    assert code == 0, err
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["protocol"] == p and ev["miou"] == pytest.approx(summary["miou"])

    bare = tmp_path / "bare"  # masks wsss did not write: protocol fields present, "unknown"
    bare.mkdir()
    for f in (run / "pseudo_val").glob("*.png"):
        (bare / f.name).write_bytes(f.read_bytes())
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", bare, "--data", voc, "--json", tmp_path / "bare.json")
    bp = json.loads((tmp_path / "bare.json").read_text())["protocol"]
    assert code == 0 and set(PROTOCOL_KEYS) <= set(bp) and bp["stage"] == "unknown" and bp["split"] == "val"

    page = write_report(run).read_text()
    assert 'id="provenance"' in page and torch.__version__ in page
    assert f"<td class=l>threads</td><td class=l>{env['threads']}</td>" in page  # what a CPU run repeats on
    assert html.escape(protocol_text(p), quote=True) in page


def test_write_env(tmp_path):
    path = write_env(tmp_path / "x", world_size=2)
    assert json.loads(path.read_text())["world_size"] == 2


def test_tensorboard_event_file(voc, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from wsss.engine.trainer import train

    run = tmp_path / "run"
    train(make_cfg(voc, epochs=2, val_every=1, tensorboard=True), run, progress=False)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "train/lr" in tags and "epoch/miou" in tags
    assert [e.step for e in acc.Scalars("epoch/miou")] == [1, 2]
