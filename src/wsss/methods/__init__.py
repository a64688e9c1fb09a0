"""Method families, one file each; baselines are configs of the same code.

METHODS maps `method.name` to the class; METHOD_CONFIGS to its config dataclass.
"""

from __future__ import annotations

from wsss.methods.affinity import AffinityConfig, AffinityNet
from wsss.methods.base import Method
from wsss.methods.cam import CAMConfig, CAMMethod
from wsss.methods.patch_classification import PatchClassificationConfig, PatchClassifier
from wsss.methods.segmenter import Segmenter, SegmenterConfig

METHODS: dict[str, type[Method]] = {
    "patch_classification": PatchClassifier,
    "cam": CAMMethod,
    "deeplab": Segmenter,
    "affinity": AffinityNet,
}
METHOD_CONFIGS: dict[str, type] = {
    "patch_classification": PatchClassificationConfig,
    "cam": CAMConfig,
    "deeplab": SegmenterConfig,
    "affinity": AffinityConfig,
}


def create_method(cfg, num_classes: int) -> Method:
    """Build the method named by `cfg.method.name` from a full `wsss.config.Config`."""
    return METHODS[cfg.method.name](cfg.method, cfg.model, num_classes)


__all__ = ["METHODS", "METHOD_CONFIGS", "Method", "create_method"]
