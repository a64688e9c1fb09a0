"""Segmentation metrics from one confusion matrix: IoU, precision, recall, mIoU.

Counts are int64 (COCO val is ~10^10 pixels) and the matrix is a tensor, so DDP workers sum theirs with
one `all_reduce` and every rank then computes the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence

import numpy as np
import torch

IGNORE_INDEX = 255


def mask_tensor(mask) -> torch.Tensor:
    """A (possibly read-only) uint8 mask as a tensor for `update`; the copy keeps torch from warning."""
    return torch.from_numpy(np.array(mask, dtype=np.uint8))


class ConfusionMatrix:
    """Rows: ground-truth class; columns: predicted class, plus one "wrong" column for predictions that
    are no class at all (255, out of range). A gt of 255 is ignored."""

    def __init__(self, num_classes: int, device: str | torch.device = "cpu"):
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes must be in 1..{IGNORE_INDEX}, got {num_classes}")
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.mat.device

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one or more masks (any shape, same shape; integer class ids)."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(gt.shape)}")
        n = self.num_classes
        p = pred.reshape(-1).to(self.device)
        g = gt.reshape(-1).to(self.device)
        # Every prediction that is not a class (255, >= n, negative) goes to column n: a miss, no TP.
        p = p.clamp_max(n) if p.dtype == torch.uint8 else torch.where((p >= 0) & (p < n), p, n)
        if g.dtype != torch.uint8 and g.numel() and (int(g.min()) < 0 or int(g.max()) > IGNORE_INDEX):
            raise ValueError(f"ground truth has ids outside 0..{IGNORE_INDEX}")
        # int32 index + bincount over all 256 gt values: ~8x faster than int64, and no boolean masking.
        idx = g.to(torch.int32).mul_(n + 1).add_(p.to(torch.int32))
        counts = torch.bincount(idx, minlength=256 * (n + 1)).view(256, n + 1)
        bad = counts[n:IGNORE_INDEX].sum()
        if bad:
            raise ValueError(
                f"ground truth has {int(bad)} pixels with class ids >= num_classes ({n}) other than"
                f" {IGNORE_INDEX} (ignore)"
            )
        self.mat += counts[:n]

    def as_json(self, class_names: Sequence[str]) -> dict:
        """The shape every mIoU file of wsss has (`wsss evaluate`, summary.json): miou, per_class {name: {iou,
        precision, recall}} (None where undefined), pixel_accuracy, foreground (see `compute`)."""
        res = self.compute()
        per_class = {n: {"iou": res["iou"][c], "precision": res["precision"][c], "recall": res["recall"][c]}
                     for c, n in enumerate(class_names)}
        return {"miou": res["miou"], "per_class": per_class, "pixel_accuracy": res["pixel_accuracy"],
                "foreground": res["foreground"]}

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        self.mat += other.mat.to(self.device)
        return self

    def all_reduce(self) -> None:
        """Sum the matrices of all ranks (no-op outside torch.distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.mat, op=torch.distributed.ReduceOp.SUM)

    def compute(self) -> dict:
        """Metrics as a JSON-able dict: fractions in [0, 1], None where undefined (0/0)."""
        mat = self.mat.double().cpu()
        n = self.num_classes
        tp = mat[:, :n].diagonal()
        gt_count = mat.sum(1)  # includes the "wrong" column: a 255 prediction is a miss
        pred_count = mat[:, :n].sum(0)
        union = gt_count + pred_count - tp
        iou = _ratio(tp, union)
        present = (union > 0).tolist()
        counted = [v for v, ok in zip(iou, present, strict=True) if ok]
        total = float(gt_count.sum())
        return {
            "miou": math.fsum(counted) / len(counted) if counted else None,
            "iou": iou,
            "precision": _ratio(tp, pred_count),
            "recall": _ratio(tp, gt_count),
            "pixel_accuracy": float(tp.sum()) / total if total else None,
            "present": present,  # class in gt or prediction: the classes the mean is over
            "gt_pixels": [int(v) for v in gt_count.tolist()],
            "pred_pixels": [int(v) for v in pred_count.tolist()],
            "num_pixels": int(total),
            "foreground": self._foreground(mat),
        }

    def _foreground(self, mat: torch.Tensor) -> dict | None:
        """Where the mIoU is lost, split in two (class 0 is the background, as in every wsss dataset):
        the foreground as one class (iou, precision, recall: the masks' extent) and `class_accuracy`, the
        share of the pixels that are foreground in both the ground truth and the prediction that also
        have the right class (which object is which). None with a single class. `mat`: the matrix as
        `compute` reads it (float64, on the CPU)."""
        n = self.num_classes
        if n < 2:
            return None
        both = float(mat[1:, 1:n].sum())  # gt foreground predicted as some foreground class
        gt_fg = float(mat[1:].sum())  # a 255 / out-of-range prediction on a gt object is a miss
        pred_fg = float(mat[:, 1:n].sum())
        right = float(mat[1:, 1:n].diagonal().sum())
        iou, precision, recall, class_accuracy = _ratio(
            torch.tensor([both, both, both, right]), torch.tensor([gt_fg + pred_fg - both, pred_fg, gt_fg, both]))
        return {"iou": iou, "precision": precision, "recall": recall, "class_accuracy": class_accuracy}


