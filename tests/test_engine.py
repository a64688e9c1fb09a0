"""The training loop: exact resume, NaN stop, log.jsonl, frozen warm-up, run folder."""

from __future__ import annotations

import json

import pytest
import torch

from engine_fakes import Crash, FakeConfig, FakeMethod, make_cfg, make_voc
from wsss.engine.trainer import lr_factor, train
from wsss.errors import TrainingError
from wsss.io import load_checkpoint


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"))


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; the machine is shared
    yield
    torch.set_num_threads(n)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact(voc, tmp_path):
    straight = tmp_path / "straight"
    train(make_cfg(voc), straight, progress=False)

    broken = tmp_path / "broken"
    steps = 2  # 8 images / batch 4
    with pytest.raises(Crash):  # "killed" in the first step of epoch 3
        train(make_cfg(voc, method={"crash_at_step": 2 * steps}), broken, progress=False)
    assert load_checkpoint(broken / "last.pt")["epoch"] == 2
    with open(broken / "log.jsonl", "a") as f:  # as if killed between the log line and last.pt of epoch 3
        f.write(json.dumps({"epoch": 3, "loss": 1.0}) + "\n")
    summary = train(make_cfg(voc), broken, resume=True, progress=False)
    assert summary["epochs"] == 3

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(broken / "last.pt")
    assert _same(a["model"], b["model"])
    assert a["global_step"] == b["global_step"] == 3 * steps
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        assert _same(a["optimizer"]["state"][k], b["optimizer"]["state"][k])

    drop = ("seconds", "img_s", "val_seconds")
    la = [{k: v for k, v in json.loads(x).items() if k not in drop} for x in (straight / "log.jsonl").read_text().splitlines()]
    lb = [{k: v for k, v in json.loads(x).items() if k not in drop} for x in (broken / "log.jsonl").read_text().splitlines()]
    assert la == lb and [r["epoch"] for r in la] == [1, 2, 3]


def test_existing_run_needs_resume(voc, tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(voc, epochs=1)
    train(cfg, run, progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg, run, progress=False)
    # resuming a finished run is a no-op that reports it
    assert train(cfg, run, resume=True, progress=False)["epochs"] == 1


def test_nan_stops_and_keeps_last_checkpoint(voc, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        train(make_cfg(voc, method={"nan_at_step": 3}), run, progress=False)  # epoch 2, step 2
    msg = str(err.value)
    assert "epoch 2" in msg and "step 2" in msg and "mce=" in msg and "loss=nan" in msg
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 1 and state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len((run / "log.jsonl").read_text().splitlines()) == 1


def test_run_folder_and_log(voc, tmp_path):
    run = tmp_path / "run"
    summary = train(make_cfg(voc, epochs=2, val_every=1), run, progress=False)
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "classes.json", "log.jsonl", "last.pt", "best.pt"}
    assert json.loads((run / "classes.json").read_text()) == ["background", "red", "green"]
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"loss", "mce", "reg", "lr", "seconds", "img_s", "step", "miou"} <= r.keys()
        assert 0 <= r["miou"] <= 1
    assert records[-1]["step"] == 4
    assert summary["best_miou"] == max(r["miou"] for r in records)
    assert summary["miou"] == records[-1]["miou"]
    best = load_checkpoint(run / "best.pt")
    assert best["miou"] == summary["best_miou"]
    # the run folder rebuilds the method
    from wsss.engine.inference import load_run

    cfg, method, names = load_run(run)
    assert cfg.method.name == "fake" and names[0] == "background" and not method.training


def test_val_every_zero_never_validates(voc, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(voc, epochs=2, val_every=0), run, progress=False)
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and not any("miou" in r for r in records)
    assert (run / "last.pt").is_file() and not (run / "best.pt").exists()


