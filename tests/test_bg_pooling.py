"""method.bg_k: the background's image score pools its own top share of patches (issue 21's fix)."""

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
    plain, wide = _method(), _method(bg_k=0.5)
    assert plain.pool(z)[0, 0].item() == pytest.approx(1.0)  # top 10%: 20 patches are plenty
    assert wide.pool(z)[0, 0].item() == pytest.approx(0.4)  # top 50%: 20 of 50 high
    assert torch.equal(plain.pool(z)[:, 1:], wide.pool(z)[:, 1:])  # the classes are untouched
    assert _method(pooling="max", bg_k=50).pool(z)[0, 0].item() == pytest.approx(0.4)  # a count works too


def test_bg_k_must_not_be_negative():
    with pytest.raises(ConfigError, match="bg_k"):
        _method(bg_k=-1)
