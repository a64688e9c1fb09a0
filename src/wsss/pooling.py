"""Image scores from per-position class maps: the one place the two method families differ most.

All functions take maps of shape [B, C, N] (N positions, flattened) and return scores [B, C].
"""

from __future__ import annotations

import math

import torch


def resolve_k(k: float | int, num_positions: int) -> int:
    """K as an int (count) or a float in (0, 1] (fraction of positions); always in [1, N]."""
    if isinstance(k, float) and 0.0 < k <= 1.0:
        k = math.ceil(k * num_positions)
    return max(1, min(int(k), num_positions))


def topk_pool(maps: torch.Tensor, k: float | int) -> torch.Tensor:
    """Mean of the K largest values per class (TKP). K=1 is global max pooling (ViT-PCM)."""
    kk = resolve_k(k, maps.shape[-1])
    if kk == 1:
        return maps.amax(dim=-1)
    return maps.topk(kk, dim=-1).values.mean(dim=-1)


def adaptive_topk_pool(maps: torch.Tensor, ratio: float = 0.5, k_min: int = 1) -> torch.Tensor:
    """Adaptive K (in the spirit of APC): per image and class, average the positions whose score is at
    least `ratio` times that class's max score, so K follows the object's extent instead of a constant."""
    peak = maps.amax(dim=-1, keepdim=True)
    keep = maps >= ratio * peak
    if k_min > 1:  # always keep at least the k_min largest
        kth = maps.topk(min(k_min, maps.shape[-1]), dim=-1).values[..., -1:]
        keep = keep | (maps >= kth)
    keep = keep.to(maps.dtype)
    return (maps * keep).sum(-1) / keep.sum(-1).clamp_min(1.0)


def temperature_pool(maps: torch.Tensor, tau: float) -> torch.Tensor:
    """USAGE's generation pooling: s_c = sum_i softmax_i(A_c,i / tau) * A_c,i.

    tau = +inf is global average pooling (plain CAM), small tau > 0 approaches max pooling, tau < 0
    weights the weakest positions (towards min pooling)."""
    if math.isinf(tau) and tau > 0:
        return maps.mean(dim=-1)
    weights = spatial_softmax(maps, tau)
    return (weights * maps).sum(dim=-1)


def spatial_softmax(maps: torch.Tensor, tau: float) -> torch.Tensor:
    """alpha_c = softmax over positions of A_c / tau (uniform for tau = +inf)."""
    if math.isinf(tau):
        return torch.full_like(maps, 1.0 / maps.shape[-1])
    return torch.softmax(maps.float() / tau, dim=-1).to(maps.dtype)
