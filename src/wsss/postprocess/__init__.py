"""Post-processing of class probabilities: dense CRF over the present classes (`crf.py`)."""

from wsss.postprocess.crf import PRESETS, CRFPool, refine

__all__ = ["PRESETS", "CRFPool", "refine"]
