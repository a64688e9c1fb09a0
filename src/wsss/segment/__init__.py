"""Stage 2: a segmentation network trained on pseudo masks (`train.py`) and prediction on new images or
a dataset split (`predict.py`)."""

from wsss.segment.predict import predict, predict_dataset
from wsss.segment.train import PseudoMaskDataset, train_segmenter

__all__ = ["PseudoMaskDataset", "predict", "predict_dataset", "train_segmenter"]
