"""Patch classification: ViT-PCM (max pooling) and TKP-PCL (top-K pooling + patch contrastive error).

Every patch of the backbone's grid is classified over background + C classes (softmax Z); image scores
pool Z over patches (max: ViT-PCM; top-K mean: TKP-PCL; adaptive: APC-style, see wsss.pooling).
Loss = L_MCE + w_ET * L_ET + w_PCE * L_PCE + 0.5 * wd * ||W_classifier||^2 (see docs / METHODS.md).

Choices the papers leave open, made here:
- `k`: the config stores a float; k >= 1 is a patch count (k = 1 is max pooling), 0 < k < 1 a fraction.
- ET: one random transform per batch (all images share it); the main plain-view pass gives L_MCE and
  L_PCE, a no-grad eval-mode teacher pass on the plain view and a student pass on the transformed
  view give L_ET (so ET costs one extra forward and one extra forward+backward; none when w_ET = 0).
- PCE: the pseudo-class probability is Z itself (not renormalised over the present classes), so
  `confidence` reads as a plain softmax probability; pairs are taken across the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from wsss.config import ConfigError
from wsss.losses import (
    equivariance_loss,
    equivariance_target,
    mce_loss,
    pce_loss,
    sample_transform,
    select_pce_patches,
    warp_maps,
)
from wsss.methods.base import Method
from wsss.pooling import adaptive_topk_pool, topk_pool

POOLINGS = ("max", "topk", "adaptive")


@dataclass
class ETConfig:
    weight: float = 0.0  # w_ET; 0 turns the equivariance loss off
    p_flip: float = 0.5  # each of h-flip, v-flip, transpose
    p_crop: float = 0.3  # a patch-aligned crop resized back


@dataclass
class PCEConfig:
    weight: float = 0.0  # w_PCE; 0 turns the patch contrastive error off
    confidence: float = 0.5  # patches whose pseudo-class probability exceeds this take part
    margin: float = 0.0  # different-class pairs are penalised above this cosine similarity
    max_patches: int = 1024  # patches sampled per batch to bound the pairwise memory
    warmup_epochs: int = 0  # epochs without PCE
    # > 0: PCE acts on a small projection (1x1 conv, ReLU, 1x1 conv to this many channels) of the patch
    # embeddings instead of on the embeddings themselves, as contrastive methods do (SimCLR's projection
    # head): pulling every background patch of a batch onto one point directly in the classifier's input
    # space cost mIoU on the demo (see benchmarks/RESULTS.md); through a projection it shapes the features
    # without collapsing them. 0 = the paper's literal form.
    projection_dim: int = 0


@dataclass
class PatchClassificationConfig:
    name: str = "patch_classification"
    pooling: str = "topk"  # max | topk | adaptive
    k: float = 0.1  # top-K: an int count (>= 1) or a fraction of patches in (0, 1); 1 = max pooling
    adaptive_ratio: float = 0.5  # pooling=adaptive: positions >= ratio * max are averaged
    hv_bilstm: bool = False
    dropout: float = 0.2
    classifier_weight_decay: float = 0.01  # L2 on the classifier (added to the loss)
    et: ETConfig = field(default_factory=ETConfig)
    pce: PCEConfig = field(default_factory=PCEConfig)


class HVBiLSTM(nn.Module):
    """ViT-PCM's HV-BiLSTM: a bidirectional LSTM along each row and one along each column of the grid,
    D/4 hidden units per direction, the four outputs concatenated back to D channels."""

    def __init__(self, dim: int):
        super().__init__()
        hidden = max(1, dim // 4)
        self.out_channels = 4 * hidden
        self.rows = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.cols = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, D, h, w] -> [B, 4*hidden, h, w]
        b, d, h, w = x.shape
        t = x.permute(0, 2, 3, 1)  # [B, h, w, D]
        rows, _ = self.rows(t.reshape(b * h, w, d))
        cols, _ = self.cols(t.transpose(1, 2).reshape(b * w, h, d))
        rows = rows.reshape(b, h, w, -1)
        cols = cols.reshape(b, w, h, -1).transpose(1, 2)
        return torch.cat([rows, cols], dim=-1).permute(0, 3, 1, 2)


def _check(cfg: PatchClassificationConfig) -> None:
    if cfg.pooling not in POOLINGS:
        raise ConfigError(f"method.pooling: unknown pooling {cfg.pooling!r} (known: {', '.join(POOLINGS)})")
    if cfg.pooling == "topk" and cfg.k <= 0:
        raise ConfigError(f"method.k: {cfg.k} must be > 0 (a count >= 1 or a fraction in (0, 1))")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"method.dropout: {cfg.dropout} must be in [0, 1)")


class PatchClassifier(Method):
    """ViT-PCM / TKP-PCL. Baseline ViT-PCM = `pooling: max`, `pce.weight: 0`. See the module docstring."""

    has_background = True

    def __init__(
        self, cfg: PatchClassificationConfig, model_cfg, num_classes: int, backbone: nn.Module | None = None
    ):
        super().__init__(cfg, model_cfg, num_classes)
        _check(cfg)
        if backbone is None:  # injectable for tests
            from wsss.models import create_backbone

            backbone = create_backbone(model_cfg.backbone)
        self.backbone = backbone
        dim = backbone.out_channels
        self.bilstm = HVBiLSTM(dim) if cfg.hv_bilstm else None
        self.embed_dim = self.bilstm.out_channels if self.bilstm is not None else dim
        # a per-patch linear classifier without bias: a 1x1 conv on the grid
        self.classifier = nn.Conv2d(self.embed_dim, num_classes, kernel_size=1, bias=False)
        proj = cfg.pce.projection_dim
        self.pce_projection = (
            nn.Sequential(
                nn.Conv2d(self.embed_dim, self.embed_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(self.embed_dim, proj, 1)
            )
            if cfg.pce.weight > 0 and proj > 0
            else None
        )

    # ------------------------------------------------------------------------------------------ forward

    def _forward(self, images: torch.Tensor, dropout: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch embeddings E [B, D, h, w] before the classifier, logits [B, num_classes, h, w])."""
        p = self.cfg.dropout if dropout else 0.0
        x = F.dropout(self.backbone(images), p, self.training)
        if self.bilstm is not None:
            x = F.dropout(self.bilstm(x), p, self.training)
        return x, self.classifier(x)

    def pool(self, z: torch.Tensor) -> torch.Tensor:
        """Image scores [B, K] from per-patch probabilities [B, K, h, w] with the configured pooling."""
        flat = z.flatten(2)
        if self.cfg.pooling == "max":
            return topk_pool(flat, 1)
        if self.cfg.pooling == "adaptive":
            return adaptive_topk_pool(flat, self.cfg.adaptive_ratio)
        k = self.cfg.k
        return topk_pool(flat, int(round(k)) if k >= 1 else float(k))

    def forward_losses(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        emb, logits = self._forward(images)
        z = logits.float().softmax(dim=1)
        present = torch.cat([labels.new_ones(labels.shape[0], 1), labels], dim=1).float()  # bg always present
        mce = mce_loss(self.pool(z), present)
        zero = mce.new_zeros(())

        et = zero
        if self.cfg.et.weight > 0:
            et = self._et_loss(images, present)
        pce = zero
        if self.cfg.pce.weight > 0 and epoch >= self.cfg.pce.warmup_epochs:
            c = self.cfg.pce
            feats = emb if self.pce_projection is None else self.pce_projection(emb)
            sel, cls = select_pce_patches(feats, z, present, c.confidence, c.max_patches)
            pce = pce_loss(sel, cls, c.margin)
        l2 = zero
        if self.cfg.classifier_weight_decay > 0:
            l2 = 0.5 * self.cfg.classifier_weight_decay * self.classifier.weight.float().pow(2).sum()
        loss = mce + self.cfg.et.weight * et + self.cfg.pce.weight * pce + l2
        return {"loss": loss, "mce": mce.detach(), "et": et.detach(), "pce": pce.detach(), "l2": l2.detach()}

    def _et_loss(self, images: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        # Teacher: plain view, no grad, eval mode (no dropout, BN running stats); every submodule's mode
        # is restored as it was (the trainer may keep a frozen backbone in eval mode).
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                teacher_z = self._forward(images, dropout=False)[1].float().softmax(dim=1)
        finally:
            for m, was in modes:
                m.training = was
        t = sample_transform(*teacher_z.shape[-2:], self.cfg.et.p_flip, self.cfg.et.p_crop)
        student_logits = self._forward(warp_maps(images, t.scaled(self.backbone.stride)))[1]
        target = warp_maps(teacher_z, t)
        if target.shape[-2:] != student_logits.shape[-2:]:  # crop rounding at a partial border patch
            target = F.interpolate(
                target, size=student_logits.shape[-2:], mode="bilinear", align_corners=False
            )
        return equivariance_loss(student_logits, equivariance_target(target, present))

    # --------------------------------------------------------------------------------------- inference

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Z [B, num_classes, h, w]: per-patch softmax, channel 0 the background (no dropout)."""
        return self._forward(images, dropout=False)[1].float().softmax(dim=1)

    def image_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled foreground scores [B, C] in [0, 1]."""
        return self.pool(self.class_maps(images))[:, 1:]
