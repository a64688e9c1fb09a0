"""Transforms: image and mask stay aligned through the random ops; output contract; skip_bad; TTA."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import class_colour, make_voc_dataset, render
from wsss.config import DataConfig
from wsss.data import open_dataset
from wsss.data.base import RawSample
from wsss.data.transforms import EvalTransform, TrainTransform, TransformedDataset, multiscale_flip_inputs
from wsss.io import DataError

# Four classes in an asymmetric layout (a flip of the image alone would show), each with a 255 ring.
OBJECTS = [(1, (3, 3, 25, 20)), (2, (33, 2, 57, 15)), (3, (5, 26, 20, 42)), (4, (28, 22, 56, 43))]
PALETTE = np.array([class_colour(c) for c in range(5)], np.float32)


def sample(with_mask: bool = True) -> RawSample:
    image, mask = render(OBJECTS, (60, 45))
    return RawSample("x", Image.fromarray(image), [1, 2, 3, 4], mask if with_mask else None)


def pixels(out: dict, cfg: DataConfig) -> np.ndarray:
    x = out["image"].numpy().transpose(1, 2, 0)
    return (x * np.array(cfg.std) + np.array(cfg.mean)) * 255.0


def nearest_class(px: np.ndarray) -> np.ndarray:
    return np.argmin(((px[..., None, :] - PALETTE) ** 2).sum(-1), axis=-1)


def test_train_transform_contract():
    cfg = DataConfig(crop_size=32)
    out = TrainTransform(cfg)(sample(), num_classes=6)
    assert set(out) == {"image", "label", "mask", "id"} and out["id"] == "x"
    assert out["image"].dtype == torch.float32 and out["image"].shape == (3, 32, 32)
    assert out["mask"].dtype == torch.int64 and out["mask"].shape == (32, 32)
    assert out["label"].tolist() == [1, 1, 1, 1, 0]
    no_mask = TrainTransform(cfg, num_classes=6)(sample(with_mask=False))
    assert (no_mask["mask"] == 255).all()
    with pytest.raises(ValueError, match="num_classes"):
        TrainTransform(cfg)(sample())


def test_train_transform_exact_alignment_without_resize():
    # Short side 45 = crop size and scale 1: no resampling, so pixels must match exactly.
    cfg = DataConfig(crop_size=45, scale_range=[1.0, 1.0], hflip=True)
    t = TrainTransform(cfg, num_classes=5)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = t(sample())
        m = out["mask"].numpy()
        px = pixels(out, cfg)
        keep = m != 255
        np.testing.assert_allclose(px[keep], PALETTE[m[keep]], atol=1e-3)
        flips.add(bool(m[10, 5] == 2))  # class 2 sits on the right unless flipped
    assert flips == {True, False}  # both flipped and unflipped crops were seen


def test_train_transform_random_ops_keep_alignment():
    cfg = DataConfig(crop_size=32, scale_range=[0.5, 1.6], hflip=True)
    t = TrainTransform(cfg, num_classes=5)
    padded = 0
    for seed in range(30):
        torch.manual_seed(seed)
        out = t(sample())
        m = out["mask"].numpy()
        # Interior pixels (a 5x5 uniform mask neighbourhood) away from bilinear blending at edges.
        pad = np.pad(m, 2, constant_values=255).astype(np.int32)
        win = np.lib.stride_tricks.sliding_window_view(pad, (5, 5))
        interior = (win.min(axis=(-1, -2)) == win.max(axis=(-1, -2))) & (m != 255)
        assert interior.any()
        assert (nearest_class(pixels(out, cfg))[interior] == m[interior]).all(), f"misaligned at seed {seed}"
        # Padding (image smaller than the crop): mean colour, i.e. zeros after normalisation, mask 255.
        img = out["image"].numpy()
        zero = (np.abs(img) < 1e-6).all(0)
        assert (m[zero] == 255).all()
        padded += int(zero.any())
    assert padded > 0  # scales < 1 padded at least once


def test_color_jitter_touches_the_image_only():
    cfg = DataConfig(crop_size=45, scale_range=[1.0, 1.0], hflip=False, color_jitter=0.4)
    torch.manual_seed(0)
    out = TrainTransform(cfg, num_classes=5)(sample())
    _, mask = render(OBJECTS, (60, 45))
    m = out["mask"].numpy()
    assert set(np.unique(m)) <= {0, 1, 2, 3, 4, 255} and out["image"].shape == (3, 45, 45)
    # The mask is an unjittered crop of the original.
    assert any((m == mask[:, x : x + 45]).all() for x in range(16))


def test_eval_transform_keeps_mask_resolution():
    cfg = DataConfig()
    out = EvalTransform(cfg, num_classes=5)(sample())
    assert out["image"].shape == (3, 45, 60) and out["mask"].shape == (45, 60)
    _, mask = render(OBJECTS, (60, 45))
    assert (out["mask"].numpy() == mask).all()
    out = EvalTransform(cfg, size=30, num_classes=5)(sample())
    assert out["image"].shape == (3, 30, 40) and out["mask"].shape == (45, 60)
    assert (EvalTransform(cfg, num_classes=5)(sample(False))["mask"] == 255).all()


def test_transformed_dataset_and_loader(voc_root):
    ds = TransformedDataset(open_dataset(voc_root, "train"), TrainTransform(DataConfig(crop_size=24)))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 24, 24) and batch["label"].shape == (2, 20)
    assert batch["mask"].dtype == torch.int64 and batch["id"] == ["2007_000000", "2007_000001"]


def test_per_sample_seeds_make_augmentation_independent_of_the_caller(voc_root):
    """With a seed, sample i of epoch e is augmented alike whichever process, worker or order draws it (what
    makes N-process training see the images 1 process sees), differs between epochs, and leaves the
    caller's RNG alone."""
    cfg = DataConfig(crop_size=24, scale_range=[0.5, 1.5], color_jitter=0.3)
    ds = TransformedDataset(open_dataset(voc_root, "train"), TrainTransform(cfg), seed=7)
    torch.manual_seed(0)
    a = [ds[i]["image"] for i in (0, 1)]
    state = torch.get_rng_state()
    torch.manual_seed(99)
    b = [ds[i]["image"] for i in (1, 0)][::-1]  # another RNG state, another order
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    torch.manual_seed(0)
    ds[0]
    assert torch.equal(torch.get_rng_state(), state)  # untouched by the per-sample seed
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], a[0])
    unseeded = TransformedDataset(open_dataset(voc_root, "train"), TrainTransform(cfg))
    torch.manual_seed(0)
    c = unseeded[0]["image"]
    torch.manual_seed(1)
    assert not torch.equal(unseeded[0]["image"], c)  # without a seed: the ambient RNG


