"""Patch classification (ViT-PCM / TKP-PCL): losses, ET warps, PCE, the method on a tiny backbone."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss.config import ConfigError, ModelConfig, config_from_dict
from wsss.losses import (
    GridTransform,
    equivariance_target,
    mce_loss,
    pce_loss,
    sample_transform,
    select_pce_patches,
    unwarp_maps,
    warp_maps,
)
from wsss.methods.patch_classification import (
    ETConfig,
    HVBiLSTM,
    PatchClassificationConfig,
    PatchClassifier,
    PCEConfig,
)

NUM_CLASSES = 4  # background + 3


class FakeBackbone(nn.Module):
    out_channels, stride, kind = 8, 4, "cnn"

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x):
        return self.head(self.stem(x))

    def blocks(self):
        return [self.stem, self.head]


def make(**kw) -> PatchClassifier:
    torch.manual_seed(0)
    return PatchClassifier(
        PatchClassificationConfig(**kw), ModelConfig(), NUM_CLASSES, backbone=FakeBackbone()
    )


def batch(b=2, size=32):
    torch.manual_seed(1)
    return torch.randn(b, 3, size, size), torch.tensor([[1.0, 0, 0], [0, 1, 1]])[:b]


# ------------------------------------------------------------------------------------------------ MCE


def test_mce_is_finite_at_saturation():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = mce_loss(s, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    loss.backward()
    assert torch.isfinite(loss) and loss > 1.0
    assert mce_loss(torch.tensor([[0.9, 0.1]]), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(
        F.binary_cross_entropy(torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0])).item(), rel=1e-4
    )


# ------------------------------------------------------------------------------------------ ET warps

ALL_TRANSFORMS = [GridTransform(h, v, t) for h, v, t in itertools.product([False, True], repeat=3)]


@pytest.mark.parametrize("t", ALL_TRANSFORMS)
def test_warp_inverse_flips(t):
    m = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    w = warp_maps(m, t)
    assert w.shape[-2:] == ((6, 4) if t.transpose else (4, 6))
    assert torch.equal(unwarp_maps(w, t), m)


def test_warp_each_transform():
    m = torch.arange(6.0).reshape(1, 1, 2, 3)  # [[0,1,2],[3,4,5]]
    assert warp_maps(m, GridTransform(hflip=True))[0, 0].tolist() == [[2, 1, 0], [5, 4, 3]]
    assert warp_maps(m, GridTransform(vflip=True))[0, 0].tolist() == [[3, 4, 5], [0, 1, 2]]
    assert warp_maps(m, GridTransform(transpose=True))[0, 0].tolist() == [[0, 3], [1, 4], [2, 5]]
    # composition: crop first, then h-flip, v-flip, transpose
    c = torch.arange(16.0).reshape(1, 1, 4, 4)
    t = GridTransform(hflip=True, transpose=True, crop=(1, 0, 2, 2))  # rows 1-2, cols 0-1, upsampled x2
    w = warp_maps(c, t, mode="nearest")
    crop = c[..., 1:3, 0:2].repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.equal(w, crop.flip(-1).transpose(-1, -2))


def test_warp_inverse_with_crop():
    torch.manual_seed(0)
    m = torch.rand(1, 2, 8, 8)
    t = GridTransform(vflip=True, transpose=True, crop=(2, 4, 4, 4))
    back = unwarp_maps(warp_maps(m, t, mode="nearest"), t, mode="nearest")
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 4:8] = True
    assert torch.equal(back[..., inside], m[..., inside])
    assert (back[..., ~inside] == 0).all()
    # bilinear: close inside the crop
    back = unwarp_maps(warp_maps(m, t), t)
    assert (back[..., inside] - m[..., inside]).abs().mean() < 0.1


def test_warp_of_image_matches_warp_of_grid():
    """The pixel-level warp (crop box scaled by the stride) and the grid-level warp agree."""
    torch.manual_seed(0)
    grid = torch.rand(1, 3, 8, 8)
    img = grid.repeat_interleave(4, -1).repeat_interleave(4, -2)  # stride 4
    t = GridTransform(hflip=True, vflip=True, crop=(0, 2, 4, 4))
    pooled = F.avg_pool2d(warp_maps(img, t.scaled(4), mode="nearest"), 4)
    assert torch.allclose(pooled, warp_maps(grid, t, mode="nearest"))


def test_sample_transform_is_patch_aligned_and_seeded():
    torch.manual_seed(3)
    ts = [sample_transform(7, 5, 0.5, 1.0) for _ in range(50)]
    for t in ts:
        top, left, h, w = t.crop
        assert 4 <= h < 7 and 3 <= w < 5 and top + h <= 7 and left + w <= 5
    assert any(t.hflip for t in ts) and not all(t.hflip for t in ts)
    torch.manual_seed(3)
    assert ts[0] == sample_transform(7, 5, 0.5, 1.0)
    assert sample_transform(7, 5, 0.0, 0.0).is_identity


def test_equivariance_target():
    z = torch.rand(2, NUM_CLASSES, 3, 3).softmax(1)
    present = torch.tensor([[1.0, 1, 0, 0], [1, 0, 1, 1]])
    t = equivariance_target(z, present)
    assert torch.allclose(t.sum(1), torch.ones(2, 3, 3))
    assert (t[0, 2:] == 0).all() and (t[1, 1] == 0).all()


# ------------------------------------------------------------------------------------------------ PCE


def test_pce_zero_for_a_perfect_embedding():
    e = torch.eye(3)[[0, 0, 1, 1, 2]]  # same class identical, different classes orthogonal
    cls = torch.tensor([0, 0, 1, 1, 2])
    assert pce_loss(e, cls, margin=0.0).item() == pytest.approx(0.0, abs=1e-7)
    mixed = F.normalize(e + 0.5 * torch.eye(3)[[1, 2, 0, 2, 0]], dim=1)  # classes mix
    assert pce_loss(mixed, cls) > 0.05
    assert pce_loss(e[:1], cls[:1]).item() == 0.0  # fewer than two patches
    # the margin lets different classes be somewhat similar
    close = F.normalize(torch.tensor([[1.0, 0.2], [0.2, 1.0]]), dim=1)
    assert pce_loss(close, torch.tensor([0, 1]), margin=0.5).item() == 0.0
    assert pce_loss(close, torch.tensor([0, 1]), margin=0.0).item() > 0


def test_select_pce_patches():
    z = torch.zeros(1, 3, 2, 2)
    z[0, 0] = torch.tensor([[0.9, 0.1], [0.3, 0.0]])  # background
    z[0, 2] = torch.tensor([[0.1, 0.8], [0.3, 0.4]])  # class 2 (absent)
    z[0, 1] = 1 - z[0, 0] - z[0, 2]
    present = torch.tensor([[1.0, 1.0, 0.0]])
    emb = torch.randn(1, 5, 2, 2)
    sel, cls = select_pce_patches(emb, z, present, confidence=0.5, max_patches=10)
    # patch (0,0): bg 0.9; (0,1): class 2 absent -> best present 0.1, dropped; (1,0): class 1 0.4 dropped;
    # (1,1): class 1 0.6
    assert cls.tolist() == [0, 1] and torch.allclose(sel.norm(dim=1), torch.ones(2))
    sel, _ = select_pce_patches(emb, z, present, confidence=0.0, max_patches=2)
    assert sel.shape[0] == 2


# --------------------------------------------------------------------------------------------- method


def test_hv_bilstm_keras_init():
    torch.manual_seed(0)
    m = HVBiLSTM(32, init="keras")  # hidden 8 a direction
    for lstm in (m.rows, m.cols):
        for suffix in ("", "_reverse"):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l0{suffix}"), getattr(lstm, f"weight_hh_l0{suffix}")
            assert w_ih.abs().max() <= (6 / (32 + 32)) ** 0.5 + 1e-6  # glorot-uniform over [32 in, 4 x 8 out]
            assert torch.allclose(w_hh.T @ w_hh, torch.eye(8), atol=1e-5)  # orthogonal columns
            b = getattr(lstm, f"bias_ih_l0{suffix}") + getattr(lstm, f"bias_hh_l0{suffix}")
            assert torch.equal(b[8:16], torch.ones(8)) and b[:8].abs().sum() == 0 and b[16:].abs().sum() == 0
    plain = HVBiLSTM(32)
    assert plain.rows.bias_ih_l0.abs().sum() > 0  # torch's default: uniform biases
    with pytest.raises(ConfigError, match="hv_bilstm_init"):
        PatchClassifier(PatchClassificationConfig(hv_bilstm=True, hv_bilstm_init="tf"), ModelConfig(), 3,
                        backbone=nn.Identity())


def test_hv_bilstm_shape():
    m = HVBiLSTM(8)
    assert m(torch.randn(2, 8, 3, 5)).shape == (2, 8, 3, 5)


@pytest.mark.parametrize("hv", [False, True])
def test_forward_losses_finite_with_gradients(hv):
    model = make(
        hv_bilstm=hv,
        et=ETConfig(weight=1.0, p_flip=0.5, p_crop=0.5),
        pce=PCEConfig(weight=1.0, confidence=0.0),
    )
    model.train()
    x, y = batch()
    out = model.forward_losses(x, y, epoch=0)
    assert set(out) == {"loss", "mce", "et", "pce", "l2", "tag_hit", "tag_chance"}
    assert 0 <= float(out["tag_hit"]) <= 1 and 0 < float(out["tag_chance"]) <= 1
    assert all(torch.isfinite(v) for v in out.values())
    assert out["et"] > 0 and out["pce"] > 0 and out["l2"] > 0
    out["loss"].backward()
    assert model.classifier.weight.grad.abs().sum() > 0
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0
    if hv:
        assert model.bilstm.rows.weight_ih_l0.grad.abs().sum() > 0
    assert model.training and model.backbone.training  # the ET teacher pass restored train mode


def test_teacher_pass_restores_each_modules_mode():
    model = make(et=ETConfig(weight=1.0))
    model.train()
    model.backbone.stem.eval()  # e.g. a frozen backbone kept in eval mode by the trainer
    model.forward_losses(*batch(), epoch=0)
    assert model.training and not model.backbone.stem.training and model.backbone.head.training


def test_baseline_costs_one_pass():
    """With w_ET = w_PCE = 0 the backbone runs once; ET adds a teacher and a student pass."""
    model = make()
    calls = []
    model.backbone.register_forward_hook(lambda *a: calls.append(1))
    out = model.forward_losses(*batch(), epoch=0)
    assert len(calls) == 1 and out["et"] == 0 and out["pce"] == 0
    model.cfg.et.weight = 1.0
    calls.clear()
    model.forward_losses(*batch(), epoch=0)
    assert len(calls) == 3


def test_pce_warmup_skips_it():
    model = make(pce=PCEConfig(weight=1.0, confidence=0.0, warmup_epochs=2))
    assert model.forward_losses(*batch(), epoch=1)["pce"] == 0
    assert model.forward_losses(*batch(), epoch=2)["pce"] > 0


def test_l2_term():
    model = make(classifier_weight_decay=0.1)
    out = model.forward_losses(*batch(), epoch=0)
    assert out["l2"].item() == pytest.approx(0.05 * model.classifier.weight.pow(2).sum().item(), rel=1e-5)
    assert make(classifier_weight_decay=0.0).forward_losses(*batch(), epoch=0)["l2"] == 0


def test_class_maps_and_scores():
    model = make().eval()
    x, _ = batch(size=40)
    with torch.no_grad():
        z = model.class_maps(x)
        s = model.image_scores(x)
    assert z.shape == (2, NUM_CLASSES, 10, 10)
    assert torch.allclose(z.sum(1), torch.ones(2, 10, 10)) and (z >= 0).all()
    assert s.shape == (2, NUM_CLASSES - 1) and (s >= 0).all() and (s <= 1).all()
    model.train()  # no dropout in class_maps, even in train mode (BN aside: FakeBackbone BN in eval)
    model.backbone.eval()
    with torch.no_grad():
        assert torch.allclose(model.class_maps(x), z)


def test_pooling_knobs_change_the_score():
    x, _ = batch()
    with torch.no_grad():
        z = make().eval().class_maps(x)
        scores = {
            p: make(pooling=p, k=k).eval().pool(z)
            for p, k in [("max", 0.1), ("topk", 0.1), ("adaptive", 0.1)]
        }
        k1 = make(pooling="topk", k=1.0).eval().pool(z)
        k5 = make(pooling="topk", k=5.0).eval().pool(z)
    flat = z.flatten(2)
    assert torch.equal(scores["max"], flat.amax(-1)) and torch.equal(k1, scores["max"])  # k = 1 is max
    assert torch.allclose(scores["topk"], flat.topk(7, -1).values.mean(-1))  # 10% of 64 -> 7
    assert torch.allclose(k5, flat.topk(5, -1).values.mean(-1))
    assert (scores["topk"] < scores["max"]).any() and not torch.allclose(scores["adaptive"], scores["max"])


def test_config_checks_and_registry():
    with pytest.raises(ConfigError, match="pooling"):
        make(pooling="avg")
    cfg = config_from_dict(
        {"method": {"name": "patch_classification", "pooling": "max", "pce": {"weight": 0.5}}}
    )
    assert isinstance(cfg.method, PatchClassificationConfig) and cfg.method.pce.weight == 0.5


def test_with_real_offline_backbone():
    """The demo's default: MobileNetV2 (packaged weights) at stride 16, one step, gradients everywhere."""
    cfg = config_from_dict({"model": {"backbone": {"name": "mobilenetv2_imagenet"}}})
    torch.manual_seed(0)
    model = PatchClassifier(PatchClassificationConfig(hv_bilstm=True), cfg.model, NUM_CLASSES)
    x, y = batch(size=64)
    out = model.forward_losses(x, y, epoch=0)
    out["loss"].backward()
    assert model.backbone.model[0][0].weight.grad is not None
    assert model.class_maps(x).shape == (2, NUM_CLASSES, 4, 4)