def _ratio(num: torch.Tensor, den: torch.Tensor) -> list[float | None]:
    return [float(a) / float(b) if b > 0 else None for a, b in zip(num.tolist(), den.tolist(), strict=True)]


class MultiConfusion:
    """Several confusion matrices keyed by a setting (e.g. a background threshold), for sweeps:
    `update(key, pred, gt)`, one `all_reduce` for all of them, `best()` picks the top key."""

    def __init__(self, num_classes: int, keys: Iterable[Hashable], device: str | torch.device = "cpu"):
        self.matrices = {k: ConfusionMatrix(num_classes, device) for k in keys}
        if not self.matrices:
            raise ValueError("MultiConfusion needs at least one key")

    def __getitem__(self, key: Hashable) -> ConfusionMatrix:
        return self.matrices[key]

    def keys(self) -> list[Hashable]:
        return list(self.matrices)

    def update(self, key: Hashable, pred: torch.Tensor, gt: torch.Tensor) -> None:
        self.matrices[key].update(pred, gt)

    def reset(self) -> None:
        for m in self.matrices.values():
            m.reset()

    def all_reduce(self) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        stacked = torch.stack([m.mat for m in self.matrices.values()])  # one collective, not one per key
        torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.SUM)
        for m, s in zip(self.matrices.values(), stacked, strict=True):
            m.mat.copy_(s)

    def compute(self) -> dict:
        return {k: m.compute() for k, m in self.matrices.items()}

    def best(self, metric: str = "miou") -> tuple[Hashable, dict]:
        """The key with the highest `metric` (first on ties; undefined counts as lowest)."""
        results = self.compute()
        key = max(results, key=lambda k: -math.inf if results[k][metric] is None else results[k][metric])
        return key, results[key]


def per_class_table(result: dict, class_names: Sequence[str]) -> str:
    """A plain-text table (for logs and terminals) of per-class IoU / precision / recall in %.

    Accepts `ConfusionMatrix.compute()` output or an `evaluate_dir` result."""
    if "per_class" in result:
        rows = [(name, v["iou"], v["precision"], v["recall"]) for name, v in result["per_class"].items()]
    else:
        if len(class_names) != len(result["iou"]):
            raise ValueError(f"{len(class_names)} class names for {len(result['iou'])} classes")
        rows = list(zip(class_names, result["iou"], result["precision"], result["recall"], strict=True))

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    width = max([len("class"), len("mean")] + [len(r[0]) for r in rows])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'prec':>6}  {'recall':>6}"]
    lines.append("-" * len(lines[0]))
    lines += [f"{name:<{width}}  {pct(i):>6}  {pct(p):>6}  {pct(r):>6}" for name, i, p, r in rows]
    lines.append("-" * len(lines[0]))
    lines.append(f"{'mean':<{width}}  {pct(result['miou']):>6}")
    fg = result.get("foreground")
    if fg:  # the extent and the class assignment, apart (ConfusionMatrix._foreground)
        lines.append(f"{'foreground':<{width}}  {pct(fg['iou']):>6}  {pct(fg['precision']):>6}  {pct(fg['recall']):>6}"
                     f"  (all classes as one; right class on {pct(fg['class_accuracy'])}% of the shared foreground)")
    return "\n".join(lines)