def test_transformed_dataset_skip_bad(tmp_path, caplog):
    root = make_voc_dataset(tmp_path, n=4, splits={"train": ["2007_000000", "2007_000001", "2007_000002"]})
    (root / "JPEGImages" / "2007_000001.jpg").write_text("not a jpeg")
    Image.new("L", (10, 10)).save(root / "SegmentationClass" / "2007_000002.png")  # wrong size
    ds = open_dataset(root, "train")
    strict = TransformedDataset(ds, EvalTransform(DataConfig()))
    with pytest.raises(DataError, match=r"2007_000001\.jpg: not an image"):
        strict[1]
    with pytest.raises(DataError, match=r"2007_000002\.png: mask is 10x10 but its image is 40x30"):
        strict[2]
    lenient = TransformedDataset(ds, EvalTransform(DataConfig()), skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="wsss.data"):
        assert lenient[1]["id"] == "2007_000000"  # 1 and 2 are bad: wraps around to 0
    assert lenient.skipped == ["2007_000001", "2007_000002"]
    assert "2007_000001" in caplog.text
    assert lenient[2]["id"] == "2007_000000" and lenient.skipped == ["2007_000001", "2007_000002"]


def test_multiscale_flip_inputs():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    outs = multiscale_flip_inputs(x, [1.0, 0.5, 1.5], flip=True)
    assert [(tuple(t.shape), s, f) for t, s, f in outs] == [
        ((2, 3, 4, 6), 1.0, False),
        ((2, 3, 4, 6), 1.0, True),
        ((2, 3, 2, 3), 0.5, False),
        ((2, 3, 2, 3), 0.5, True),
        ((2, 3, 6, 9), 1.5, False),
        ((2, 3, 6, 9), 1.5, True),
    ]
    assert torch.equal(outs[1][0], x.flip(-1)) and outs[0][0] is x
    single = multiscale_flip_inputs(x[0], [2.0], flip=False)
    assert len(single) == 1 and single[0][0].shape == (3, 8, 12)
