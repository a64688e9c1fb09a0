"""Dense CRF cost and quality: the present classes only (background + tags, what `wsss pseudo-label --crf`
does) against all classes, on synthetic VOC-size images (500x375) with exact masks.

Each image: a smooth background gradient with texture noise and 1-2 smooth objects (ellipses, each its own
colour and class out of 20). The "classifier" probabilities over 21 classes are the one-hot truth shifted
a few pixels, blurred (a coarse, displaced map, as upsampled class maps are), with part of each object's
mass leaked to a wrong, absent class and a little noise on every channel. mIoU is over the whole set
(confusion matrix, background counted) against the exact masks.

    python benchmarks/bench_crf.py                 # 8 images, about 10 s on one core
    python benchmarks/bench_crf.py --images 20 --preset toco
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np
from scipy.ndimage import gaussian_filter

from wsss.config import CRFConfig
from wsss.postprocess.crf import refine

NUM_CLASSES = 21
H, W = 375, 500


def make_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 [H,W,3], mask uint8 [H,W], probs float32 [21,H,W])."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    bg_a, bg_b = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    t = (xx / W * np.cos(rng.uniform(0, np.pi)) + yy / H * np.sin(rng.uniform(0, np.pi)))[..., None]
    image = bg_a + (bg_b - bg_a) * np.clip(t, 0, 1)
    mask = np.zeros((H, W), np.uint8)
    classes = rng.choice(np.arange(1, NUM_CLASSES), size=rng.integers(1, 3), replace=False)
    for c in classes:
        cy, cx = rng.uniform(0.25, 0.75) * H, rng.uniform(0.2, 0.8) * W
        ry, rx, a = rng.uniform(40, 110), rng.uniform(50, 150), rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)) / rx
        v = (-(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)) / ry
        inside = u**2 + v**2 < 1
        mask[inside] = c
        image[inside] = rng.uniform(0, 255, 3) + 25 * gaussian_filter(rng.normal(size=(H, W)), 3)[inside, None]
    image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)

    onehot = np.eye(NUM_CLASSES, dtype=np.float32)[mask].transpose(2, 0, 1)
    dy, dx = rng.integers(-12, 13, 2)
    scores = gaussian_filter(np.roll(onehot, (dy, dx), axis=(1, 2)), sigma=(0, 10, 10))
    for c in classes:  # confusion with a similar, absent class on part of the object
        wrong = rng.choice([k for k in range(1, NUM_CLASSES) if k not in classes])
        blocks = (rng.random((H // 40 + 1, W // 40 + 1)) > 0.6).astype(np.float32)
        leak = gaussian_filter(np.kron(blocks, np.ones((40, 40), np.float32))[:H, :W], 8)
        scores[wrong] += 1.5 * scores[c] * leak
    scores += 0.05 * rng.random(scores.shape, dtype=np.float32)
    probs = scores / scores.sum(0, keepdims=True)
    return image, mask, probs.astype(np.float32)


def confusion(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    return np.bincount(gt.ravel() * NUM_CLASSES + pred.ravel(), minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, -1)


def miou(conf: np.ndarray) -> float:
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    return float((inter[union > 0] / union[union > 0]).mean())


def variants(image: np.ndarray, probs: np.ndarray, keep: np.ndarray, cfg: CRFConfig) -> dict:
    """The four ways to a mask, as callables (timed one by one)."""
    return {
        "none": lambda: probs.argmax(0),
        "none_present": lambda: keep[probs[keep].argmax(0)],
        "present": lambda: keep[refine(image, probs[keep], cfg)],
        "all": lambda: refine(image, probs, cfg),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="vit_pcm", help="vit_pcm | toco")
    args = ap.parse_args(argv)
    cfg = CRFConfig(preset=args.preset)
    rng = np.random.default_rng(args.seed)
    rows = {name: [np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64), 0.0] for name in ("none", "none_present", "present", "all")}
    for _ in range(args.images):
        image, mask, probs = make_sample(rng)
        keep = np.array([0, *sorted(set(np.unique(mask).tolist()) - {0})])  # background + GT tags
        for name, run in variants(image, probs, keep, cfg).items():
            t0 = time.perf_counter()
            pred = run()
            rows[name][1] += time.perf_counter() - t0
            rows[name][0] += confusion(pred.astype(np.int64), mask.astype(np.int64))
    labels = {
        "none": "no CRF, argmax of all 21 classes",
        "none_present": "no CRF, argmax of the present classes",
        "present": "CRF on present classes (bg + GT tags, 2-3 channels)",
        "all": "CRF on all 21 classes",
    }
    print(f"`python benchmarks/bench_crf.py {' '.join(sys.argv[1:] if argv is None else argv)}`".replace(" `", "`"))
    print(f"\n{args.images} synthetic {W}x{H} images, preset `{args.preset}`, one process, {platform.processor() or platform.machine()}\n")
    print("| variant | ms / image | mIoU |")
    print("|---|---:|---:|")
    for name, (conf, secs) in rows.items():
        print(f"| {labels[name]} | {1000 * secs / args.images:.0f} | {100 * miou(conf):.1f} |")


if __name__ == "__main__":
    main()
