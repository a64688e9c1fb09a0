"""The one small interface every method family implements (see docs/architecture.md)."""

from __future__ import annotations

import torch
from torch import nn


class Method(nn.Module):
    """A weakly supervised segmentation method: losses for a batch, class maps for images.

    Conventions: `num_classes` counts the background (index 0); `labels` are multi-hot over the
    C = num_classes - 1 foreground classes (column c-1 is class c).
    """

    #: True when channel 0 of `class_maps` is a learned background score (patch classification);
    #: False when the background is derived at inference from a threshold (CAM).
    has_background: bool = True

    #: The batch entry `forward_losses` trains on: "label" (multi-hot tags) or "mask" (stage 2's pseudo masks).
    target: str = "label"

    #: True when inference restricts the maps to the image's tags and max-normalises them (seeds); False for
    #: a segmentation net (stage 2), whose plain argmax over all classes is the prediction.
    uses_tags: bool = True

    #: Set by the trainer after each epoch: whether that epoch's batches had their tags picked (its
    #: `tag_hit` against `tag_chance`, at `recognition_gain`; saved in last.pt). A method may hold a loss
    #: back until then (TKP-PCL's `pce.after_recognition`).
    recognised: bool = False

    @property
    def recognition_gain(self) -> float:
        """How far from chance to 1 the epoch's `tag_hit` must be for `recognised` (the alarm's bar)."""
        from wsss.diagnostics import RECOGNISED_GAIN

        return RECOGNISED_GAIN

    def __init__(self, cfg, model_cfg, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes

    def forward_losses(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """Training losses for a batch. Key "loss" is the total to backpropagate; the other entries are
        its terms, logged as they are."""
        raise NotImplementedError

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Non-negative class maps [B, num_classes, h, w] at feature resolution, higher = more that class.
        Channel 0 is the background score when `has_background`, else zeros."""
        raise NotImplementedError

    def image_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Foreground class probabilities [B, C] in [0, 1] for predicted tags."""
        raise NotImplementedError

    def backbone_blocks(self) -> list[nn.Module]:
        """The backbone's blocks from input to output, for freezing and partial unfreezing."""
        return list(self.backbone.blocks())  # type: ignore[attr-defined]

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the backbone (trained at the full learning rate)."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}  # type: ignore[attr-defined]
        return [p for p in self.parameters() if id(p) not in backbone_ids and p.requires_grad]

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. an EMA teacher update)."""


def tag_hits(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch's recognition figures, free from the scores its loss already made: `tag_hit`, the share of
    its tagged images whose top-scored foreground class ([B, C] `scores`) is one of their tags
    (multi-hot `labels`), and `tag_chance`, what picking a class at random would give (tags / C)."""
    tagged = labels.sum(1) > 0
    if not bool(tagged.any()):
        zero = scores.new_zeros(())
        return {"tag_hit": zero, "tag_chance": zero}
    top = scores.float().argmax(1)
    hit = labels.gather(1, top[:, None])[:, 0].float()
    chance = labels.float().sum(1) / labels.shape[1]
    return {"tag_hit": hit[tagged].mean(), "tag_chance": chance[tagged].mean()}
