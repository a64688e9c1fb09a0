"""Stage 2: a fully supervised DeepLab trained on pseudo masks, as a Method so the one engine trainer
trains it (checkpoints, resume, DDP, AMP and logs come for free).

- `deeplabv3`: the backbone's grid + torchvision's `DeepLabHead` (ASPP with image pooling, 256 channels,
  3x3 conv, 1x1 classifier; Chen et al. 2017). Rates (6, 12, 18) at output stride 16, doubled at 8.
- `deeplabv2`: the v2 ASPP (Chen et al. 2018): four parallel 3x3 convolutions to the classes with rates
  (6, 12, 18, 24) at output stride 8, their logits summed. The WSSS literature's stage 2 (DeepLab-v2
  ResNet-101) is this head.
Rates are given at the paper's output stride and scaled to the backbone's (`method.rates` overrides).

It differs from the weakly supervised methods in two class attributes the engine reads: `target = "mask"`
(forward_losses gets the batch's masks, not its label vectors) and `uses_tags = False` (inference takes the
plain argmax of the upsampled softmax over all classes: no tag restriction, no max-normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from wsss.errors import ConfigError
from wsss.io import IGNORE_INDEX
from wsss.methods.base import Method

# arch -> (rates, the output stride they are given at)
ARCHS = {"deeplabv3": ((6, 12, 18), 16), "deeplabv2": ((6, 12, 18, 24), 8)}


@dataclass
class SegmenterConfig:
    name: str = "deeplab"
    arch: str = "deeplabv3"  # deeplabv3 | deeplabv2
    rates: list[int] = field(default_factory=list)  # ASPP dilation rates; empty: the arch's, scaled to the stride


class ASPPv2(nn.Module):
    """DeepLab-v2 ASPP: the sum of parallel dilated 3x3 convolutions straight to class logits."""

    def __init__(self, in_channels: int, num_classes: int, rates):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates
        )
        for conv in self.branches:  # DeepLab-v2's initialisation of the classifier
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(b(x) for b in self.branches)


class Segmenter(Method):
    """DeepLab v3 / v2 on any wsss backbone; see the module docstring."""

    target = "mask"
    uses_tags = False
    has_background = True
    ddp_find_unused_parameters = False  # every parameter gets a gradient every step

    def __init__(self, cfg: SegmenterConfig, model_cfg, num_classes: int, backbone: nn.Module | None = None):
        super().__init__(cfg, model_cfg, num_classes)
        if cfg.arch not in ARCHS:
            raise ConfigError(f"method.arch: unknown {cfg.arch!r} (known: {', '.join(ARCHS)})")
        if backbone is None:  # injectable for tests
            from wsss.models import create_backbone

            backbone = create_backbone(model_cfg.backbone)
        self.backbone = backbone
        rates, at_stride = ARCHS[cfg.arch]
        rates = list(cfg.rates) or [max(1, round(r * at_stride / backbone.stride)) for r in rates]
        if cfg.arch == "deeplabv3":
            from torchvision.models.segmentation.deeplabv3 import DeepLabHead

            self.head = DeepLabHead(backbone.out_channels, num_classes, atrous_rates=rates)
        else:
            self.head = ASPPv2(backbone.out_channels, num_classes, rates)
        self.rates = rates

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes, h, w] at feature resolution."""
        return self.head(self.backbone(images))

    def forward_losses(self, images: torch.Tensor, masks: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        logits = F.interpolate(self.logits(images), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        masks = masks.long()
        # Sum / labelled pixels: a crop that is all "ignore" gives 0, not the NaN of a mean over nothing.
        ce = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
        ce = ce / (masks != IGNORE_INDEX).sum().clamp_min(1)
        return {"loss": ce, "ce": ce.detach()}

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).float().softmax(1)

    def image_scores(self, images: torch.Tensor) -> torch.Tensor:
        return self.class_maps(images)[:, 1:].flatten(2).amax(-1)
