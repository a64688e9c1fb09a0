"""Test helpers for the engine tests: a tiny registered method ("fake") and a tiny VOC-layout dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from wsss.config import config_from_dict
from wsss.io import write_mask
from wsss.methods import METHOD_CONFIGS, METHODS
from wsss.methods.base import Method

CLASSES = ["background", "red", "green"]


class Crash(RuntimeError):
    """Stands in for a kill: nothing after it runs, nothing is written."""


@dataclass
class FakeConfig:
    name: str = "fake"
    nan_at_step: int = -1  # forward_losses returns a NaN loss at this call (0-based, counted across resumes)
    crash_at_step: int = -1  # forward_losses raises Crash at this call
    has_background: bool = True
    pointwise: bool = False  # 1x1 convs only: maps commute with flips
    dropout: float = 0.3  # on the features in training (consumes the torch RNG)


class FakeBackbone(nn.Module):
    out_channels, stride, kind = 8, 4, "cnn"

    def __init__(self, pointwise: bool = False):
        super().__init__()
        k, s, p = (1, 1, 0) if pointwise else (3, 2, 1)  # strided sampling would not commute with flips
        self.b0 = nn.Sequential(nn.Conv2d(3, 8, k, s, p), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, k, s, p), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())

    def forward(self, x):
        return self.b2(self.b1(self.b0(x)))

    def blocks(self):
        return [self.b0, self.b1, self.b2]


class FakeMethod(Method):
    def __init__(self, cfg, model_cfg, num_classes):
        super().__init__(cfg, model_cfg, num_classes)
        self.has_background = cfg.has_background
        with torch.random.fork_rng():  # the same initial weights whatever the global seed
            torch.manual_seed(123)
            self.backbone = FakeBackbone(cfg.pointwise)
            self.classifier = nn.Conv2d(8, num_classes, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def _logits(self, x):
        return self.classifier(self.backbone(x))

    def class_maps(self, images):
        z = self._logits(images)
        if self.has_background:
            return z.softmax(1)
        maps = F.relu(z)
        return torch.cat([torch.zeros_like(maps[:, :1]), maps[:, 1:]], 1)

    def image_scores(self, images):
        return torch.sigmoid(self._logits(images)[:, 1:].mean((2, 3)))

    def forward_losses(self, images, labels, epoch):
        k = int(self.calls)
        self.calls += 1
        if k == self.cfg.crash_at_step:
            raise Crash(f"crash at call {k}")
        f = F.dropout(self.backbone(images), self.cfg.dropout, self.training)  # consumes the torch RNG
        logits = self.classifier(f)[:, 1:].mean((2, 3))
        mce = F.binary_cross_entropy_with_logits(logits, labels)
        reg = 1e-3 * logits.pow(2).mean()
        loss = mce + reg
        if k == self.cfg.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss, "mce": mce.detach(), "reg": reg.detach()}


def register() -> None:
    METHODS["fake"] = FakeMethod
    METHOD_CONFIGS["fake"] = FakeConfig


register()


def make_voc(root: Path, n_train: int = 8, n_val: int = 4, size: int = 64, seed: int = 0) -> Path:
    """A VOC-layout dataset: noise backgrounds with a red and/or green square; PNG images (lossless)."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "class_names.txt").write_text("\n".join(CLASSES) + "\n")
    splits = {"train": [f"tr{i:02d}" for i in range(n_train)], "val": [f"va{i:02d}" for i in range(n_val)]}
    for split, ids in splits.items():
        for j, id_ in enumerate(ids):
            h, w = size, size + 8 * (j % 3)  # varied sizes
            img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            mask = np.zeros((h, w), np.uint8)
            present = [1 + j % 2] if j % 3 else [1, 2]
            for c in present:
                s = int(rng.integers(12, 24))
                y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
                img[y : y + s, x : x + s] = [220, 30, 30] if c == 1 else [30, 220, 30]
                mask[y : y + s, x : x + s] = c
            Image.fromarray(img).save(root / "JPEGImages" / f"{id_}.png")
            write_mask(root / "SegmentationClass" / f"{id_}.png", mask)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def make_cfg(root: Path, **train):
    t = {"epochs": 3, "batch_size": 4, "seed": 0, "optimizer": "adam", "lr": 0.01, "backbone_lr_mult": 0.5,
         "scheduler": "cosine", "warmup_epochs": 0.5, "amp": "off", **train}
    method = t.pop("method", {})
    return config_from_dict({
        "data": {"root": str(root), "format": "voc", "crop_size": 32, "scale_range": [0.8, 1.2], "num_workers": 0},
        "method": {"name": "fake", **method},
        "train": t,
        "infer": {"scales": [1.0], "flip": False},
    })
