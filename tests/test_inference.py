"""Seeds (class_probabilities) and streaming, resumable pseudo-labelling."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engine_fakes import FakeConfig, FakeMethod, make_cfg
from wsss.config import InferConfig, load_config, save_config
from wsss.engine.inference import class_probabilities, predicted_classes, resolve_device
from wsss.engine.pseudo_masks import pseudo_label
from wsss.engine.trainer import train
from wsss.errors import ConfigError
from wsss.io import read_mask


def _run(tmp_path_factory, voc, name, **method):
    run = tmp_path_factory.mktemp(name)
    cfg = make_cfg(voc, epochs=1, method=method)
    cfg.infer.crf.workers = 0
    train(cfg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory, voc):
    return _run(tmp_path_factory, voc, "run")


@pytest.fixture(scope="module")
def cam_run(tmp_path_factory, voc):
    return _run(tmp_path_factory, voc, "cam_run", has_background=False)


def _method(**kw):
    torch.manual_seed(0)
    m = FakeMethod(FakeConfig(**kw), None, 4)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m.eval()


def _image(h=40, w=52):
    return torch.randn(3, h, w, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------- class_probabilities


def test_restricted_to_tags_and_max_normalised():
    m = _method()
    p = class_probabilities(m, _image(), [2], InferConfig(scales=[0.5, 1.0, 1.5]), (80, 100))
    assert p.shape == (4, 80, 100) and p.dtype == torch.float32
    assert torch.all(p[1] == 0) and torch.all(p[3] == 0)
    for c in (0, 2):  # the method's own background and the tag, each max-normalised
        assert p[c].max() == pytest.approx(1.0, abs=1e-4) and p[c].min() >= 0


def test_absent_classes_mass_goes_to_the_background():
    # infer.absent=background (or won): the background channel gains the probability of the classes the tags rule
    # out, then is max-normalised as before; the tags' channels are untouched; no background channel: no-op
    m = _method()
    x = _image()
    cfg = InferConfig(scales=[1.0])
    with torch.no_grad():
        z = m.class_maps(x[None])[0]
    out = tuple(z.shape[-2:])  # the grid's own size: the upsampling is the identity
    drop = class_probabilities(m, x, [2], cfg, out)
    moved = class_probabilities(m, x, [2], InferConfig(scales=[1.0], absent="background"), out)
    bg = z[0] + z[1] + z[3]
    assert torch.allclose(moved[0], bg / (bg.max() + 1e-5), atol=1e-5)
    assert torch.allclose(drop[0], z[0] / (z[0].max() + 1e-5), atol=1e-5)
    assert torch.equal(moved[2], drop[2]) and torch.all(moved[[1, 3]] == 0)
    # patches [bg, absent, tag]: background; an absent class on top (the tag won it before); the tag; the
    # tag on top with much absent mass. `background` moves every absent mass, `won` only where it is on top
    fixed = torch.tensor([[0.9, 0.0, 0.1], [0.1, 0.6, 0.3], [0.05, 0.0, 0.95], [0.3, 0.3, 0.4]]).T.reshape(3, 1, 4)

    class Fixed(torch.nn.Module):
        has_background, uses_tags, num_classes = True, True, 3

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def class_maps(self, images):
            return fixed[None]

    stub, one = Fixed(), torch.zeros(3, 1, 4)
    for mode, want in (("drop", [0, 2, 2, 2]), ("background", [0, 0, 2, 0]), ("won", [0, 0, 2, 2])):
        got = class_probabilities(stub, one, [2], InferConfig(scales=[1.0], absent=mode), (1, 4)).argmax(0)
        assert got.tolist() == [want], mode
    cam = _method(has_background=False)
    a = class_probabilities(cam, x, [1], InferConfig(bg_threshold=0.3, absent="background"), (40, 52))
    assert torch.equal(a, class_probabilities(cam, x, [1], InferConfig(bg_threshold=0.3), (40, 52)))
    with pytest.raises(ConfigError, match="infer.absent"):
        class_probabilities(m, x, [2], InferConfig(absent="spread"), out)


def test_background_threshold_and_alpha():
    m = _method(has_background=False)
    x = _image()
    p = class_probabilities(m, x, [1, 3], InferConfig(bg_threshold=0.42), (40, 52))
    assert torch.allclose(p[0], torch.full_like(p[0], 0.42))
    q = class_probabilities(m, x, [1, 3], InferConfig(bg_alpha=2.0), (40, 52))
    assert torch.allclose(q[0], (1 - torch.maximum(q[1], q[3])) ** 2)
    assert torch.all(q[2] == 0)
    mask = q.argmax(0)
    assert set(mask.unique().tolist()) <= {0, 1, 3}


def test_flip_averaging():
    x = _image()
    cfg = InferConfig(scales=[0.75, 1.0], flip=True)
    m = _method()
    # flip TTA makes any method's seeds mirror-consistent
    a = class_probabilities(m, x, [1, 2], cfg, (40, 52))
    b = class_probabilities(m, x.flip(-1), [1, 2], cfg, (40, 52)).flip(-1)
    assert torch.allclose(a, b, atol=1e-5)
    # and changes nothing for a method that already commutes with flips
    sym = _method(pointwise=True)
    c = class_probabilities(sym, x, [1, 2], cfg, (40, 52))
    d = class_probabilities(sym, x, [1, 2], InferConfig(scales=[0.75, 1.0], flip=False), (40, 52))
    assert torch.allclose(c, d, atol=1e-5)


def test_predicted_tags():
    m = _method()
    m.image_scores = lambda x: torch.tensor([[0.2, 0.9, 0.6]]).expand(x.shape[0], 3)
    p = class_probabilities(m, _image(), None, InferConfig(flip=True), (40, 52))
    assert torch.all(p[1] == 0) and p[2].max() > 0 and p[3].max() > 0


def test_predicted_classes_are_the_ones_that_win_a_pixel():
    probs = torch.tensor([[[0.6, 0.1]], [[0.3, 0.2]], [[0.1, 0.7]]])  # 3 kept classes over a 1x2 image
    keep, p = predicted_classes([0, 4, 9], probs)
    assert keep == [0, 9] and torch.equal(p, probs[[0, 2]])  # class 4 wins nowhere; background always kept
    keep, p = predicted_classes([0, 4, 9], probs[[1, 0, 2]])
    assert keep == [0, 4, 9]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")


# ------------------------------------------------------------------------------------------ pseudo_label


def _files(folder, skip=()):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def test_pseudo_label_resumes_byte_identical(run, voc, tmp_path):
    full = tmp_path / "full"
    res = pseudo_label(run, voc, "val", full, save_maps=True, progress=False)
    assert res["computed"] == 4 and 0 <= res["miou"] <= 1
    assert set(res["per_class"]) == {"background", "red", "green"}
    ref = _files(full)
    assert {k for k in ref if k.endswith(".png")} == {f"va{i:02d}.png" for i in range(4)}
    assert read_mask(full / "va01.png").shape == (64, 72)  # the image's own size
    maps = np.load(full / "maps" / "va01.npz")
    assert maps["probs"].dtype == np.float16 and maps["probs"].shape == (len(maps["classes"]), 64, 72)
    assert maps["classes"][0] == 0
    summary = json.loads((full / "summary.json").read_text())
    assert summary["miou"] == res["miou"] and summary["num_images"] == 4

    # an interrupted run: two masks written, one map without its mask, no summary yet
    part = tmp_path / "part"
    (part / "maps").mkdir(parents=True)
    for id_ in ("va00", "va02"):
        shutil.copy(full / f"{id_}.png", part / f"{id_}.png")
        shutil.copy(full / "maps" / f"{id_}.npz", part / "maps" / f"{id_}.npz")
    shutil.copy(full / "maps" / "va03.npz", part / "maps" / "va03.npz")
    res2 = pseudo_label(run, voc, "val", part, save_maps=True, progress=False)
    assert res2["computed"] == 2 and res2["miou"] == res["miou"]
    assert _files(part) == ref

    # other settings into the same folder would mix masks: refused
    with pytest.raises(ConfigError, match="other settings"):
        pseudo_label(run, voc, "val", part, save_maps=True, flip=True, progress=False)


def test_pseudo_label_loader_workers_same_bytes(run, voc, tmp_path):
    ref = tmp_path / "ref"
    pseudo_label(run, voc, "val", ref, progress=False)
    cfg = load_config(run / "config.yaml")
    cfg.data.num_workers = 1
    other = tmp_path / "run_w"
    shutil.copytree(run, other)
    save_config(cfg, other / "config.yaml")
    out = tmp_path / "out"
    pseudo_label(other, voc, "val", out, progress=False)
    assert _files(out, ["pseudo_label.json"]) == _files(ref, ["pseudo_label.json"])  # names another run


def test_pseudo_label_crf_inline_and_pool(run, voc, tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    inline = tmp_path / "inline"
    res = pseudo_label(run, voc, "val", inline, crf=True, progress=False)
    assert res["crf"] is True and 0 <= res["miou"] <= 1
    pooled_run = tmp_path / "pooled_run"
    shutil.copytree(run, pooled_run)
    cfg = load_config(run / "config.yaml")
    cfg.infer.crf.workers = 1
    save_config(cfg, pooled_run / "config.yaml")
    pooled = tmp_path / "pooled"
    pseudo_label(pooled_run, voc, "val", pooled, crf=True, progress=False)
    assert _files(pooled, ["pseudo_label.json"]) == _files(inline, ["pseudo_label.json"])
    for p in inline.glob("*.png"):  # only background + the image's classes
        gt = read_mask(voc / "SegmentationClass" / p.name)
        assert set(np.unique(read_mask(p))) <= set(np.unique(gt)) | {0}


def test_predicted_tags_and_train_split(run, voc, tmp_path):
    res = pseudo_label(run, voc, "train", tmp_path / "o", predicted_tags=True, scales=[0.5, 1.0], flip=True,
                       progress=False)
    assert res["predicted_tags"] is True and res["scales"] == [0.5, 1.0] and res["flip"] is True
    assert len(list((tmp_path / "o").glob("*.png"))) == 8


def test_threshold_sweep(cam_run, run, voc, tmp_path):
    out = tmp_path / "sweep"
    res = pseudo_label(cam_run, voc, "val", out, sweep_thresholds=[0.1, 0.3, 0.5, 0.9], progress=False)
    assert list(res["sweep"]) == [0.1, 0.3, 0.5, 0.9]
    assert res["best_miou"] == max(res["sweep"].values())
    assert res["sweep"][res["best_threshold"]] == res["best_miou"]
    assert not list(out.glob("*.png"))
    table = json.loads((out / "sweep.json").read_text())
    assert table["sweep"]["0.3"] == res["sweep"][0.3]
    # the mIoU at one threshold matches a plain run at that threshold
    cfg = load_config(cam_run / "config.yaml")
    cfg.infer.bg_threshold = 0.3
    save_config(cfg, cam_run / "config.yaml")
    plain = pseudo_label(cam_run, voc, "val", tmp_path / "plain", progress=False)
    assert plain["miou"] == pytest.approx(res["sweep"][0.3])
    with pytest.raises(ConfigError, match="background"):
        pseudo_label(run, voc, "val", tmp_path / "x", sweep_thresholds=[0.2], progress=False)
