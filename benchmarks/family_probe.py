"""Is a benchmark family learnable at all by the demo backbone? A frozen-feature probe (issue 21).

A held-out family only tests localisation if its classes can be told apart in the first place. This
probe caches the offline MobileNetV2 (stride 16) feature grid of every train and val image once, trains
a per-patch linear classifier on it (softmax over background + classes, top-K pooling, MCE: the patch
presets' head without fine-tuning), then reports val classification mAP (the recognition gate: the
prior is about the mean number of classes an image holds over C) and val pseudo-mask mIoU with GT tags
(max-normalised maps, argmax over background + tags, as `wsss pseudo-label` does).

    python benchmarks/family_probe.py DATA [--size 224] [--epochs 6 30] [--background learned bias]

Seconds per family on 2 CPU cores (features ~50 s, each head a few seconds), so a family can be vetted
before the 10-minute trainings of every preset are spent on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsss.config import BackboneConfig
from wsss.data import open_dataset
from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from wsss.engine.inference import seed_mask
from wsss.evaluation.metrics import ConfusionMatrix
from wsss.models.backbones import create_backbone
from wsss.pooling import topk_pool


def features(root: str, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """(grid features fp16 [N, D, h, w], tags multi-hot [N, C], GT masks) of every image, resized square."""
    ds = open_dataset(root, split)
    backbone = create_backbone(BackboneConfig(name="mobilenetv2_imagenet", output_stride=16)).eval()
    mean, std = np.float32(IMAGENET_MEAN), np.float32(IMAGENET_STD)
    grids, tags, masks = [], [], []
    with torch.no_grad():
        for i in range(len(ds)):
            s = ds[i]
            im = np.asarray(s.image.convert("RGB").resize((size, size)), np.float32) / 255
            grids.append(backbone(torch.from_numpy(((im - mean) / std).transpose(2, 0, 1))[None])[0].half())
            y = torch.zeros(ds.num_classes - 1)
            y[[t - 1 for t in s.tags]] = 1
            tags.append(y)
            masks.append(np.asarray(s.mask))
    return torch.stack(grids), torch.stack(tags), masks


def probe(train, val, background: str, epochs: int, k: float = 0.1, lr: float = 0.01, seed: int = 0) -> dict:
    """Train the linear patch head on cached features; val mAP, mIoU and foreground fraction."""
    from sklearn.metrics import average_precision_score

    xtr, ytr, _ = train
    xva, yva, mva = val
    xtr, xva = xtr.float(), xva.float()
    num_fg, dim = ytr.shape[1], xtr.shape[1]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws from the global generator
    head = torch.nn.Conv2d(dim, num_fg + (background == "learned"), 1, bias=False)
    torch.nn.init.normal_(head.weight, 0, 0.01, generator=g)
    bg_logit = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([*head.parameters(), bg_logit], lr=lr)

    def class_maps(x: torch.Tensor) -> torch.Tensor:
        logits = head(F.dropout(x, 0.2, head.training))
        if background == "bias":
            logits = torch.cat([bg_logit.expand(len(x), 1, *logits.shape[2:]), logits], 1)
        return logits.softmax(1)

    for _ in range(epochs):
        head.train()
        order = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(order), 16):
            idx = order[i : i + 16]
            x = xtr[idx].flip(-1) if torch.rand(1, generator=g) < 0.5 else xtr[idx]
            target = torch.cat([torch.ones(len(idx), 1), ytr[idx]], 1)  # the background is always present
            scores = topk_pool(class_maps(x).flatten(2), k).clamp(1e-6, 1 - 1e-6)
            loss = F.binary_cross_entropy(scores, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        z = class_maps(xva)
        scores = topk_pool(z.flatten(2), k)[:, 1:]
    m_ap = float(np.mean([average_precision_score(yva[:, c], scores[:, c]) for c in range(num_fg)]))
    cm = ConfusionMatrix(num_fg + 1)
    fg = total = 0
    for i, gt in enumerate(mva):
        keep = [0, *(int(c) + 1 for c in yva[i].nonzero().flatten())]
        maps = F.interpolate(z[i : i + 1, keep], size=gt.shape, mode="bilinear", align_corners=False)[0]
        maps = maps / (maps.flatten(1).amax(1)[:, None, None] + 1e-5)
        pred = seed_mask(keep, maps)
        cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64)))
        valid = gt != 255
        fg += int(((pred > 0) & valid).sum())
        total += int(valid.sum())
    return {"val_map": m_ap, "miou": float(cm.compute()["miou"]), "fg": fg / max(total, 1),
            "prior": float(yva.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="a VOC-layout dataset with train and val splits")
    ap.add_argument("--size", type=int, default=224, help="square input side (the demo presets' crop)")
    ap.add_argument("--epochs", type=int, nargs="+", default=[6, 30])
    ap.add_argument("--background", nargs="+", default=["learned"], choices=["learned", "bias"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None, help="a .pt file for the features (reused if present)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cache is not None and args.cache.exists():
        data = torch.load(args.cache, weights_only=False)  # our own cache of tensors and arrays, not a checkpoint
    else:
        data = {split: features(args.data, split, args.size) for split in ("train", "val")}
        if args.cache is not None:
            torch.save(data, args.cache)
    print("| data | size | background | epochs | val mAP (prior) | val mIoU | fg |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for bg in args.background:
        for ep in args.epochs:
            r = probe(data["train"], data["val"], bg, ep)
            print(f"| {args.data} | {args.size} | {bg} | {ep} | {r['val_map']:.3f} ({r['prior']:.2f}) | "
                  f"{r['miou']:.3f} | {r['fg']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
