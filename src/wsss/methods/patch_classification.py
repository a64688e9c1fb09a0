"""Patch classification: ViT-PCM (max pooling) and TKP-PCL (top-K pooling + patch contrastive error).

IMPLEMENTATION PENDING (helper). The config dataclass below is the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wsss.methods.base import Method


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


class PatchClassifier(Method):
    has_background = True
