"""CAM / USAGE: temperature pooling, the generation and regularisation losses, the EMA teacher."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import DropPath
from torch import nn

from wsss.config import ConfigError, config_from_dict
from wsss.methods.cam import (
    CAMConfig,
    CAMMethod,
    RegConfig,
    default_tau,
    drop_path_rate,
    generation_loss,
    regularisation_loss,
)
from wsss.pooling import temperature_pool

NUM_CLASSES = 4  # background + 3


class FakeBackbone(nn.Module):
    """Two strided convs (with BatchNorm and a drop-path residual) exposing the Backbone attributes."""

    out_channels, stride, kind = 6, 4, "cnn"

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Conv2d(8, 8, 3, 1, 1)
        self.drop_path = DropPath(0.0)
        self.head = nn.Conv2d(8, 6, 3, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.drop_path(self.mid(x))
        return self.head(x)

    def blocks(self):
        return [self.stem, self.mid, self.head]


def make(tau=math.inf, **reg) -> CAMMethod:
    torch.manual_seed(0)
    return CAMMethod(CAMConfig(tau=tau, reg=RegConfig(**reg)), None, NUM_CLASSES, backbone=FakeBackbone())


def batch(b=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, 16, 16, generator=g), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])[:b]


# ------------------------------------------------------------------------------------ temperature pooling


def test_temperature_pool_limits_and_gradient():
    maps = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(temperature_pool(maps, math.inf), maps.mean(-1))
    assert torch.allclose(temperature_pool(maps, 1e4), maps.mean(-1), atol=1e-3)
    assert torch.allclose(temperature_pool(maps, 1e-3), maps.amax(-1), atol=1e-4)
    assert torch.allclose(temperature_pool(maps, -1e-3), maps.amin(-1), atol=1e-4)
    lo, mid, hi = (temperature_pool(maps, t) for t in (-1.0, math.inf, 1.0))
    assert (lo < mid).all() and (mid < hi).all()  # tau < 0 scores below GAP, tau > 0 above
    for tau in (0.5, -0.5, math.inf):
        x = maps.clone().requires_grad_(True)
        temperature_pool(x, tau).sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_default_tau_follows_the_deterministic_principle():
    assert default_tau("cnn") < 0 < default_tau("transformer")
    with pytest.raises(ValueError):
        default_tau("rnn")


# ------------------------------------------------------------------------------------------------- losses


def test_tau_changes_the_generation_loss():
    m = make().eval()  # eval: no dropout, BatchNorm running stats -> deterministic maps
    images, labels = batch()
    with torch.no_grad():
        maps = m.activation_maps(images)
    losses = [generation_loss(maps, labels, t)[0].item() for t in (math.inf, 1.0, -1.0)]
    assert len(set(losses)) == 3
    for tau, expected in zip((math.inf, 1.0, -1.0), losses, strict=True):
        m.cfg.tau = tau
        with torch.no_grad():
            assert m.forward_losses(images, labels, 0)["gen"].item() == pytest.approx(expected, rel=1e-6)


def test_absent_k_scores_absent_classes_by_their_peak():
    # One absent class with a false region of 2 positions out of 64 (a distractor): under GAP its score
    # barely rises, so the loss barely pushes the region down; with absent_k its top positions are its score.
    maps = torch.full((1, 2, 8, 8), -2.0)
    maps[0, 1, 3, 3:5] = 4.0  # class 1 is absent, yet fires on two positions
    maps[0, 0, 2:6, 2:6] = 3.0  # class 0 is present on a 4 x 4 object
    labels = torch.tensor([[1.0, 0.0]])
    _, gap = generation_loss(maps, labels, math.inf)
    _, mixed = generation_loss(maps, labels, math.inf, absent_k=2 / 64)
    assert mixed[0, 0] == pytest.approx(gap[0, 0].item())  # the present class keeps its pool
    assert gap[0, 1].item() == pytest.approx((2 * 4.0 - 62 * 2.0) / 64)
    assert mixed[0, 1].item() == pytest.approx(4.0)  # the mean of its top 2 positions
    grads = []
    for k in (0.0, 2 / 64):
        a = maps.clone().requires_grad_(True)
        generation_loss(a, labels, math.inf, absent_k=k)[0].backward()
        grads.append(a.grad[0, 1, 3, 3].item())
    assert grads[0] > 0 and grads[1] > 20 * grads[0]  # the false region is pushed down far harder
    with pytest.raises(ConfigError, match="absent_k"):
        CAMMethod(CAMConfig(absent_k=1.5), None, NUM_CLASSES, backbone=FakeBackbone())


def test_reg_loss_is_restricted_to_present_classes():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    labels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    base = regularisation_loss(s, t, labels, tau=1.0)
    assert base > 0
    s2, t2 = s.clone(), t.clone()
    s2[:, 1] += torch.randn(2, 4, 4, generator=g) * 5  # class 2 is absent everywhere
    t2[:, 1] = 0
    assert regularisation_loss(s2, t2, labels, tau=1.0).item() == pytest.approx(base.item(), rel=1e-6)
    s2[0, 2] = 0  # class 3 is present in image 0
    assert regularisation_loss(s2, t2, labels, tau=1.0).item() != pytest.approx(base.item(), rel=1e-6)
    assert regularisation_loss(s, s, labels, tau=1.0).abs().item() < 1e-6  # KL(p || p) = 0
    # sharpening the teacher (teacher_tau < 1) changes the target
    assert regularisation_loss(s, t, labels, 1.0, teacher_tau=0.5) != base


def test_reg_zero_when_student_and_teacher_agree_positive_when_they_differ():
    m = make(tau=1.0, weight=1.0, student_drop=0.0, teacher_drop=0.0).train()
    images, labels = batch()
    out = m.forward_losses(images, labels, 0)
    assert out["reg"].abs().item() < 1e-6
    with torch.no_grad():
        m.teacher["classifier"].weight.add_(torch.randn_like(m.classifier.weight))
    assert m.forward_losses(images, labels, 0)["reg"].item() > 1e-4


def test_forward_losses_finite_with_gradient_on_the_classifier():
    images, labels = batch()
    for m in (make(), make(tau=-1.0, weight=0.5)):
        m.train()
        out = m.forward_losses(images, labels, 0)
        assert set(out) == {"loss", "gen", "reg"} and all(torch.isfinite(v) for v in out.values())
        assert out["loss"].item() == pytest.approx((out["gen"] + m.cfg.reg.weight * out["reg"]).item())
        out["loss"].backward()
        assert m.classifier.weight.grad is not None and m.classifier.weight.grad.abs().sum() > 0
        assert m.backbone.head.weight.grad is not None
        if m.teacher is not None:
            assert all(p.grad is None for p in m.teacher.parameters())


def test_student_drop_path_is_set_during_the_forward_and_restored():
    m = make(tau=1.0, weight=1.0, student_drop=0.7, teacher_drop=0.2).train()
    seen = []
    for net in (m.backbone, m.teacher["backbone"]):
        net.drop_path.register_forward_pre_hook(lambda mod, args: seen.append(mod.drop_prob))
    m.forward_losses(*batch(), 0)
    assert seen == [0.7, 0.2]
    assert m.backbone.drop_path.drop_prob == 0.0 and m.teacher["backbone"].drop_path.drop_prob == 0.0
    with drop_path_rate(m.backbone, 0.3) as n:
        assert n == 1 and m.backbone.drop_path.drop_prob == 0.3
    assert m.backbone.drop_path.drop_prob == 0.0


# ---------------------------------------------------------------------------------------------- the teacher


def test_ema_update_is_exact_and_copies_buffers():
    m = make(weight=1.0, ema=0.9).train()
    with torch.no_grad():
        for p in (*m.backbone.parameters(), *m.classifier.parameters()):
            p.add_(torch.randn_like(p))
    m.forward_losses(*batch(), 0)  # updates the student's BatchNorm statistics
    before = [t.clone() for t in m.teacher.parameters()]
    student = [*m.backbone.parameters(), *m.classifier.parameters()]
    m.after_step()
    for t0, s, t in zip(before, student, m.teacher.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6, rtol=0)
        assert torch.equal(t, t0.mul(0.9).add(s, alpha=0.1))
    bn_s, bn_t = m.backbone.stem[1], m.teacher["backbone"].stem[1]
    assert torch.equal(bn_s.running_mean, bn_t.running_mean) and bn_t.num_batches_tracked == 1


def test_teacher_takes_the_frozen_prefix_from_the_student_exactly():
    """Blocks that do not train are not computed again by the teacher: it replays the student's outputs,
    and L_REG is exactly the one of a teacher that computes everything itself."""
    m = make(weight=1.0, ema=0.9, student_drop=0.0, teacher_drop=0.0).train()
    with torch.no_grad():  # a teacher that differs from the student where it trains
        for p in m.teacher["backbone"].head.parameters():
            p.add_(0.5)
    x, y = batch()
    assert m._shared_prefix() == ([], [])  # nothing frozen: nothing shared
    m.backbone.stem.requires_grad_(False)
    m.backbone.mid.requires_grad_(False)
    assert m._shared_prefix() == ([m.backbone.stem, m.backbone.mid],
                                  [m.teacher["backbone"].stem, m.teacher["backbone"].mid])
    calls = []
    m.teacher["backbone"].stem[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        expected = regularisation_loss(m._maps(m, x, 0.0), m._maps(m.teacher, x, 0.0), y, 1.0)
    calls.clear()
    reg = m.forward_losses(x, y, 0)["reg"]
    assert calls == [], "the teacher computed its frozen stem"
    assert reg > 0 and torch.allclose(reg, expected, rtol=1e-6, atol=0)
    assert m.teacher["backbone"].stem.forward.__func__ is nn.Sequential.forward  # restored after the step
    # a frozen block with a drop-path (stochastic in the student) is not shared, nor anything after it
    m2 = make(weight=1.0)
    m2.backbone.stem.append(DropPath(0.0))
    m2.teacher["backbone"].stem.append(DropPath(0.0))
    m2.backbone.requires_grad_(False)
    assert m2._shared_prefix() == ([], [])
    # after_step copies frozen weights (no EMA rounding drift) and averages the trained ones
    with torch.no_grad():
        m.teacher["backbone"].stem[0].weight.add_(1.0)
    m.after_step()
    assert torch.equal(m.teacher["backbone"].stem[0].weight, m.backbone.stem[0].weight)


def test_teacher_only_when_used_excluded_from_head_params_and_saved():
    base = make()
    assert base.teacher is None and not any(k.startswith("teacher.") for k in base.state_dict())
    assert [id(p) for p in base.head_parameters()] == [id(base.classifier.weight)]
    m = make(weight=1.0)
    m.teacher.requires_grad_(True)  # even if something turns grads on, the optimiser must not see it
    assert [id(p) for p in m.head_parameters()] == [id(m.classifier.weight)]
    keys = m.state_dict()
    assert "teacher.classifier.weight" in keys and any(k.startswith("teacher.backbone.") for k in keys)
    assert len(m.backbone_blocks()) == 3
    # resume is exact: a fresh model loaded from the state dict has the same teacher
    m2 = make(weight=1.0)
    with torch.no_grad():
        m.teacher["classifier"].weight.add_(1.0)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.teacher["classifier"].weight, m.teacher["classifier"].weight)


# -------------------------------------------------------------------------------------------- inference


def test_class_maps_and_image_scores():
    m = make(tau=2.0).eval()
    images, _ = batch()
    with torch.no_grad():
        maps, scores = m.class_maps(images), m.image_scores(images)
    assert maps.shape == (2, NUM_CLASSES, 4, 4)
    assert (maps[:, 0] == 0).all() and (maps >= 0).all()
    assert scores.shape == (2, NUM_CLASSES - 1) and ((scores >= 0) & (scores <= 1)).all()


def test_config_from_yaml_mapping_and_validation():
    cfg = config_from_dict({"method": {"name": "cam", "tau": "-inf", "drop": 0.1, "reg": {"weight": 1}}})
    assert isinstance(cfg.method, CAMConfig) and cfg.method.tau == -math.inf and cfg.method.reg.weight == 1.0
    for bad in (
        CAMConfig(tau=0.0),
        CAMConfig(reg=RegConfig(student_drop=1.0)),
        CAMConfig(reg=RegConfig(ema=2)),
    ):
        with pytest.raises(ConfigError):
            CAMMethod(bad, None, NUM_CLASSES, backbone=FakeBackbone())


def test_with_offline_mobilenetv2():
    pytest.importorskip("wsss.models.backbones")
    from wsss.config import BackboneConfig, ModelConfig

    model_cfg = ModelConfig(BackboneConfig(name="mobilenetv2_imagenet", pretrained=False))
    m = CAMMethod(
        CAMConfig(tau=default_tau("cnn"), reg=RegConfig(weight=1.0)), model_cfg, NUM_CLASSES
    ).train()
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    out = m.forward_losses(images, labels, 0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.classifier.weight.grad is not None
    m.after_step()
    with torch.no_grad():
        maps = m.eval().class_maps(images)
    assert maps.shape == (2, NUM_CLASSES, 64 // m.backbone.stride, 64 // m.backbone.stride)


def test_drop_path_reaches_the_offline_hybrid_vit():
    pytest.importorskip("wsss.models.backbones")
    from wsss.config import BackboneConfig, ModelConfig

    model_cfg = ModelConfig(
        BackboneConfig(name="hybrid_vit_mobilenetv2", pretrained=False, drop_path_rate=0.1)
    )
    m = CAMMethod(
        CAMConfig(tau=default_tau("transformer"), reg=RegConfig(weight=1.0)), model_cfg, NUM_CLASSES
    )
    with drop_path_rate(m.backbone, 0.5) as n:
        assert n > 0 and all(x.drop_prob == 0.5 for x in m.backbone.modules() if isinstance(x, DropPath))
    out = m.train().forward_losses(torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0, 0], [0, 1, 1]]), 0)
    assert torch.isfinite(out["loss"]) and out["reg"] >= 0


def test_bf16_teacher_runs_in_bf16_and_keeps_l_reg():
    """reg.teacher_amp=bf16: the teacher's convolutions run in bf16 (the student's stay fp32) and L_REG
    stays within bf16's precision of the fp32 teacher's."""
    m = make(weight=1.0, ema=0.9, student_drop=0.0, teacher_drop=0.0).train()
    x, y = batch()
    ref = m.forward_losses(x, y, 0)["reg"]
    m.cfg.reg.teacher_amp = "bf16"
    dtypes = {}
    for name, net in (("student", m.backbone), ("teacher", m.teacher["backbone"])):
        net.stem[0].register_forward_hook(lambda _m, _a, out, name=name: dtypes.__setitem__(name, out.dtype))
    reg = m.forward_losses(x, y, 0)["reg"]
    assert dtypes == {"student": torch.float32, "teacher": torch.bfloat16}
    assert reg.dtype == torch.float32 and torch.allclose(reg, ref, rtol=0.05, atol=1e-3)
    with pytest.raises(ConfigError, match="teacher_amp"):
        make(weight=1.0, teacher_amp="fp8")
