"""Evaluation: confusion matrices (all-reducible), mIoU tables, folders of predicted masks."""

from wsss.evaluation.evaluate import evaluate_dir
from wsss.evaluation.metrics import ConfusionMatrix, MultiConfusion, per_class_table

__all__ = ["ConfusionMatrix", "MultiConfusion", "evaluate_dir", "per_class_table"]
