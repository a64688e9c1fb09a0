"""Stage 2: the DeepLab method, train_segmenter on pseudo masks through the engine trainer, predict on
image files (masks, overlays, resume, bad files) and on a dataset split with evaluation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import make_voc_dataset
from wsss.config import ConfigError, InferConfig, ModelConfig, load_config
from wsss.engine.inference import class_probabilities
from wsss.io import DataError, read_mask
from wsss.methods import METHOD_CONFIGS, METHODS
from wsss.methods.segmenter import Segmenter, SegmenterConfig
from wsss.report import write_report
from wsss.segment import predict, predict_dataset, train_segmenter

CLASSES = ["background", "red", "green"]


class TinyBackbone(nn.Module):
    out_channels, stride, kind = 8, 4, "cnn"

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())

    def forward(self, x):
        return self.net(x)

    def blocks(self):
        return [self.net]


@pytest.mark.parametrize("arch", ["deeplabv3", "deeplabv2"])
def test_segmenter_method(arch):
    assert METHODS["deeplab"] is Segmenter and METHOD_CONFIGS["deeplab"] is SegmenterConfig
    assert Segmenter.target == "mask" and not Segmenter.uses_tags
    torch.manual_seed(0)
    m = Segmenter(SegmenterConfig(arch=arch), ModelConfig(), 3, backbone=TinyBackbone())
    # rates given at the paper's output stride, scaled to the backbone's (4)
    assert m.rates == ([24, 48, 72] if arch == "deeplabv3" else [12, 24, 36, 48])
    x = torch.rand(2, 3, 32, 32)
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[:, 8:24, 8:24] = 1
    masks[:, :2] = 255
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        loss = m.forward_losses(x, masks, 0)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.7 * first
    assert float(m.forward_losses(x, torch.full_like(masks, 255), 0)["loss"]) == 0.0  # all ignored: no NaN
    m.eval()
    maps = m.class_maps(x)
    assert maps.shape == (2, 3, 8, 8) and torch.allclose(maps.sum(1), torch.ones(2, 8, 8), atol=1e-5)
    assert m.image_scores(x).shape == (2, 2)
    # inference: every class kept, probabilities as they are (no tags, no max-normalisation)
    probs = class_probabilities(m, x[0], [2], InferConfig(), (32, 32))
    expected = torch.nn.functional.interpolate(maps[:1], size=(32, 32), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(probs, expected, atol=1e-5)  # class 1 kept although the "tags" say [2]


@pytest.fixture
def seg_data(tmp_path):
    ids = [f"img{k}" for k in range(8)]
    root = make_voc_dataset(tmp_path, ids=ids, class_names=CLASSES, size=(64, 64),
                            splits={"train": ids, "val": ids[4:]})
    pseudo = tmp_path / "pseudo"
    shutil.copytree(root / "SegmentationClass", pseudo)  # pseudo masks = the ground truth
    return root, pseudo


def _cfg(root, **extra):
    over = [f"data.root={root}", "data.crop_size=64", "data.num_workers=0", "train.epochs=2",
            "train.batch_size=4", "train.seed=0", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config("demo/segment", over)


def test_train_segmenter_predict_end_to_end(seg_data, tmp_path):
    root, pseudo = seg_data
    run = tmp_path / "seg"
    summary = train_segmenter(_cfg(root), pseudo, run)
    assert summary["epochs"] == 2 and summary["miou"] is not None
    assert {"config.yaml", "classes.json", "log.jsonl", "last.pt", "segment.json"} <= {p.name for p in run.iterdir()}
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and "ce" in log[0] and "miou" in log[-1]
    assert json.loads((run / "segment.json").read_text())["num_images"] == 8
    # resume of a finished run: nothing to do, same summary shape
    assert train_segmenter(_cfg(root), pseudo, run, resume=True)["epochs"] == 2

    # predict: a folder (recursive) and a file; masks at the image size, overlays
    images = tmp_path / "new"
    (images / "sub").mkdir(parents=True)
    shutil.copy(root / "JPEGImages" / "img0.jpg", images / "a.jpg")
    shutil.copy(root / "JPEGImages" / "img1.jpg", images / "sub" / "b.jpg")
    single = root / "JPEGImages" / "img2.jpg"
    out = tmp_path / "pred"
    s = predict(run, [images, single], out, overlay=True, device="cpu", progress=False)
    assert (s["num_images"], s["computed"], s["skipped"], s["failed"]) == (3, 3, 0, [])
    for name in ("a", "sub/b", "img2"):
        mask = read_mask(out / f"{name}.png")
        assert mask.shape == (64, 64) and mask.max() < len(CLASSES)
        assert Image.open(out / f"{name}_overlay.jpg").size == (64, 64)
    before = (out / "a.png").read_bytes()
    s = predict(run, [images, single], out, overlay=True, device="cpu", progress=False)
    assert (s["computed"], s["skipped"]) == (0, 3) and (out / "a.png").read_bytes() == before

    # a bad image: the others are written, then a DataError names it (strict=False: listed)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    (out / "a.png").unlink()
    with pytest.raises(DataError, match="broken.jpg"):
        predict(run, [images], out, device="cpu", progress=False)
    assert (out / "a.png").is_file()
    s = predict(run, [images], out, device="cpu", progress=False, strict=False)
    assert [f["path"] for f in s["failed"]] == [str(images / "broken.jpg")]
    with pytest.raises(DataError, match="no such image"):
        predict(run, [tmp_path / "nope.jpg"], out, device="cpu", progress=False)

    # with the CRF over the predicted classes: only classes the plain prediction has, in worker processes
    crf_out = tmp_path / "pred_crf"
    s = predict(run, [single], crf_out, crf=True, device="cpu", progress=False)
    assert s["computed"] == 1
    plain, refined = read_mask(out / "img2.png"), read_mask(crf_out / "img2.png")
    assert refined.shape == plain.shape and set(np.unique(refined)) <= set(np.unique(plain)) | {0}

    # a dataset split, without tags, evaluated (written inside the run: the report finds it)
    res = predict_dataset(run, root, "val", run / "pred_val", device="cpu", progress=False)
    assert 0.0 <= res["miou"] <= 1.0 and set(res["per_class"]) == set(CLASSES)
    assert json.loads((run / "pred_val" / "summary.json").read_text())["miou"] == res["miou"]
    assert sorted(p.stem for p in (run / "pred_val").glob("*.png")) == [f"img{k}" for k in range(4, 8)]
    text = write_report(run).read_text()
    assert "<th>pred_val</th>" in text and text.count("<img ") == 2 + 4 * 3  # plots + 4 rows x 3 columns


def test_train_segmenter_errors(seg_data, tmp_path):
    root, pseudo = seg_data
    (pseudo / "img3.png").unlink()
    with pytest.raises(DataError, match=r"img3\.png: pseudo mask not found"):
        train_segmenter(_cfg(root), pseudo, tmp_path / "seg")
    with pytest.raises(ConfigError, match="segmentation network"):
        train_segmenter(load_config("demo/tkp_pcl", [f"data.root={root}"]), pseudo, tmp_path / "seg")
    bad = np.full((64, 64), 9, np.uint8)
    from wsss.io import write_mask

    write_mask(pseudo / "img3.png", bad)
    from wsss.data import open_dataset
    from wsss.segment.train import PseudoMaskDataset

    ds = PseudoMaskDataset(open_dataset(root, "train"), pseudo)
    with pytest.raises(DataError, match="out of range"):
        ds.load_mask(ds.ids.index("img3"))
