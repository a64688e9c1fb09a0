"""AffinityNet (Ahn & Kwak 2018, PSA) as a Method, so the one engine trainer trains it (checkpoints,
resume, poly schedule, head lr multiplier come for free).

A backbone from `wsss.models.create_backbone` + a 1x1 embedding head; `forward_losses(images, masks)` takes
the batch's confident-label masks (`target = "mask"`, as stage 2), reduced to the feature grid by nearest
sampling, and returns PSA's pair loss (`wsss.postprocess.affinity.affinity_loss`). The config also holds the
settings of label generation and of the random walk that `wsss refine` reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from wsss.errors import ConfigError
from wsss.io import IGNORE_INDEX
from wsss.methods.base import Method

WALK_CRF_MODES = ("label", "scores")
MERGE_MODES = ("walk", "fill", "relabel", "auto")


@dataclass
class AffinityConfig:
    name: str = "affinity"
    dim: int = 256  # embedding channels
    radius: int = 5  # pairs (training) and neighbours (random walk) within this many feature cells
    alphas: list[float] = field(default_factory=lambda: [4.0, 32.0])  # low / high background alpha (PSA)
    # Seeds cut at a background threshold t (CAM-style; their protocol records it): the alphas put the
    # crossing of (1 - s)^alpha and s at t * alpha_crossings[0] and t * alpha_crossings[1] instead (see
    # `seed_alphas`). Fixed alphas assume seeds that are near 0 on the background, as PSA's and MCTformer's
    # are; broad CAMs (the best t 0.55-0.65 here) sit between the crossings of [1, 12] (0.5 and 0.15) over
    # most of the background, which is then ignored. Seeds with a background channel keep `alphas`.
    alpha_crossings: list[float] | None = None
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
    # The refined mask against the seeds' own CRF masks (`wsss refine --crf-masks`): walk (the walk's mask
    # alone, as PSA) | fill (each pixel the CRF masks call foreground keeps their class; the walk labels
    # only their background) | relabel (the walk's extent; where both call foreground, the CRF masks'
    # class) | auto (fill for seeds cut at a background threshold, relabel for seeds with a background
    # channel, when CRF masks are given; else walk). Where the walk and the CRF masks both say foreground
    # but disagree on the class, the CRF is right on 54-81% of the pixels (CAM seeds): the walk's coarse
    # grid carries one object's class into its neighbour. The CRF masks of seeds with a background channel
    # over-cover (TKP-PCL on F6: 21-37% foreground, 13.5% true), so for them only the class is taken
    # (benchmarks/RESULTS.md, fifteenth and sixteenth sessions, rules 12 and 13).
    merge: str = "walk"


def crossing_alpha(c: float) -> float:
    """The alpha at which the background score (1 - s)^alpha equals the foreground score s at s = c."""
    return math.log(c) / math.log(1.0 - c)


def seed_alphas(cfg: AffinityConfig, seed_threshold: float | None) -> list[float]:
    """[low, high] background alphas for seeds cut at `seed_threshold` (None: a background channel):
    `cfg.alphas`, or with `cfg.alpha_crossings` the alphas whose crossings are the threshold times them."""
    if cfg.alpha_crossings is None or seed_threshold is None:
        return [float(x) for x in cfg.alphas]
    crossings = [float(seed_threshold) * k for k in cfg.alpha_crossings]
    if not all(0.0 < c < 1.0 for c in crossings):
        raise ConfigError(f"method.alpha_crossings: {cfg.alpha_crossings} x the seeds' background threshold "
                          f"{seed_threshold:g} gives crossings {crossings}, outside (0, 1)")
    return [round(crossing_alpha(c), 4) for c in crossings]


def merge_mode(cfg: AffinityConfig, seed_threshold: float | None, crf_masks: bool) -> str:
    """'walk', 'fill' or 'relabel', the merge `wsss refine` applies (`AffinityConfig.merge`) to seeds cut at
    `seed_threshold` (None: a background channel), given CRF masks or not."""
    if cfg.merge in ("fill", "relabel") and not crf_masks:
        raise ConfigError(f"method.merge: {cfg.merge} reads the seeds' CRF masks: give them (`wsss refine --crf-masks "
                          "DIR`, made by `wsss pseudo-label RUN --crf`) or -o method.merge=walk")
    if cfg.merge == "auto":
        if not crf_masks:
            return "walk"
        return "fill" if seed_threshold is not None else "relabel"
    return cfg.merge


def check_walk_crf(cfg: AffinityConfig) -> None:
    if cfg.walk_crf not in WALK_CRF_MODES:
        raise ConfigError(f"method.walk_crf: unknown mode {cfg.walk_crf!r} ({', '.join(WALK_CRF_MODES)})")
    from wsss.postprocess.crf import check_label_confidence

    check_label_confidence(cfg.walk_crf_confidence, "method.walk_crf_confidence")


def check_config(cfg: AffinityConfig) -> None:
    """Every method key, checked where the AffinityNet is built and by `wsss refine` before anything is written."""
    if cfg.radius < 2:
        raise ConfigError(f"method.radius: {cfg.radius} leaves no pairs (>= 2)")
    check_walk_crf(cfg)
    if cfg.merge not in MERGE_MODES:
        raise ConfigError(f"method.merge: unknown mode {cfg.merge!r} ({', '.join(MERGE_MODES)})")
    if len(cfg.alphas) != 2:
        raise ConfigError(f"method.alphas: expected [low, high], got {cfg.alphas}")
    k = cfg.alpha_crossings
    if k is not None and (len(k) != 2 or not all(x > 0 for x in k) or not k[0] > k[1]):
        raise ConfigError(f"method.alpha_crossings: expected [low, high] factors > 0, low > high, got {k}")


class AffinityNet(Method):
    """Backbone + embedding head; see the module docstring."""

    target = "mask"
    uses_tags = True
    has_background = True
    ddp_find_unused_parameters = False

    def __init__(self, cfg: AffinityConfig, model_cfg, num_classes: int, backbone: nn.Module | None = None):
        super().__init__(cfg, model_cfg, num_classes)
        check_config(cfg)
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