def test_pce_projection_head_is_used_and_trained():
    """With pce.projection_dim, PCE reaches the backbone through a projection head that gets gradients."""
    method = make(dropout=0.0, pce=PCEConfig(weight=1.0, confidence=0.0, projection_dim=8))
    assert method.pce_projection is not None and method.pce_projection[-1].out_channels == 8
    out = method.forward_losses(*batch(), epoch=0)
    assert out["pce"] > 0
    out["loss"].backward()
    assert method.pce_projection[0].weight.grad.abs().sum() > 0
    assert method.backbone.head.weight.grad.abs().sum() > 0
    assert make().pce_projection is None  # the literal form: PCE on the embeddings themselves


def test_pce_after_recognition_waits_for_the_trainer_flag():
    model = make(pce=PCEConfig(weight=1.0, confidence=0.0, after_recognition=0.8))
    model.train()
    x, y = batch()
    assert float(model.forward_losses(x, y, epoch=3)["pce"]) == 0  # not yet recognised: no PCE
    model.recognised = True
    assert float(model.forward_losses(x, y, epoch=3)["pce"]) > 0


def test_tag_hits_counts_top_class_among_tags():
    from wsss.methods.base import tag_hits

    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.6], [0.5, 0.4, 0.3]])
    labels = torch.tensor([[1, 0, 0], [1, 0, 1], [0, 1, 1], [0, 0, 0]])  # the last image has no tags
    out = tag_hits(scores, labels)
    assert float(out["tag_hit"]) == pytest.approx(2 / 3)  # hit, miss, hit
    assert float(out["tag_chance"]) == pytest.approx((1 + 2 + 2) / 9)