def test_frozen_warmup_then_last_blocks(voc, tmp_path):
    init = FakeMethod(FakeConfig(), None, 3).state_dict()
    run = tmp_path / "run"
    cfg = make_cfg(voc, epochs=2, freeze_backbone_epochs=1, trainable_blocks=1, method={"crash_at_step": 2})
    with pytest.raises(Crash):  # stop right after the frozen epoch
        train(cfg, run, progress=False)
    frozen = load_checkpoint(run / "last.pt")["model"]
    for k in init:
        if k.startswith("backbone."):  # weights and BatchNorm statistics alike
            assert torch.equal(frozen[k], init[k]), k
    assert not torch.equal(frozen["classifier.weight"], init["classifier.weight"])

    cfg.method.crash_at_step = -1
    train(cfg, run, resume=True, progress=False)
    final = load_checkpoint(run / "last.pt")["model"]
    for k in init:
        if k.startswith(("backbone.b0", "backbone.b1")):
            assert torch.equal(final[k], init[k]), k
    assert not torch.equal(final["backbone.b2.0.weight"], frozen["backbone.b2.0.weight"])
    assert not torch.equal(final["classifier.weight"], frozen["classifier.weight"])


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "poly") == pytest.approx((1 - 99 / 100) ** 0.9)
    assert lr_factor(50, 100, 0, "constant") == 1.0


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_optimizers_and_clip(voc, tmp_path, opt):
    summary = train(make_cfg(voc, epochs=1, optimizer=opt, grad_clip=1.0, scheduler="poly", max_steps_per_epoch=1),
                    tmp_path / "run", progress=False)
    assert summary["epochs"] == 1
    assert load_checkpoint(tmp_path / "run" / "last.pt")["global_step"] == 1


# ------------------------------------------------------------------------------- real methods, end to end

E2E = ["data.crop_size=32", "data.num_workers=0", "train.batch_size=4", "train.trainable_blocks=2",
       "train.freeze_backbone_epochs=1", "infer.crf.workers=0", "infer.flip=true",
       "train.extend_unrecognised=0"]  # a few steps never learn the tags: no extra schedules here


@pytest.mark.slow
def test_tkp_pcl_end_to_end_exact_resume(voc, tmp_path, monkeypatch):
    """TKP-PCL (top-K, PCE, ET: random transforms and dropout) on the offline MobileNetV2: exact resume
    across the end of the frozen warm-up, then pseudo masks with CRF from the run."""
    from wsss.config import load_config
    from wsss.engine.pseudo_masks import pseudo_label
    from wsss.methods.patch_classification import PatchClassifier

    cfg = load_config("demo/tkp_pcl", [f"data.root={voc}", *E2E, "train.epochs=3", "method.et.weight=1.0",
                                       "method.pce.weight=0.5", "method.pce.confidence=0.1"])
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    summary = train(cfg, straight, progress=False)
    assert summary["epochs"] == 3 and summary["miou"] is not None

    calls, original = [0], PatchClassifier.forward_losses

    def crash_in_epoch_3(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:  # 2 steps an epoch: the first step of epoch 3
            raise Crash("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PatchClassifier, "forward_losses", crash_in_epoch_3)
    with pytest.raises(Crash):
        train(cfg, broken, progress=False)
    monkeypatch.undo()
    train(cfg, broken, resume=True, progress=False)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(broken / "last.pt")
    assert _same(a["model"], b["model"])
    assert a["best_miou"] == b["best_miou"]

    res = pseudo_label(straight, voc, "val", tmp_path / "pseudo", crf=True, progress=False)
    assert 0 <= res["miou"] <= 1 and len(list((tmp_path / "pseudo").glob("*.png"))) == 4


@pytest.mark.slow
def test_usage_end_to_end_sweep(voc, tmp_path):
    """USAGE (EMA teacher: after_step, parameters outside the optimizer) trains; its seeds sweep."""
    from wsss.config import load_config
    from wsss.engine.pseudo_masks import pseudo_label

    cfg = load_config("demo/usage_cnn", [f"data.root={voc}", *E2E, "train.epochs=2"])
    train(cfg, tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert any(k.startswith("teacher.") for k in state)
    res = pseudo_label(tmp_path / "run", voc, "val", tmp_path / "sweep", sweep_thresholds=[0.2, 0.4], progress=False)
    assert set(res["sweep"]) == {0.2, 0.4}


def test_freeze_bn_keeps_the_backbone_statistics(voc, tmp_path):
    """train.freeze_bn: backbone BatchNorm in eval mode throughout (its running statistics never move),
    while the weights still train; without it the statistics follow the batches."""
    init = FakeMethod(FakeConfig(), None, 3).state_dict()
    key = "backbone.b0.1.running_mean"
    for freeze, moved in ((True, False), (False, True)):
        out = tmp_path / f"run_{freeze}"
        train(make_cfg(voc, epochs=1, freeze_bn=freeze), out, progress=False)
        state = load_checkpoint(out / "last.pt")["model"]
        assert (not torch.equal(state[key], init[key])) is moved
        assert not torch.equal(state["backbone.b0.0.weight"], init["backbone.b0.0.weight"])
