"""Evaluator throughput on PASCAL VOC val's shape: 1,449 prediction / ground-truth pairs of 500x375 masks,
21 classes, ground truth with VOC's 255 ignore band around objects.

(a) `ConfusionMatrix.update` on uint8 tensors already in memory (masks/s; target >= 1,000 on CPU);
(b) `evaluate_dir` end to end: PNG files on disk (written first, so in the page cache) decoded in its
    thread pool, VOC-layout dataset, metrics (masks/s, PNG decoding of both masks included).
Masks are synthetic (1-3 ellipse objects; the prediction displaced, with a wrong-class region and a few
255 pixels); a pool of distinct pairs is cycled, as the cost does not depend on the content. Both paths
must give the same mIoU (checked).

    python benchmarks/bench_eval.py
    python benchmarks/bench_eval.py --masks 300 --workers 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import CPUShare, machine, table, write_section

H, W, NUM_CLASSES = 375, 500, 21


def make_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, ground truth) uint8 [375, 500]."""
    yy, xx = np.mgrid[0:H, 0:W]
    gt = np.zeros((H, W), np.uint8)
    pred = np.zeros((H, W), np.uint8)
    edge = np.zeros((H, W), bool)
    for _ in range(rng.integers(1, 4)):
        c = int(rng.integers(1, NUM_CLASSES))
        cy, cx, ry, rx = rng.uniform(60, H - 60), rng.uniform(80, W - 80), rng.uniform(30, 140), rng.uniform(40, 200)
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        gt[d < 1] = c
        edge |= np.abs(np.sqrt(d) - 1) * min(ry, rx) < 2.5  # a ~5 px band on the outline
        dy, dx = rng.integers(-15, 16, 2)
        pd = ((yy - cy - dy) / ry) ** 2 + ((xx - cx - dx) / rx) ** 2
        pred[pd < 1.1] = c
        pred[(pd < 0.3) & (xx > cx)] = int(rng.integers(1, NUM_CLASSES))  # part confused with another class
    gt[edge] = 255
    pred[rng.random((H, W)) < 0.001] = 255  # a few invalid predictions (count as misses)
    return pred, gt


def write_dataset(root: Path, pairs: list[tuple[bytes, bytes]], n: int) -> list[str]:
    """VOC layout under root (val split of n ids, tiny placeholder JPEGs: evaluate_dir never opens
    them) and the predictions under root/pred; returns the ids."""
    import io

    from PIL import Image

    ids = [f"2008_{i:06d}" for i in range(n)]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    for d in ("JPEGImages", "SegmentationClass", "pred", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(ids):
        pred_png, gt_png = pairs[k % len(pairs)]
        (root / "JPEGImages" / f"{i}.jpg").write_bytes(buf.getvalue())
        (root / "SegmentationClass" / f"{i}.png").write_bytes(gt_png)
        (root / "pred" / f"{i}.png").write_bytes(pred_png)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    return ids


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masks", type=int, default=1449, help="pairs (VOC val: 1,449)")
    ap.add_argument("--pool", type=int, default=32, help="distinct synthetic pairs, cycled")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes; the median is reported")
    ap.add_argument("--workers", type=int, default=4, help="evaluate_dir decoding threads (its default: 4)")
    ap.add_argument("--threads", default="1,0", help="torch intra-op thread counts to run (0: torch's default)")
    ap.add_argument("--target", type=float, default=1000.0, help="masks/s target for (a)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--write", action="store_true", help="update the section of benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    command = "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)
    from wsss.evaluation.evaluate import evaluate_dir
    from wsss.evaluation.metrics import ConfusionMatrix
    from wsss.io import encode_mask_png

    rng = np.random.default_rng(0)
    pool = [make_pair(rng) for _ in range(min(args.pool, args.masks))]
    tensors = [(torch.from_numpy(p), torch.from_numpy(g)) for p, g in pool]
    default_threads = torch.get_num_threads()
    threads = [int(t) or default_threads for t in args.threads.split(",")]
    rows, mious = [], set()
    with CPUShare() as share, tempfile.TemporaryDirectory(prefix="wsss-bench-eval-") as tmp:
        root = Path(tmp)
        write_dataset(root, [(encode_mask_png(p), encode_mask_png(g)) for p, g in pool], args.masks)
        for nt in threads:
            torch.set_num_threads(nt)
            for path in ("memory", "disk"):
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    if path == "memory":
                        cm = ConfusionMatrix(NUM_CLASSES)
                        for k in range(args.masks):
                            cm.update(*tensors[k % len(tensors)])
                        miou = cm.compute()["miou"]
                    else:
                        miou = evaluate_dir(root / "pred", root, "val", format="voc", num_workers=args.workers)["miou"]
                    times.append(time.perf_counter() - t0)
                    mious.add(round(miou, 12))
                sec = statistics.median(times)
                rows.append({"path": path, "threads": nt, "seconds": sec, "masks_s": args.masks / sec,
                             "ms_per_mask": 1000 * sec / args.masks, "all_seconds": times})
                print(f"{path}, {nt} threads: {args.masks / sec:.0f} masks/s", file=sys.stderr, flush=True)
    torch.set_num_threads(default_threads)
    best_mem = max(r["masks_s"] for r in rows if r["path"] == "memory")
    result = {"command": command, "machine": machine(), "cpu_share": share.note(), "shared": share.shared,
              "masks": args.masks, "workers": args.workers, "rows": rows, "target": args.target,
              "same_miou": len(mious) == 1, "miou": mious.pop() if len(mious) == 1 else None,
              "meets_target": best_mem >= args.target}
    label = {"memory": "(a) `ConfusionMatrix.update`, uint8 tensors in memory",
             "disk": f"(b) `evaluate_dir`, PNG files (page cache), {args.workers} decoding threads"}
    body = table(["path", "torch threads", "masks", "seconds", "masks/s", "ms/mask"], [
        [label[r["path"]], r["threads"], args.masks, f"{r['seconds']:.2f}", f"{r['masks_s']:.0f}",
         f"{r['ms_per_mask']:.2f}"] for r in rows], "lrrrrr")
    result["markdown"] = (
        f"Command: `{command}`  \nMachine: {result['machine']}.  \n{share.note()}.  \n"
        f"{args.masks} synthetic VOC-size pairs ({W}x{H}, {NUM_CLASSES} classes, 255 bands), median of "
        f"{args.repeats} passes, per torch intra-op thread count.\n\n{body}\n\n"
        f"Target >= {args.target:.0f} masks/s for (a): {'met' if result['meets_target'] else 'NOT met'} "
        f"(best {best_mem:.0f}). Every path gives the same mIoU: {'yes' if result['same_miou'] else 'NO'}.\n")
    print(result["markdown"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.write:
        write_section("eval", "Evaluator", result["markdown"])
    return result


if __name__ == "__main__":
    main()
