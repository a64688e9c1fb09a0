"""Seed refinement by learned affinity: confident labels, pair loss, sparse random walk, `wsss refine`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engine_fakes import make_cfg, make_voc
from wsss.config import CRFConfig, config_from_dict, load_config, save_config
from wsss.engine.pseudo_masks import pseudo_label
from wsss.engine.refine import refine
from wsss.engine.trainer import train
from wsss.errors import ConfigError, DataError
from wsss.io import IGNORE_INDEX, read_mask, write_mask
from wsss.methods.affinity import AffinityConfig, check_config, crossing_alpha, merge_mode, seed_alphas
from wsss.postprocess.affinity import (
    affinity_loss,
    confident_labels,
    disk_offsets,
    fill_background,
    propagate,
    random_walk,
    relabel_foreground,
    transition,
    walk_maps,
    walk_mask,
    walk_to_mask,
)

# ------------------------------------------------------------------------------------------ random walk


def _two_regions(h=6, w=10):
    """Features: left half one vector, right half a far one (affinity ~ 0 across)."""
    f = torch.zeros(4, h, w)
    f[:, :, w // 2 :] = 10.0
    return f


def test_disk_offsets():
    full, half = disk_offsets(5), disk_offsets(5, half=True)
    assert (0, 0) not in full and all(dy * dy + dx * dx < 25 for dy, dx in full)
    assert len(full) == 2 * len(half)
    assert set(full) == set(half) | {(-dy, -dx) for dy, dx in half}


def test_transition_is_sparse_and_row_stochastic():
    idx, wts = transition(_two_regions(), radius=3, beta=8)
    assert idx.shape == (60, 1 + len(disk_offsets(3))) and wts.shape == idx.shape
    assert torch.allclose(wts.sum(1), torch.ones(60))
    assert wts.min() >= 0


def test_transition_and_propagate_match_dense_matrices():
    g = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    idx, wts = transition(g, radius=3, beta=2.0)
    flat = g.reshape(3, -1)
    dense = torch.exp(-(flat[:, :, None] - flat[:, None, :]).abs().mean(0)) ** 2
    ys, xs = torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    near = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2 < 9
    dense = dense * near
    dense = dense / dense.sum(1, keepdim=True)
    sparse = torch.zeros(35, 35).scatter_add_(1, idx, wts)
    assert torch.allclose(sparse, dense, atol=1e-6)
    v = torch.rand(2, 35, generator=torch.Generator().manual_seed(1))
    want = (torch.linalg.matrix_power(dense.double(), 8) @ v.double().T).T
    assert torch.allclose(propagate(v, idx, wts, 8).double(), want, atol=1e-5)


def test_random_walk_components_stay_apart_and_seed_spreads():
    f = _two_regions()
    seeds = torch.zeros(2, 6, 10)
    seeds[0, 2, 1] = 1.0  # one pixel of the left component
    seeds[1, 3, 8] = 1.0  # one of the right
    out = random_walk(f, seeds, radius=3, beta=8, logt=6)
    left, right = out[:, :, :5], out[:, :, 5:]
    assert right[0].max() < 1e-6 and left[1].max() < 1e-6  # nothing leaks across
    assert (left[0] > 0).all() and (right[1] > 0).all()  # each seed reaches its whole component
    assert left[0].std() < left[0].mean()  # and nearly evenly after 64 steps


def test_walk_mask_threshold_and_alpha():
    f = _two_regions()
    probs = torch.zeros(2, 12, 20)  # one foreground class, a blob in the right half (full resolution)
    probs[0] = 1.0
    probs[1, 2:10, 12:20] = 1.0  # most of the right component: the walk averages it over the component
    for cfg in (AffinityConfig(radius=3, bg_threshold=0.3), AffinityConfig(radius=3, bg_alpha=4.0)):
        mask = walk_mask(f, [0, 7], probs, cfg, (12, 20))
        assert mask.dtype == np.uint8 and mask.shape == (12, 20)
        assert (mask[:, 11:] == 7).all() and (mask[:, :9] == 0).all()  # filled to the right component
    # through the dense CRF instead of the argmax: an image whose halves differ keeps the split
    rgb = np.zeros((12, 20, 3), np.uint8)
    rgb[:, 10:] = 200
    cfg = AffinityConfig(radius=3, bg_threshold=0.3)
    walked = walk_maps(f, probs, cfg)
    plain = walk_to_mask(walked, [0, 7], cfg, (12, 20))
    for mode in ("label", "scores"):
        cfg.walk_crf = mode
        assert (walk_to_mask(walked, [0, 7], cfg, (12, 20), rgb=rgb, crf_cfg=CRFConfig(backend="torch")) == plain).all()
    assert (walk_to_mask(walked, [0, 7], cfg, (12, 20), bg_threshold=0.99) == 0).all()  # the threshold given wins


def test_label_scores_is_unary_from_labels():
    from wsss.postprocess.crf import label_scores

    s = label_scores(np.array([[0, 2]]), 3, 0.7)
    assert s.shape == (3, 1, 2) and np.allclose(s.sum(0), 1.0)
    assert np.allclose(s[:, 0, 0], [0.7, 0.15, 0.15]) and np.allclose(s[:, 0, 1], [0.15, 0.15, 0.7])
    with pytest.raises(ConfigError):
        label_scores(np.zeros((2, 2), int), 2, 1.0)


def test_refine_refuses_an_unknown_walk_crf_before_training(seeds, tmp_path):
    voc, seed_dir = seeds
    cfg = _aff_cfg(voc)
    cfg.method.walk_crf = "both"
    with pytest.raises(ConfigError, match="walk_crf"):
        refine(cfg, tmp_path / "aff", seed_dir, voc, "train", tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "aff" / "labels").exists()  # nothing written


def test_walk_label_crf_snaps_the_mask_to_the_image_edge():
    """The walk's mask, 3 px too wide of a bright square, comes back to the square's edge under IRN's
    label CRF; the walked scores themselves are flat (0.5 against a 0.4 background)."""
    rgb = np.full((32, 32, 3), 30, np.uint8)
    rgb[8:24, 8:24] = 220
    walked = torch.zeros(1, 32, 32)
    walked[0, 5:27, 5:27] = 0.5  # the square grown by 3 px on every side
    cfg = AffinityConfig(radius=3, bg_threshold=0.4, walk_crf="label")
    plain = walk_to_mask(walked, [0, 7], cfg, (32, 32))
    assert (plain == 7).sum() == 22 * 22
    snapped = walk_to_mask(walked, [0, 7], cfg, (32, 32), rgb=rgb, crf_cfg=CRFConfig(backend="torch"))
    truth = np.zeros((32, 32), np.uint8)
    truth[8:24, 8:24] = 7
    assert (snapped != truth).mean() < (plain != truth).mean() / 4


# ------------------------------------------------------------------------------------ confident labels


def test_confident_labels_two_alphas_disagreement_ignored():
    fg = np.array([[[0.9, 0.5, 0.1]]], np.float32)  # one class, three pixels: sure, unsure, background
    probs = np.concatenate([np.zeros_like(fg), fg])
    rgb = np.zeros((1, 3, 3), np.uint8)
    # alpha 1: bg = 0.1, 0.5, 0.9 -> fg, tie (bg wins argmax), bg; alpha 12: bg ~ 0, ~0, 0.28 -> fg, fg, bg
    out = confident_labels(rgb, probs, [0, 5], [1.0, 12.0], crf=False)
    assert out.tolist() == [[5, IGNORE_INDEX, 0]]
    with_crf = pytest.importorskip("pydensecrf.densecrf") and confident_labels(rgb, probs, [0, 5], [1.0, 12.0])
    assert with_crf.shape == (1, 3) and set(with_crf.ravel()) <= {0, 5, IGNORE_INDEX}


def test_seed_alphas_put_the_crossings_at_the_seed_threshold():
    assert crossing_alpha(0.5) == pytest.approx(1.0)
    for c in (0.15, 0.4, 0.6):
        assert (1 - c) ** crossing_alpha(c) == pytest.approx(c)
    cfg = AffinityConfig(alphas=[1.0, 12.0])
    assert seed_alphas(cfg, 0.6) == [1.0, 12.0]  # off unless asked for
    cfg.alpha_crossings = [1.0, 2 / 3]
    assert seed_alphas(cfg, None) == [1.0, 12.0]  # seeds with a background channel keep the fixed alphas
    low, high = seed_alphas(cfg, 0.6)
    assert (0.4**low, 0.6**high) == (pytest.approx(0.6, abs=1e-3), pytest.approx(0.4, abs=1e-3))
    with pytest.raises(ConfigError, match="outside"):
        seed_alphas(AffinityConfig(alpha_crossings=[2.0, 1.0]), 0.6)


def test_broad_cam_background_is_labelled_with_seed_alphas():
    """A CAM warm all over (background 0.3, object 0.9) cut at 0.6: PSA's fixed alphas [1, 12] cross at 0.5
    and 0.15, so the whole background falls between them and is ignored; crossings at the threshold and at
    2/3 of it label it background."""
    fg = np.array([[[0.9, 0.3, 0.3, 0.3]]], np.float32)
    probs = np.concatenate([np.zeros_like(fg), fg])
    rgb = np.zeros((1, 4, 3), np.uint8)
    assert confident_labels(rgb, probs, [0, 5], [1.0, 12.0], crf=False).tolist() == [[5] + [IGNORE_INDEX] * 3]
    alphas = seed_alphas(AffinityConfig(alpha_crossings=[1.0, 2 / 3]), 0.6)
    assert confident_labels(rgb, probs, [0, 5], alphas, crf=False).tolist() == [[5, 0, 0, 0]]


def test_affinity_loss_counts_pairs_separately():
    labels = torch.tensor([[[0, 0, 1, 1, IGNORE_INDEX]]])
    same = torch.zeros(1, 2, 1, 5)  # all features equal: positives cost 0, negatives a lot
    res = affinity_loss(same, labels, radius=2)
    assert res["bg"] < 1e-4 and res["fg"] < 1e-4 and res["neg"] > 5
    apart = torch.zeros(1, 2, 1, 5)
    apart[:, :, :, 2:] = 20.0  # class 1 far from class 0
    res = affinity_loss(apart.requires_grad_(), labels, radius=2)
    assert res["loss"] < 1e-3
    res["loss"].backward()  # differentiable


def test_psa_preset_loads():
    cfg = load_config("voc/psa_resnet38")  # the model is not built: resnet38d may not be in the factory yet
    assert cfg.method.name == "affinity" and cfg.model.backbone.name == "resnet38d"
    assert cfg.train.batch_size == 8 and cfg.data.crop_size == 448 and cfg.method.radius == 5
    assert load_config("demo/affinity").method.beta == 8.0


# ------------------------------------------------------------------------------------------- refine


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    voc = make_voc(tmp_path_factory.mktemp("voc"), n_train=4, n_val=2)
    run = tmp_path_factory.mktemp("cam")
    cfg = make_cfg(voc, epochs=1, method={"has_background": False})
    train(cfg, run, progress=False)
    out = tmp_path_factory.mktemp("seeds")
    pseudo_label(run, voc, "train", out, save_maps=True, progress=False)
    return voc, out


def _aff_cfg(voc):
    return config_from_dict({
        "data": {"root": str(voc), "format": "voc", "crop_size": 32, "num_workers": 0},
        "model": {"backbone": {"name": "mobilenetv2_imagenet", "pretrained": False, "output_stride": 8}},
        "method": {"name": "affinity", "dim": 16, "radius": 3, "alphas": [1.0, 12.0], "crf": False},
        "train": {"epochs": 1, "batch_size": 2, "optimizer": "sgd", "lr": 0.01, "scheduler": "poly",
                  "val_every": 0, "amp": "off"},
        "infer": {"scales": [1.0]},
    })


def test_refine_end_to_end_and_resume(seeds, tmp_path):
    voc, seed_dir = seeds
    run, out = tmp_path / "aff", tmp_path / "refined"
    res = refine(_aff_cfg(voc), run, seed_dir, voc, "train", out, device="cpu", progress=False)
    assert res["computed"] == 4 and res["written"] == 4 and 0 <= res["miou"] <= 1
    assert res["protocol"]["stage"] == "refined" and res["protocol"]["bg_threshold"] == 0.39
    assert sorted(p.name for p in (run / "labels").glob("*.png")) == [f"tr{i:02d}.png" for i in range(4)]
    assert (run / "last.pt").is_file() and len(list((out / "walk").glob("*.npz"))) == 4
    labels = np.concatenate([read_mask(run / "labels" / f"tr{i:02d}.png").ravel() for i in range(4)])
    assert res["confident_labels"] == {"ignored": round(float((labels == 255).mean()), 4),
                                       "foreground": round(float(((labels > 0) & (labels < 255)).mean()), 4)}
    for i in range(4):
        mask, gt = read_mask(out / f"tr{i:02d}.png"), read_mask(voc / "SegmentationClass" / f"tr{i:02d}.png")
        assert mask.shape == gt.shape and set(np.unique(mask)) <= {0, 1, 2}
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    (out / "tr01.png").unlink()
    res2 = refine(_aff_cfg(voc), run, seed_dir, voc, "train", out, device="cpu", progress=False)
    assert res2["computed"] == 0 and res2["written"] == 1  # trained once, walked once: the mask redone from its walk
    assert res2["miou"] == pytest.approx(res["miou"])
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert all(after[k] == v for k, v in before.items() if k != "tr01.png")
    assert json.loads((out / "summary.json").read_text())["num_images"] == 4

    # another threshold into the same folder is refused (masks of two settings never mix); a sweep on the
    # split's masks picks the best threshold from the cached walks, without walking again
    cfg = _aff_cfg(voc)
    cfg.method.bg_threshold = 0.2
    with pytest.raises(ConfigError, match="bg_threshold"):
        refine(cfg, run, seed_dir, voc, "train", out, device="cpu", progress=False)
    cfg = _aff_cfg(voc)
    cfg.infer.size = 64  # another grid: its walks are not these
    with pytest.raises(ConfigError, match="infer_size"):
        refine(cfg, run, seed_dir, voc, "train", out, device="cpu", progress=False)
    swept = tmp_path / "swept"
    shutil.copytree(out / "walk", swept / "walk")
    shutil.copy(out / "walk.json", swept / "walk.json")
    res3 = refine(_aff_cfg(voc), run, seed_dir, voc, "train", swept, device="cpu", progress=False,
                  sweep_thresholds=[0.05, 0.2, 0.39, 0.6])
    assert res3["computed"] == 0 and res3["written"] == 4
    table = json.loads((swept / "sweep.json").read_text())
    assert res3["bg_threshold"] == table["best_threshold"] and res3["miou"] == pytest.approx(max(table["sweep"].values()))
    assert res3["protocol"]["bg_threshold_chosen"] == "swept on train"

    # the labels belong to the seeds they came from
    other = tmp_path / "other_seeds"
    shutil.copytree(seed_dir, other)
    with pytest.raises(ConfigError, match="confident labels"):
        refine(_aff_cfg(voc), run, other, voc, "train", tmp_path / "o3", device="cpu", progress=False)


def test_fill_background_keeps_the_crf_foreground():
    crf = np.array([[0, 0, 2, 2], [0, 1, 1, 255]], np.uint8)
    walk = np.array([[3, 0, 1, 0], [1, 3, 0, 0]], np.uint8)
    # the CRF's classes (and its 255) stay where it drew them; its background takes the walk's label
    assert fill_background(crf, walk).tolist() == [[3, 0, 2, 2], [1, 1, 1, 255]]
    with pytest.raises(ValueError, match="differ in size"):
        fill_background(crf, walk[:, :3])


def test_relabel_foreground_keeps_the_walks_extent_and_the_crf_class():
    crf = np.array([[0, 0, 2, 2], [0, 1, 1, 255]], np.uint8)
    walk = np.array([[3, 0, 1, 0], [1, 3, 0, 2]], np.uint8)
    # where both draw a class, the CRF's; the walk's background and its pixels over the CRF's
    # background or 255 stay the walk's
    assert relabel_foreground(crf, walk).tolist() == [[3, 0, 2, 0], [1, 1, 0, 2]]
    with pytest.raises(ValueError, match="differ in size"):
        relabel_foreground(crf, walk[:, :3])


def test_merge_mode_fills_threshold_seeds_and_relabels_the_others():
    cfg = AffinityConfig(merge="auto")
    assert merge_mode(cfg, 0.6, crf_masks=True) == "fill"  # CAM seeds, CRF masks given
    assert merge_mode(cfg, None, crf_masks=True) == "relabel"  # a background channel: its CRF masks over-cover
    assert merge_mode(cfg, 0.6, crf_masks=False) == "walk"  # nothing to read
    assert merge_mode(cfg, None, crf_masks=False) == "walk"
    assert merge_mode(AffinityConfig(merge="walk"), 0.6, crf_masks=True) == "walk"
    for mode in ("fill", "relabel"):
        with pytest.raises(ConfigError, match="--crf-masks"):
            merge_mode(AffinityConfig(merge=mode), None, crf_masks=False)
    with pytest.raises(ConfigError, match="method.merge"):
        check_config(AffinityConfig(merge="union"))


@pytest.mark.parametrize("merge, merged", [("fill", fill_background), ("relabel", relabel_foreground)])
def test_refine_merges_the_crf_masks(seeds, tmp_path, merge, merged):
    """merge fill / relabel over the seeds' CRF masks: every mask is `merged(crf, walk-only mask)` from the
    same walks; the protocol names the merge; an image without a CRF mask is named (and skipped with
    skip_bad)."""
    voc, seed_dir = seeds
    run, walk_only = tmp_path / "aff", tmp_path / "walk_only"
    refine(_aff_cfg(voc), run, seed_dir, voc, "train", walk_only, device="cpu", progress=False)
    crf_dir = tmp_path / "crf_masks"  # stand-in CRF masks: each image's left half class 1, the rest background
    crf_dir.mkdir()
    for p in sorted(walk_only.glob("tr*.png")):
        m = np.zeros_like(read_mask(p))
        m[:, : m.shape[1] // 2] = 1
        write_mask(crf_dir / p.name, m)
    cfg = _aff_cfg(voc)
    cfg.method.merge = merge
    filled = tmp_path / "filled"
    shutil.copytree(walk_only / "walk", filled / "walk")
    shutil.copy(walk_only / "walk.json", filled / "walk.json")  # the merge is a step-4 setting: walks reused
    res = refine(cfg, run, seed_dir, voc, "train", filled, device="cpu", progress=False, crf_masks=crf_dir)
    assert res["computed"] == 0 and res["written"] == 4
    assert res["protocol"]["merge"] == merge and res["protocol"]["crf_masks"] == str(crf_dir)
    for p in sorted(walk_only.glob("tr*.png")):
        expected = merged(read_mask(crf_dir / p.name), read_mask(p))
        assert np.array_equal(read_mask(filled / p.name), expected), p.name
    assert json.loads((filled / "refine.json").read_text())["merge"] == merge
    with pytest.raises(ConfigError, match="--crf-masks"):  # without CRF masks: refused before any step
        refine(cfg, run, seed_dir, voc, "train", tmp_path / "none", device="cpu", progress=False)
    assert not (tmp_path / "none").exists()

    (crf_dir / "tr02.png").unlink()
    with pytest.raises(DataError, match="tr02.png"):
        refine(cfg, run, seed_dir, voc, "train", tmp_path / "gap", device="cpu", progress=False, crf_masks=crf_dir)
    res = refine(cfg, run, seed_dir, voc, "train", tmp_path / "gap2", device="cpu", progress=False,
                 crf_masks=crf_dir, skip_bad=True)
    assert any("tr02.png" in s for s in res["skipped"]) and not (tmp_path / "gap2" / "tr02.png").exists()


def test_confident_label_shares_count_ignored_and_foreground(tmp_path):
    from types import SimpleNamespace

    from wsss.engine.refine import _label_shares
    from wsss.io import write_mask

    (tmp_path / "labels").mkdir()
    a = np.zeros((4, 5), np.uint8)
    a[0, :] = IGNORE_INDEX  # 5 ignored
    a[1, :2] = 3  # 2 foreground
    b = np.full((2, 10), IGNORE_INDEX, np.uint8)
    b[0, 0] = 1  # 19 ignored, 1 foreground
    write_mask(tmp_path / "labels" / "a.png", a)
    write_mask(tmp_path / "labels" / "b.png", b)
    job = SimpleNamespace(run=tmp_path, ds=SimpleNamespace(ids=["a", "skipped", "b"]))
    assert _label_shares(job, [0, 2]) == {"ignored": round(24 / 40, 4), "foreground": round(3 / 40, 4)}


def test_refine_takes_the_alphas_from_the_seeds_threshold(seeds, tmp_path, capsys):
    voc, seed_dir = seeds
    cut = tmp_path / "seeds_cut"  # the same seeds, as if cut at 0.6 (the threshold their protocol records)
    shutil.copytree(seed_dir, cut)
    summary = json.loads((cut / "summary.json").read_text())
    summary["protocol"]["bg_threshold"] = 0.6
    (cut / "summary.json").write_text(json.dumps(summary))
    cfg = _aff_cfg(voc)
    cfg.method.alpha_crossings = [2.0, 1.0]  # crossings 1.2 and 0.6: refused before anything is written
    with pytest.raises(ConfigError, match="alpha_crossings"):
        refine(cfg, tmp_path / "bad", cut, voc, "train", tmp_path / "bad_out", device="cpu", progress=False)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad_out").exists()
    cfg.method.alpha_crossings = [1.0, 2 / 3]
    cfg.method.merge = "auto"  # seeds cut at a threshold but no CRF masks given: the walk alone, and a note
    res = refine(cfg, tmp_path / "aff", cut, voc, "train", tmp_path / "out", device="cpu", progress=False)
    err = capsys.readouterr().err
    assert res["protocol"]["merge"] == "walk" and "no --crf-masks" in err and "would fill" in err
    alphas = seed_alphas(cfg.method, 0.6)
    assert res["protocol"]["alphas"] == alphas != [1.0, 12.0]
    assert json.loads((tmp_path / "aff" / "labels.json").read_text())["alphas"] == alphas


def test_refine_skip_bad_and_cli(seeds, tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    voc, seed_dir = seeds
    bad = tmp_path / "seeds"
    (bad / "maps").mkdir(parents=True)
    for p in (seed_dir / "maps").glob("*.npz"):
        (bad / "maps" / p.name).write_bytes(p.read_bytes())
    (bad / "maps" / "tr02.npz").write_bytes(b"not a npz")
    cfg = _aff_cfg(voc)
    with pytest.raises(Exception, match="tr02.npz"):
        refine(cfg, tmp_path / "a", bad, voc, "train", tmp_path / "o", device="cpu", progress=False)
    run = tmp_path / "b"
    code, out, err = run_cli(
        monkeypatch, capsys, "refine", run, "--seeds", bad, "--data", voc, "--split", "train",
        "--out", tmp_path / "o2", "--config", "demo/affinity", "--device", "cpu", "--skip-bad",
        "-o", "model.backbone.pretrained=false", "-o", "data.crop_size=32", "-o", "data.num_workers=0",
        "-o", "method.dim=16", "-o", "method.radius=3", "-o", "method.crf=false", "-o", "train.epochs=1",
        "-o", "train.batch_size=2", "-o", "model.backbone.output_stride=8",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["computed"] == 3 and any("tr02.npz" in s for s in summary["skipped"])
    assert not (tmp_path / "o2" / "tr02.png").exists()


@pytest.mark.slow
def test_kill_during_refine_then_rerun_is_identical(seeds, tmp_path, monkeypatch, capsys):
    """kill -9 while AffinityNet trains (after its first epoch's checkpoint), rerun: the same masks,
    byte for byte, as an uninterrupted run (the trainer resumes exactly; labels, walks, masks are files)."""
    from conftest import run_cli
    from test_reliability import kill_when

    voc, seed_dir = seeds
    cfg = _aff_cfg(voc)
    cfg.train.epochs = 4
    cfg_file = tmp_path / "aff.yaml"
    save_config(cfg, cfg_file)

    def args(name):
        return ["refine", tmp_path / f"run_{name}", "--seeds", seed_dir, "--data", voc, "--split", "train",
                "--out", tmp_path / f"out_{name}", "--config", cfg_file, "--device", "cpu"]

    killed = tmp_path / "run_killed"
    kill_when(args("killed"), lambda: (killed / "last.pt").is_file(), tmp_path / "refine.log")
    assert len(list((tmp_path / "out_killed").glob("*.png"))) < 4  # killed mid-run
    for name in ("killed", "clean"):
        code, out, err = run_cli(monkeypatch, capsys, *args(name))
        assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "out_clean").glob("*.png"))
    assert len(names) == 4 and names == sorted(p.name for p in (tmp_path / "out_killed").glob("*.png"))
    for name in [*names, "summary.json"]:
        assert (tmp_path / "out_clean" / name).read_bytes() == (tmp_path / "out_killed" / name).read_bytes(), name


@pytest.mark.slow
def test_wsss_run_with_refine(tmp_path, monkeypatch, capsys):
    """`wsss run --refine`: seeds with maps -> AffinityNet + walk (threshold swept on train) -> stage 2 on
    the refined masks; the report shows them."""
    from conftest import run_cli
    from wsss.pipeline import STAGE_MARKER

    voc = make_voc(tmp_path / "voc")
    aff = _aff_cfg(voc)
    aff.method.merge = "fill"  # needs the seeds' CRF masks: the chain must hand over pseudo/train_crf
    save_config(aff, tmp_path / "aff.yaml")
    tiny = ["data.crop_size=32", "data.num_workers=0", "train.batch_size=4", "train.trainable_blocks=2",
            "train.epochs=1", "train.freeze_backbone_epochs=0", "infer.crf.workers=0", "infer.scales=[1.0]",
            "infer.size=64", "train.amp=off"]
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "run", "demo/tkp_pcl", "--data", voc, "--out", out, "--refine",
                           "--refine-config", tmp_path / "aff.yaml", *[a for o in tiny for a in ("-o", o)])
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["pseudo_train_refined_miou"] <= 1
    proto = summary["protocols"]["pseudo_train_refined"]
    assert proto["stage"] == "refined" and proto["bg_threshold_chosen"] == "swept on train"
    assert proto["crf"] == "irn_label (confidence 0.7)"  # the chain's --crf (default): IRN's CRF on the walk's mask
    assert proto["merge"] == "fill" and proto["crf_masks"] == str(out / "pseudo" / "train_crf")
    for p in (out / "refine" / "train").glob("*.png"):  # the CRF masks' foreground is kept
        crf_mask = read_mask(out / "pseudo" / "train_crf" / p.name)
        assert np.array_equal(read_mask(p)[crf_mask > 0], crf_mask[crf_mask > 0])
    assert {"seeds_maps", "pseudo_train_refined", "segment"} <= set(summary["redone"])
    seg = json.loads((out / "segment" / STAGE_MARKER).read_text())["result"]
    assert seg["pseudo_dir"] == str(out / "refine" / "train")  # stage 2 trained on the refined masks
    assert len(list((out / "pseudo" / "train_maps" / "maps").glob("*.npz"))) == 8
    assert "Refined masks" in (out / "run" / "report.html").read_text()
    assert summary["stage2_masks"] == "refine/train"
