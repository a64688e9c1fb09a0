"""The small loss pieces the methods combine: MCE, the equivariance target (ET) and its geometric warps,
the patch contrastive error (PCE). Pure functions on tensors; the methods decide when to call them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def mce_loss(scores: torch.Tensor, targets: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Multi-label BCE on probabilities (pooled softmax scores), clamped away from 0/1 so that a
    confidently wrong score gives a large but finite loss. Computed by hand in float32: torch refuses
    F.binary_cross_entropy under autocast."""
    p = scores.float().clamp(eps, 1.0 - eps)
    t = targets.float()
    return -(t * p.log() + (1.0 - t) * (1.0 - p).log()).mean()


# ----------------------------------------------------------------------------------- equivariance (ET)


@dataclass(frozen=True)
class GridTransform:
    """A geometric transform applied in this order: crop (top, left, height, width) resized back to the
    full size, then h-flip, v-flip, transpose. The crop box is in the units of the tensor it is applied
    to (grid cells for maps; `scaled(stride)` gives the pixel box for images)."""

    hflip: bool = False
    vflip: bool = False
    transpose: bool = False
    crop: tuple[int, int, int, int] | None = None

    def scaled(self, stride: int) -> GridTransform:
        if self.crop is None:
            return self
        return GridTransform(self.hflip, self.vflip, self.transpose, tuple(c * stride for c in self.crop))

    @property
    def is_identity(self) -> bool:
        return not (self.hflip or self.vflip or self.transpose or self.crop)


def sample_transform(height: int, width: int, p_flip: float, p_crop: float) -> GridTransform:
    """A random transform on a height x width grid (torch's RNG, so seeded runs repeat). Each flip and the
    transpose with p_flip; with p_crop a patch-aligned crop covering 50-99% of each side."""
    r = torch.rand(4).tolist()
    crop = None
    if r[3] < p_crop and height > 1 and width > 1:
        ch = int(torch.randint(math.ceil(height / 2), height, ()).item())
        cw = int(torch.randint(math.ceil(width / 2), width, ()).item())
        top = int(torch.randint(0, height - ch + 1, ()).item())
        left = int(torch.randint(0, width - cw + 1, ()).item())
        crop = (top, left, ch, cw)
    return GridTransform(r[0] < p_flip, r[1] < p_flip, r[2] < p_flip, crop)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))


def warp_maps(maps: torch.Tensor, t: GridTransform, mode: str = "bilinear") -> torch.Tensor:
    """Apply `t` to [B, K, h, w] maps (or images): what the network sees / should predict on the view."""
    h, w = maps.shape[-2:]
    if t.crop is not None:
        top, left, ch, cw = t.crop
        maps = _resize(maps[..., top : top + ch, left : left + cw], (h, w), mode)
    if t.hflip:
        maps = maps.flip(-1)
    if t.vflip:
        maps = maps.flip(-2)
    if t.transpose:
        maps = maps.transpose(-1, -2)
    return maps


def unwarp_maps(maps: torch.Tensor, t: GridTransform, mode: str = "bilinear") -> torch.Tensor:
    """The inverse of `warp_maps`: maps on the view back onto the original grid. Outside a crop the
    view saw nothing: those positions are zero."""
    if t.transpose:
        maps = maps.transpose(-1, -2)
    if t.vflip:
        maps = maps.flip(-2)
    if t.hflip:
        maps = maps.flip(-1)
    if t.crop is not None:
        top, left, ch, cw = t.crop
        out = maps.new_zeros(maps.shape)
        out[..., top : top + ch, left : left + cw] = _resize(maps, (ch, cw), mode)
        maps = out
    return maps


def equivariance_target(teacher_z: torch.Tensor, present: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ViT-PCM's ET target from (warped) teacher probabilities [B, K, h, w]: absent classes zeroed
    (`present` [B, K], background included), each class map divided by its spatial max, renormalised
    over classes per position."""
    z = teacher_z.float() * present[:, :, None, None].float()
    z = z / z.amax(dim=(-2, -1), keepdim=True).clamp_min(eps)
    return z / z.sum(dim=1, keepdim=True).clamp_min(eps)


def equivariance_loss(student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy of the student's softmax against the target, averaged over positions."""
    return -(target * F.log_softmax(student_logits.float(), dim=1)).sum(dim=1).mean()


# ------------------------------------------------------------------------- patch contrastive error (PCE)


def pce_loss(emb: torch.Tensor, classes: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """TKP-PCL's patch contrastive error on L2-normalised embeddings [M, D] with pseudo classes [M]:
    mean over same-class pairs (i != j) of (1 - s)^2 + mean over different-class pairs of
    relu(s - margin)^2, s the cosine similarity. Zero with fewer than two patches."""
    m = emb.shape[0]
    if m < 2:
        return emb.sum() * 0.0
    s = emb.float() @ emb.float().T
    same = classes[:, None] == classes[None, :]
    off_diag = ~torch.eye(m, dtype=torch.bool, device=emb.device)
    pos, neg = same & off_diag, ~same
    loss = emb.sum() * 0.0
    if pos.any():
        loss = loss + ((1.0 - s[pos]) ** 2).mean()
    if neg.any():
        loss = loss + (F.relu(s[neg] - margin) ** 2).mean()
    return loss


def select_pce_patches(
    emb: torch.Tensor, z: torch.Tensor, present: torch.Tensor, confidence: float, max_patches: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the patches taking part in PCE. emb [B, D, h, w] (normalised here), z [B, K, h, w] softmax
    probabilities, present [B, K] (background included). Each patch's pseudo class is the argmax of z
    over the present classes; patches whose (unrenormalised) probability exceeds `confidence` count, at
    most `max_patches` of them sampled at random over the batch. Returns (embeddings [M, D], classes [M])."""
    d = emb.shape[1]
    prob, cls = (z.detach() * present[:, :, None, None]).max(dim=1)  # [B, h, w]
    keep = (prob > confidence).flatten()
    flat = F.normalize(emb.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, d)
    idx = keep.nonzero().squeeze(1)
    if idx.numel() > max_patches:
        idx = idx[torch.randperm(idx.numel(), device=idx.device)[:max_patches]]
    return flat[idx], cls.flatten()[idx]
