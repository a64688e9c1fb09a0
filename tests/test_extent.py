"""The extent guard (wsss.engine.extent, `infer.extent_guard`): masks far too small for the run's own
classifier grow, others are left as they are, the decision is cached per checkpoint and reported."""

from __future__ import annotations

import json
import os

import pytest
import torch

from engine_fakes import make_cfg, make_voc
from wsss.engine import extent as ext
from wsss.engine.pseudo_masks import pseudo_label
from wsss.engine.trainer import train


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"))


def _run(voc, tmp_path, name: str, guard: float, has_background: bool = True, max_area: float = 0.0,
         target_area: float | None = None):
    cfg = make_cfg(voc, epochs=1, val_every=0, method={"has_background": has_background})  # last.pt only
    cfg.infer.extent_guard = guard
    cfg.infer.extent_max_area = max_area  # 0: the grow side alone, unless a test asks for the shrink side
    if target_area is not None:  # else the config's default
        cfg.infer.extent_target_area = target_area
    train(cfg, tmp_path / name, progress=False)
    return tmp_path / name


class Curve:
    """The Calibration interface over a fixed curve, recording what was computed."""

    def __init__(self, curve):
        self.curve, self.asked = curve, []

    def row(self, s):
        self.asked.append(s)
        return self.curve[s]

    def rows(self, settings):
        return {s: self.row(s) for s in settings}


def test_guard_grows_only_masks_that_keep_too_little():
    settings = [0.2, 0.5, 0.8]
    right = Curve({0.2: {"area": 0.6, "kept_ratio": 0.9}, 0.5: {"area": 0.3, "kept_ratio": 0.7},
                   0.8: {"area": 0.1, "kept_ratio": 0.4}})
    assert ext.guarded_choice(right, settings, 0.5, 0.5)[0] == 0.5 and set(right.asked) == {0.5}  # one setting
    # at 0.8 the masks keep 0.4 < 0.5: the smallest masks that keep half, not the largest
    assert ext.guarded_choice(right, settings, 0.8, 0.5)[0] == 0.5
    far = Curve({0.2: {"area": 0.3, "kept_ratio": 0.3}, 0.5: {"area": 0.2, "kept_ratio": 0.2},
                 0.8: {"area": 0.1, "kept_ratio": 0.1}})
    assert ext.guarded_choice(far, settings, 0.8, 0.5)[0] == 0.2  # none keeps half: the largest masks


def test_bg_power_lowers_the_background_channel_and_grows_the_masks():
    from types import SimpleNamespace

    from engine_fakes import FakeConfig, FakeMethod
    from wsss.config import InferConfig
    from wsss.engine.inference import seed_mask, seed_probs

    torch.manual_seed(0)
    method = FakeMethod(FakeConfig(), SimpleNamespace(), 3).eval()
    image = torch.randn(3, 32, 32)
    plain = seed_probs(method, image, [1], InferConfig(), (32, 32))[1]
    keep, powered = seed_probs(method, image, [1], InferConfig(bg_power=4.0), (32, 32))
    assert torch.allclose(powered[0], plain[0].clamp_min(0).pow(4.0)) and torch.equal(powered[1:], plain[1:])
    # the engine's masks at a power are the guard's masks at that setting
    assert (ext.masks_at(method, keep, plain, 4.0).numpy() == seed_mask(keep, powered)).all()
    assert (seed_mask(keep, powered) > 0).sum() >= (seed_mask(keep, plain) > 0).sum()


