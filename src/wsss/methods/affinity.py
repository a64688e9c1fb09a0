"""AffinityNet (Ahn & Kwak 2018, PSA) as a Method, so the one engine trainer trains it (checkpoints,
resume, poly schedule, head lr multiplier come for free).

A backbone from `wsss.models.create_backbone` + a 1x1 embedding head; `forward_losses(images, masks)` takes
the batch's confident-label masks (`target = "mask"`, as stage 2), reduced to the feature grid by nearest
sampling, and returns PSA's pair loss (`wsss.postprocess.affinity.affinity_loss`). The config also holds the
settings of label generation and of the random walk that `wsss refine` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from wsss.errors import ConfigError
from wsss.io import IGNORE_INDEX
from wsss.methods.base import Method

WALK_CRF_MODES = ("label", "scores")


@dataclass
class AffinityConfig:
    name: str = "affinity"
    dim: int = 256  # embedding channels
    radius: int = 5  # pairs (training) and neighbours (random walk) within this many feature cells
    alphas: list[float] = field(default_factory=lambda: [4.0, 32.0])  # low / high background alpha (PSA)
    crf: bool = True  # refine each alpha's labeling with the dense CRF (infer.crf preset)
    beta: float = 8.0  # a_ij = affinity^beta
    logt: int = 6  # 2^logt random-walk steps
    bg_threshold: float = 0.39  # background score against the walked, max-normalised foreground maps
    bg_alpha: float = 0.0  # > 0: background (1 - max fg)^alpha walked with the foreground instead
    # `wsss refine --crf`, the CRF after the walk: label (IRN's: the walk's mask as a unary of confidence
    # walk_crf_confidence, CRF preset irn_label) | scores (the walked scores as the unary, infer.crf). The
    # walked scores are averages, flat next to the seeds' (0.3-0.6 against a 0.35 background), so the CRF's
    # pairwise terms outweigh them and wipe thin parts; the labelling's fixed margin does not.
    walk_crf: str = "label"
    walk_crf_confidence: float = 0.7  # IRN's gt_prob


def check_walk_crf(cfg: AffinityConfig) -> None:
    if cfg.walk_crf not in WALK_CRF_MODES:
        raise ConfigError(f"method.walk_crf: unknown mode {cfg.walk_crf!r} ({', '.join(WALK_CRF_MODES)})")
    from wsss.postprocess.crf import check_label_confidence

    check_label_confidence(cfg.walk_crf_confidence, "method.walk_crf_confidence")


class AffinityNet(Method):
    """Backbone + embedding head; see the module docstring."""

    target = "mask"
    uses_tags = True
    has_background = True
    ddp_find_unused_parameters = False

    def __init__(self, cfg: AffinityConfig, model_cfg, num_classes: int, backbone: nn.Module | None = None):
        super().__init__(cfg, model_cfg, num_classes)
        if cfg.radius < 2:
            raise ConfigError(f"method.radius: {cfg.radius} leaves no pairs (>= 2)")
        check_walk_crf(cfg)
        if len(cfg.alphas) != 2:
            raise ConfigError(f"method.alphas: expected [low, high], got {cfg.alphas}")
        if backbone is None:  # injectable for tests
            from wsss.models import create_backbone

            backbone = create_backbone(model_cfg.backbone)
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.Conv2d(backbone.out_channels, cfg.dim, 1, bias=False),
            nn.GroupNorm(min(16, cfg.dim), cfg.dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(cfg.dim, cfg.dim, 1, bias=False),
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Affinity features [B, dim, h, w] on the backbone's grid."""
        return self.head(self.backbone(images))

    def forward_losses(self, images: torch.Tensor, masks: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        from wsss.postprocess.affinity import affinity_loss

        feats = self.embed(images)
        labels = F.interpolate(masks[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].long()
        labels[(labels < 0) | (labels >= self.num_classes)] = IGNORE_INDEX
        return affinity_loss(feats, labels, self.cfg.radius)

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("AffinityNet has no class maps: `wsss refine` walks seed maps with it")

    def image_scores(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("AffinityNet has no image scores")
