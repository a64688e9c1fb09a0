"""Pooling: top-K, adaptive, temperature."""

import math

import pytest
import torch

from wsss.pooling import adaptive_topk_pool, resolve_k, temperature_pool, topk_pool


@pytest.fixture
def maps():
    torch.manual_seed(0)
    return torch.rand(2, 3, 20)


def test_topk_one_is_max_and_all_is_mean(maps):
    assert torch.equal(topk_pool(maps, 1), maps.amax(-1))
    assert torch.allclose(topk_pool(maps, 20), maps.mean(-1))
    assert torch.allclose(topk_pool(maps, 1.0), maps.mean(-1))  # a fraction of 1.0 = all positions
    assert torch.allclose(topk_pool(maps, 100), maps.mean(-1))  # clamped to N


def test_topk_fraction(maps):
    assert resolve_k(0.1, 20) == 2 and resolve_k(0.12, 20) == 3 and resolve_k(0.01, 20) == 1
    expected = maps.sort(-1, descending=True).values[..., :3].mean(-1)
    assert torch.allclose(topk_pool(maps, 0.15), expected)
    assert torch.allclose(topk_pool(maps, 3), expected)
    # more positions averaged never raises the score
    assert (topk_pool(maps, 1) >= topk_pool(maps, 3)).all() and (
        topk_pool(maps, 3) >= topk_pool(maps, 20)
    ).all()


@pytest.mark.parametrize("k", [1, 4, 0.25])
def test_topk_gradient_reaches_exactly_k_positions(maps, k):
    x = maps.clone().requires_grad_(True)
    topk_pool(x, k).sum().backward()
    kk = resolve_k(k, 20)
    nonzero = (x.grad != 0).sum(-1)
    assert (nonzero == kk).all()
    assert torch.allclose(x.grad.sum(-1), torch.ones(2, 3))  # a mean: weights 1/K each
    top = maps.topk(kk, dim=-1).indices
    assert (x.grad.gather(-1, top) == 1.0 / kk).all()


def test_adaptive_pool():
    m = torch.tensor([[[1.0, 0.9, 0.2, 0.1], [0.5, 0.5, 0.5, 0.5]]])
    s = adaptive_topk_pool(m, ratio=0.5)
    assert torch.allclose(s, torch.tensor([[0.95, 0.5]]))  # large-extent classes average more positions
    assert torch.allclose(adaptive_topk_pool(m, ratio=1.0), m.amax(-1))  # ratio 1 = max
    assert torch.allclose(adaptive_topk_pool(m, ratio=0.0), m.mean(-1))  # ratio 0 = mean (non-negative)
    assert torch.allclose(adaptive_topk_pool(m, ratio=1.0, k_min=2), torch.tensor([[0.95, 0.5]]))
    # bounded by max and mean
    x = torch.rand(2, 3, 10)
    s = adaptive_topk_pool(x)
    assert (s <= x.amax(-1) + 1e-6).all() and (s >= x.mean(-1) - 1e-6).all()


def test_temperature_pool(maps):
    assert torch.allclose(temperature_pool(maps, math.inf), maps.mean(-1))
    assert torch.allclose(temperature_pool(maps, 1e-4), maps.amax(-1), atol=1e-3)
    assert torch.allclose(temperature_pool(maps, -1e-4), maps.amin(-1), atol=1e-3)