def test_pseudo_label_grows_masks_under_the_bar_and_caches_the_choice(voc, tmp_path, capsys, monkeypatch):
    run = _run(voc, tmp_path, "run", guard=50.0)  # a bar no mask reaches: the largest masks on the grid
    off = pseudo_label(run, voc, "val", tmp_path / "off", extent_guard=False, progress=False)
    assert "extent" not in off
    res = pseudo_label(run, voc, "val", tmp_path / "on", progress=False)
    e = res["extent"]
    assert e["knob"] == "bg_power" and e["shipped"] == 1.0 and e["chosen"] == max(ext.POWERS)
    assert set(e["kept"]) == {f"{p:g}" for p in ext.POWERS}  # the whole grid, as the guard fired
    assert "keep" in capsys.readouterr().err  # the console says what moved and why
    assert res["protocol"]["bg_threshold_chosen"].endswith("to the power 4 (extent guard on 8 train images)")
    fg = lambda r: r["diagnostics"]["foreground_fraction"]  # noqa: E731
    assert fg(res) > fg(off)
    cache = run / "extent_last.json"
    assert json.loads(cache.read_text())["chosen"] == max(ext.POWERS)

    made = []
    monkeypatch.setattr(ext.Calibration, "__init__", lambda *a, **k: made.append(1) or (_ for _ in ()).throw(
        AssertionError("recomputed")))
    again = pseudo_label(run, voc, "val", tmp_path / "again", progress=False)  # the cache answers
    assert again["extent"] == e and not made
    with pytest.raises(AssertionError, match="recomputed"):  # other maps (scales): decided again
        pseudo_label(run, voc, "val", tmp_path / "scales", scales=[1.0, 0.5], progress=False)
    st = (run / "last.pt").stat()
    os.utime(run / "last.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # new weights: asked again
    with pytest.raises(AssertionError, match="recomputed"):
        pseudo_label(run, voc, "val", tmp_path / "again2", progress=False)


def test_guard_leaves_masks_that_keep_enough_bit_identical(voc, tmp_path, capsys):
    run = _run(voc, tmp_path, "run", guard=1e-6)  # every non-empty mask keeps that much
    res = pseudo_label(run, voc, "val", tmp_path / "on", progress=False)
    off = pseudo_label(run, voc, "val", tmp_path / "off", extent_guard=False, progress=False)
    assert res["extent"]["chosen"] == res["extent"]["shipped"] == 1.0 and list(res["extent"]["kept"]) == ["1"]
    assert "keep" not in capsys.readouterr().err and "extent" not in off
    for png in sorted((tmp_path / "off").glob("*.png")):
        assert png.read_bytes() == (tmp_path / "on" / png.name).read_bytes()


def test_cam_guard_lowers_the_threshold_unless_the_caller_sets_one(voc, tmp_path):
    run = _run(voc, tmp_path, "cam", guard=50.0, has_background=False)
    res = pseudo_label(run, voc, "val", tmp_path / "on", progress=False)
    assert res["extent"]["knob"] == "bg_threshold" and res["extent"]["chosen"] == min(ext.THRESHOLDS)
    assert res["protocol"]["bg_threshold"] == min(ext.THRESHOLDS)
    assert res["protocol"]["bg_threshold_chosen"].startswith("extent guard")
    given = pseudo_label(run, voc, "val", tmp_path / "given", bg_threshold=0.4, progress=False)
    assert "extent" not in given and given["protocol"]["bg_threshold"] == 0.4


def test_extent_guard_flag_turns_it_on_for_a_run_configured_without_it(voc, tmp_path):
    run = _run(voc, tmp_path, "run", guard=0.0)
    assert "extent" not in pseudo_label(run, voc, "val", tmp_path / "plain", progress=False)
    res = pseudo_label(run, voc, "val", tmp_path / "on", extent_guard=True, progress=False)
    assert res["extent"]["guard"] == ext.DEFAULT_GUARD and res["extent"]["shipped"] == 1.0


def test_pseudo_label_shrinks_masks_over_the_area_bound(voc, tmp_path, capsys):
    # the masks keep enough and cover too much; the target under the bound, as the config requires
    run = _run(voc, tmp_path, "wide", guard=1e-6, max_area=1e-6, target_area=5e-7)
    off = pseudo_label(run, voc, "val", tmp_path / "off", extent_guard=False, progress=False)
    res = pseudo_label(run, voc, "val", tmp_path / "on", progress=False)
    e = res["extent"]
    assert e["max_area"] == 1e-6 and set(e["area"]) == {f"{p:g}" for p in ext.POWERS}  # the whole grid
    # the largest masks within the target area, else (here, unless a mask is empty) the smallest of the grid
    assert e["target_area"] == 5e-7
    within = [s for s in e["area"] if e["area"][s] <= 5e-7]
    want = max(within, key=lambda s: e["area"][s]) if within else min(e["area"], key=lambda s: e["area"][s])
    assert f"{e['chosen']:g}" == want and e["chosen"] < 1
    assert "too large" in capsys.readouterr().err
    fg = lambda r: r["diagnostics"]["foreground_fraction"]  # noqa: E731
    assert fg(res) < fg(off)


def test_guard_shrinks_masks_that_cover_too_much_and_only_those():
    settings = [0.25, 0.5, 1.0]
    curve = {0.25: {"area": 0.2, "kept_ratio": 0.4}, 0.5: {"area": 0.35, "kept_ratio": 0.8},
             1.0: {"area": 0.7, "kept_ratio": 1.0}}
    wide = Curve(curve)
    # at 1.0 the masks keep the score but cover 70% of the pixels: the smallest masks that keep half
    assert ext.guarded_choice(wide, settings, 1.0, 0.5, 0.4)[0] == 0.5
    assert ext.guarded_choice(Curve(curve), settings, 1.0, 0.5, 0.0)[0] == 1.0  # 0: the guard only grows
    right = Curve(curve)
    assert ext.guarded_choice(right, settings, 0.5, 0.5, 0.4)[0] == 0.5 and set(right.asked) == {0.5}  # one setting
    # target area 0 (rule 24): the target is the score's, not the bound's: masks that still keep half go under it
    keeps = Curve({**curve, 0.25: {"area": 0.2, "kept_ratio": 0.6}})
    assert ext.guarded_choice(keeps, settings, 1.0, 0.5, 0.4)[0] == 0.25
    # a target area (rule 25): the largest masks within it, whatever share of the score the smaller ones keep
    assert ext.guarded_choice(Curve(curve), settings, 1.0, 0.5, 0.4, 0.25)[0] == 0.25
    assert ext.guarded_choice(Curve(curve), settings, 1.0, 0.5, 0.4, 0.36)[0] == 0.5
    assert ext.guarded_choice(keeps, settings, 1.0, 0.5, 0.4, 0.1)[0] == 0.25  # none within: the smallest masks
    assert ext.guarded_choice(Curve(curve), settings, 0.5, 0.5, 0.4, 0.25)[0] == 0.5  # not too large: kept
    # too small wins over too large: a setting that keeps under the bar grows, whatever its area
    small = Curve({**curve, 1.0: {"area": 0.7, "kept_ratio": 0.3}})
    assert ext.guarded_choice(small, settings, 1.0, 0.5, 0.4)[0] == 0.5
    assert ext.guarded_choice(small, settings, 1.0, 0.5, 0.4, 0.25)[0] == 0.5
