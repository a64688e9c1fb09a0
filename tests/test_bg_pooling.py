"""The background's definition (issue 21): `method.bg_k` (its own pooling share) and `method.background`."""

from __future__ import annotations

import pytest
import torch

from wsss.config import ConfigError, load_config
from wsss.methods import create_method


def _method(**over):
    ov = ["model.backbone.pretrained=false", *(f"method.{k}={v}" for k, v in over.items())]
    cfg = load_config("demo/tkp", ov)
    return create_method(cfg, num_classes=4)


def test_bg_k_pools_the_background_over_its_own_share():
    z = torch.zeros(1, 4, 10, 10)
    z[0, 0, :2] = 1.0  # background high on 20 of 100 patches
    z[0, 1, :1] = 1.0
    plain, wide = _method(bg_k=0), _method(bg_k=0.5)
    assert plain.pool(z)[0, 0].item() == pytest.approx(1.0)  # top 10%: 20 patches are plenty
    assert wide.pool(z)[0, 0].item() == pytest.approx(0.4)  # top 50%: 20 of 50 high
    assert torch.equal(plain.pool(z)[:, 1:], wide.pool(z)[:, 1:])  # the classes are untouched
    assert _method(pooling="max", bg_k=50).pool(z)[0, 0].item() == pytest.approx(0.4)  # a count works too


def test_bg_k_must_not_be_negative():
    with pytest.raises(ConfigError, match="bg_k"):
        _method(bg_k=-1)


def test_bias_background_is_one_logit_at_every_patch():
    torch.manual_seed(0)
    m = _method(background="bias").eval()
    assert m.classifier.out_channels == 3  # the classes only: 4 channels minus the background
    with torch.no_grad():
        m.bg_logit.fill_(0.7)
        _, logits = m._forward(torch.randn(2, 3, 64, 64), dropout=False)
        z = m.class_maps(torch.randn(2, 3, 64, 64))
    assert logits.shape[1] == 4
    assert torch.allclose(logits[:, 0], torch.full_like(logits[:, 0], 0.7))  # no features: one value everywhere
    assert torch.allclose(z.sum(1), torch.ones_like(z[:, 0]), atol=1e-5)


def test_bias_background_is_trained_with_the_head():
    m = _method(background="bias").train()
    out = m.forward_losses(torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]]), epoch=0)
    out["loss"].backward()
    assert m.bg_logit.grad is not None and m.bg_logit.grad.abs().item() > 0
    assert any(p is m.bg_logit for p in m.head_parameters())
    assert _method().bg_logit is None  # "learned" (ViT-PCM's row of the classifier) is the default


def test_unknown_background_is_an_error():
    with pytest.raises(ConfigError, match="method.background"):
        _method(background="photo")
