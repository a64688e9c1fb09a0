"""Confusion-matrix metrics against hand-computed cases and an independent numpy mIoU; evaluate_dir."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from wsss.evaluation import ConfusionMatrix, MultiConfusion, evaluate_dir, per_class_table
from wsss.io import DataError, write_mask


def _cm(pred, gt, n):
    cm = ConfusionMatrix(n)
    cm.update(torch.tensor(pred, dtype=torch.uint8), torch.tensor(gt, dtype=torch.uint8))
    return cm.compute()


def test_two_classes_by_hand():
    # gt:   0 0 1 1      pred: 0 1 1 1     class 0: tp 1, union 2; class 1: tp 2, union 3
    r = _cm([[0, 1], [1, 1]], [[0, 0], [1, 1]], 2)
    assert r["iou"] == pytest.approx([1 / 2, 2 / 3])
    assert r["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert r["precision"] == pytest.approx([1.0, 2 / 3])
    assert r["recall"] == pytest.approx([1 / 2, 1.0])
    assert r["pixel_accuracy"] == pytest.approx(3 / 4)


def test_ignore_wrong_prediction_and_absent_class():
    gt = [0, 0, 1, 1, 255, 255]
    pred = [0, 255, 1, 2, 1, 255]  # a predicted 255 is a miss; gt 255 ignored whatever was predicted
    r = _cm(pred, gt, 4)  # class 3 is absent from gt and prediction: excluded from the mean
    # class 0: tp 1, gt 2, pred 1 -> 1/2; class 1: tp 1, gt 2, pred 1 -> 1/2; class 2: tp 0, pred 1 -> 0
    assert r["iou"][:3] == pytest.approx([0.5, 0.5, 0.0]) and r["iou"][3] is None
    assert r["present"] == [True, True, True, False]
    assert r["miou"] == pytest.approx(1 / 3)
    assert r["recall"] == pytest.approx([0.5, 0.5, None, None]) and r["precision"][2] == 0.0
    assert r["num_pixels"] == 4 and r["pixel_accuracy"] == pytest.approx(0.5)
    json.dumps(r, allow_nan=False)  # undefined values are None, not NaN


def test_out_of_range_prediction_and_bad_gt():
    assert _cm([5, 1], [1, 1], 2)["recall"][1] == pytest.approx(0.5)
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([-1, 0]), torch.tensor([0, 0]))  # signed types too
    assert cm.compute()["recall"][0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="class ids"):
        cm.update(torch.tensor([0], dtype=torch.uint8), torch.tensor([7], dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3), torch.zeros(3, 2))


def _numpy_miou(preds, gts, n):
    ious = []
    for c in range(n):
        valid = gts != 255
        g, p = (gts == c) & valid, (preds == c) & valid
        union = (g | p).sum()
        if union:
            ious.append((g & p).sum() / union)
    return float(np.mean(ious))


def test_batches_equal_one_update_and_numpy_reference():
    rng = np.random.default_rng(0)
    n = 6
    gts = rng.integers(0, n, (8, 40, 50)).astype(np.uint8)
    gts[rng.random(gts.shape) < 0.1] = 255
    preds = np.where(rng.random(gts.shape) < 0.6, gts, rng.integers(0, n + 2, gts.shape)).astype(np.uint8)
    preds[rng.random(gts.shape) < 0.05] = 255
    batched, whole = ConfusionMatrix(n), ConfusionMatrix(n)
    for i in range(0, 8, 3):
        batched.update(torch.from_numpy(preds[i : i + 3]), torch.from_numpy(gts[i : i + 3]))
    whole.update(torch.from_numpy(preds), torch.from_numpy(gts).long())
    assert torch.equal(batched.mat, whole.mat)
    assert batched.compute()["miou"] == pytest.approx(_numpy_miou(preds, gts, n), abs=1e-6)
    batched.all_reduce()  # no process group: a no-op
    assert torch.equal(batched.mat, whole.mat)
    batched.reset()
    assert batched.mat.sum() == 0 and batched.compute()["miou"] is None


def test_multi_confusion_and_table():
    gt = torch.tensor([0, 0, 1, 1], dtype=torch.uint8)
    multi = MultiConfusion(2, [0.3, 0.5])
    multi.update(0.3, torch.tensor([0, 1, 1, 1]), gt)
    multi.update(0.5, gt.clone(), gt)
    key, best = multi.best()
    assert key == 0.5 and best["miou"] == 1.0
    table = per_class_table(multi.compute()[0.3], ["background", "coffee cup"])
    assert "coffee cup" in table and "66.7" in table and "mean" in table


def test_uint8_and_int64_inputs_count_alike():
    """The uint8 path (what the loaders give, and what benchmarks/bench_eval.py times) counts as int64 does."""
    gt = torch.randint(0, 21, (375, 500), dtype=torch.uint8)
    gt[:10] = 255
    pred = torch.randint(0, 21, (375, 500), dtype=torch.uint8)
    small, wide = ConfusionMatrix(21), ConfusionMatrix(21)
    small.update(pred, gt)
    wide.update(pred.long(), gt.long())
    assert torch.equal(small.mat, wide.mat) and int(small.mat.sum()) == 365 * 500


def _voc(root, masks, names):
    (root / "JPEGImages").mkdir(parents=True)
    from PIL import Image

    for i, m in masks.items():
        Image.new("RGB", (m.shape[1], m.shape[0])).save(root / "JPEGImages" / f"{i}.jpg")
        write_mask(root / "SegmentationClass" / f"{i}.png", m)
    (root / "class_names.txt").write_text("\n".join(names) + "\n")
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(masks) + "\n")


def test_evaluate_dir(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    names = ["background", "coffee cup", "digit three"]
    gts = {f"im{i}": rng.integers(0, 3, (20, 30)).astype(np.uint8) for i in range(5)}
    gts["im0"][:2] = 255
    _voc(tmp_path / "data", gts, names)
    preds = {
        i: np.where(rng.random(g.shape) < 0.7, g, rng.integers(0, 3, g.shape)).astype(np.uint8)
        for i, g in gts.items()
    }
    (tmp_path / "pred").mkdir()
    for i, p in preds.items():
        if i == "im1":  # a grayscale PNG reads like a palette one
            Image.fromarray(p, mode="L").save(tmp_path / "pred" / f"{i}.png")
        else:
            write_mask(tmp_path / "pred" / f"{i}.png", p)
    res = evaluate_dir(tmp_path / "pred", tmp_path / "data", split="val")
    ref = _numpy_miou(np.stack(list(preds.values())), np.stack(list(gts.values())), 3)
    assert res["miou"] == pytest.approx(ref, abs=1e-6)
    assert res["num_images"] == 5 and res["split"] == "val" and set(res["per_class"]) == set(names)
    assert math.isclose(sum(v["iou"] for v in res["per_class"].values()) / 3, res["miou"])
    json.dumps(res, allow_nan=False)
    assert "digit three" in per_class_table(res, names)

    write_mask(tmp_path / "pred" / "im2.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DataError, match="im2.png"):
        evaluate_dir(tmp_path / "pred", tmp_path / "data")
    (tmp_path / "pred" / "im2.png").unlink()
    (tmp_path / "pred" / "im3.png").unlink()
    with pytest.raises(DataError, match=r"2 of 5 predictions missing \(im2, im3\)"):
        evaluate_dir(tmp_path / "pred", tmp_path / "data")


def test_all_reduce_in_a_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        multi = MultiConfusion(3, ["a", "b"])
        multi.update("b", torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
        before = multi["b"].mat.clone()
        multi.all_reduce()
        multi["b"].all_reduce()
        assert torch.equal(multi["b"].mat, before) and multi["a"].mat.sum() == 0
    finally:
        dist.destroy_process_group()


def test_foreground_splits_extent_from_class():
    # gt:   0 0 1 1 2 2 255    pred: 0 1 1 2 2 0 1
    # foreground as one class: both fg at gt 1,1,2 -> 3; gt fg 4; pred fg 4 -> iou 3/5, precision 3/4, recall 3/4;
    # of the 3 shared pixels, 2 have the right class (gt 1 -> 1, gt 2 -> 2; gt 1 -> 2 is wrong)
    r = _cm([0, 1, 1, 2, 2, 0, 1], [0, 0, 1, 1, 2, 2, 255], 3)
    fg = r["foreground"]
    assert fg["iou"] == pytest.approx(3 / 5)
    assert fg["precision"] == pytest.approx(3 / 4) and fg["recall"] == pytest.approx(3 / 4)
    assert fg["class_accuracy"] == pytest.approx(2 / 3)
    # a 255 prediction on an object is a miss of the foreground too; one class: no split
    assert _cm([255, 1], [1, 1], 2)["foreground"]["recall"] == pytest.approx(0.5)
    assert _cm([0, 0], [0, 0], 1)["foreground"] is None
    # an all-background image pair: nothing to split, undefined rather than 0 or 1
    assert _cm([0, 0], [0, 0], 3)["foreground"] == {"iou": None, "precision": None, "recall": None,
                                                    "class_accuracy": None}
    table = per_class_table(r, ["background", "a", "b"])
    assert "foreground" in table.splitlines()[-1] and "66.7%" in table.splitlines()[-1]
