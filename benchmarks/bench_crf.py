"""Dense CRF cost and quality: the present classes only (background + tags, what `wsss pseudo-label --crf`
does) against all classes, on synthetic VOC-size images (500x375) with exact masks.

Each image: a smooth background gradient with texture noise and 1-2 smooth objects (ellipses, each its own
colour and class out of 20). The "classifier" probabilities over 21 classes are the one-hot truth shifted
a few pixels, blurred (a coarse, displaced map, as upsampled class maps are), with part of each object's
mass leaked to a wrong, absent class and a little noise on every channel. mIoU is over the whole set
(confusion matrix, background counted) against the exact masks.

    python benchmarks/bench_crf.py                 # 8 images, about 10 s on one core
    python benchmarks/bench_crf.py --images 20 --preset toco
    python benchmarks/bench_crf.py --num-classes 81   # COCO's label count
    python benchmarks/bench_crf.py --sweep-iterations 1,2,3,5,10   # cost and mIoU per mean-field iteration count
    python benchmarks/bench_crf.py --write         # also the "Dense CRF" section of RESULTS.md (21 and 81 classes,
                                                   # and the iteration sweep at 21)

Why not more than ~2.5x at 21 classes: pydensecrf's cost per image is a fixed part (building the
bilateral permutohedral lattice, ~0.1-0.5 s at 500x375 depending on the image's colour noise, and a
per-iteration overhead) plus a part linear in the number of labels; only the second shrinks with fewer
channels. `--phases` times the two parts.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from wsss.config import CRFConfig
from wsss.postprocess.crf import refine, resolve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_section  # noqa: E402

H, W = 375, 500


def make_sample(rng: np.random.Generator, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 [H,W,3], mask uint8 [H,W], probs float32 [num_classes,H,W])."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    bg_a, bg_b = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    t = (xx / W * np.cos(rng.uniform(0, np.pi)) + yy / H * np.sin(rng.uniform(0, np.pi)))[..., None]
    image = bg_a + (bg_b - bg_a) * np.clip(t, 0, 1)
    mask = np.zeros((H, W), np.uint8)
    classes = rng.choice(np.arange(1, num_classes), size=rng.integers(1, 3), replace=False)
    for c in classes:
        cy, cx = rng.uniform(0.25, 0.75) * H, rng.uniform(0.2, 0.8) * W
        ry, rx, a = rng.uniform(40, 110), rng.uniform(50, 150), rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)) / rx
        v = (-(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)) / ry
        inside = u**2 + v**2 < 1
        mask[inside] = c
        image[inside] = rng.uniform(0, 255, 3) + 25 * gaussian_filter(rng.normal(size=(H, W)), 3)[inside, None]
    image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)

    onehot = np.eye(num_classes, dtype=np.float32)[mask].transpose(2, 0, 1)
    dy, dx = rng.integers(-12, 13, 2)
    scores = gaussian_filter(np.roll(onehot, (dy, dx), axis=(1, 2)), sigma=(0, 10, 10))
    for c in classes:  # confusion with a similar, absent class on part of the object
        wrong = rng.choice([k for k in range(1, num_classes) if k not in classes])
        blocks = (rng.random((H // 40 + 1, W // 40 + 1)) > 0.6).astype(np.float32)
        leak = gaussian_filter(np.kron(blocks, np.ones((40, 40), np.float32))[:H, :W], 8)
        scores[wrong] += 1.5 * scores[c] * leak
    scores += 0.05 * rng.random(scores.shape, dtype=np.float32)
    probs = scores / scores.sum(0, keepdims=True)
    return image, mask, probs.astype(np.float32)


def confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(gt.ravel() * num_classes + pred.ravel(), minlength=num_classes**2).reshape(num_classes, -1)


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


def phases(image: np.ndarray, probs: np.ndarray, cfg: CRFConfig) -> tuple[float, float]:
    """Seconds of (lattice setup, 10 mean-field iterations) of one pydensecrf call."""
    import pydensecrf.densecrf as dcrf

    cfg = resolve(cfg)
    k = probs.shape[0]
    t0 = time.perf_counter()
    crf = dcrf.DenseCRF2D(W, H, k)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-8, None)).reshape(k, -1)))
    crf.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    crf.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb, rgbim=image, compat=cfg.bilateral_compat)
    t1 = time.perf_counter()
    crf.inference(int(cfg.iterations))
    return t1 - t0, time.perf_counter() - t1


def present_classes(mask: np.ndarray) -> np.ndarray:
    """Background + the classes in the mask (the GT tags), the channels the present-class CRF keeps."""
    return np.array([0, *sorted(set(np.unique(mask).tolist()) - {0})])


def measure(samples: Iterable, cfg: CRFConfig, names: tuple[str, ...], num_classes: int) -> tuple[dict, dict]:
    """ms / image and mIoU over `samples` ((image, mask, probs) each) of each named variant (see `variants`)."""
    conf = {n: np.zeros((num_classes, num_classes), np.int64) for n in names}
    secs = dict.fromkeys(names, 0.0)
    count = 0
    for image, mask, probs in samples:
        count += 1
        fns = variants(image, probs, present_classes(mask), cfg)
        for name in names:
            t0 = time.perf_counter()
            pred = fns[name]()
            secs[name] += time.perf_counter() - t0
            conf[name] += confusion(pred.astype(np.int64), mask.astype(np.int64), num_classes)
    return {n: 1000 * secs[n] / max(count, 1) for n in names}, {n: miou(conf[n]) for n in names}


def run(images: int, seed: int, preset: str, num_classes: int) -> dict:
    cfg = CRFConfig(preset=preset)
    rng = np.random.default_rng(seed)
    setup = {"present": 0.0, "all": 0.0}
    iters = {"present": 0.0, "all": 0.0}

    def samples():  # one at a time (81 classes: 60 MB of probabilities an image), phases timed on the way
        for _ in range(images):
            image, mask, probs = make_sample(rng, num_classes)
            for name, p in (("present", probs[present_classes(mask)]), ("all", probs)):
                a, b = phases(image, p, cfg)
                setup[name] += a
                iters[name] += b
            yield image, mask, probs

    ms, mious = measure(samples(), cfg, ("none", "none_present", "present", "all"), num_classes)
    return {
        "num_classes": num_classes, "images": images, "preset": preset, "ms": ms, "miou": mious,
        "setup_ms": {n: 1000 * v / images for n, v in setup.items()},
        "iterations_ms": {n: 1000 * v / images for n, v in iters.items()},
    }


def iteration_sweep(images: int, seed: int, preset: str, num_classes: int, counts: list[int]) -> list[dict]:
    """ms / image and mIoU of present- and all-class CRF at each mean-field iteration count (the preset's
    other parameters): where each converges, i.e. what fewer iterations would save and cost."""
    base = resolve(CRFConfig(preset=preset))
    rng = np.random.default_rng(seed)
    samples = [make_sample(rng, num_classes) for _ in range(images)]
    out = []
    for n in counts:
        cfg = replace(base, preset="custom", iterations=n)  # "custom": resolve() keeps the count as given
        ms, mious = measure(samples, cfg, ("present", "all"), num_classes)
        out.append({"iterations": n, **{name: {"ms": ms[name], "miou": mious[name]} for name in ms}})
    return out


def sweep_markdown(rows: list[dict], num_classes: int) -> str:
    body = [[r["iterations"], f"{r['present']['ms']:.0f}", f"{100 * r['present']['miou']:.1f}",
             f"{r['all']['ms']:.0f}", f"{100 * r['all']['miou']:.1f}", f"{r['all']['ms'] / r['present']['ms']:.1f}x"]
            for r in rows]
    return (f"\nMean-field iterations ({num_classes} classes, the same images; the presets run 10):\n\n"
            + table(["iterations", "present ms", "present mIoU %", "all ms", "all mIoU %", "all / present"], body)
            + "\n")


LABELS = {
    "none": "no CRF, argmax of all classes",
    "none_present": "no CRF, argmax of the present classes",
    "present": "CRF on present classes (bg + GT tags, 2-3 channels)",
    "all": "CRF on all classes",
}


def markdown(results: list[dict], command: str) -> str:
    rows = []
    for r in results:
        for name in ("none", "none_present", "present", "all"):
            rows.append([LABELS[name], r["num_classes"], f"{r['ms'][name]:.0f}", f"{100 * r['miou'][name]:.1f}",
                         f"{r['setup_ms'][name]:.0f}" if name in r["setup_ms"] else "",
                         f"{r['iterations_ms'][name]:.0f}" if name in r["iterations_ms"] else ""])
    speed = "; ".join(
        f"{r['num_classes']} classes: present-class CRF {r['ms']['all'] / r['ms']['present']:.1f}x faster than "
        f"all-class, mIoU {100 * r['miou']['present']:.1f} vs {100 * r['miou']['all']:.1f}"
        for r in results
    )
    return (
        f"Command: `{command}`  \nMachine: {machine()}.  \n"
        f"{results[0]['images']} synthetic {W}x{H} images each (1-2 objects, blurred and displaced class "
        f"probabilities leaking onto an absent class), preset `{results[0]['preset']}`, one process. "
        "Setup = building the CRF (unary + the two permutohedral lattices), then 10 mean-field iterations; "
        "both timed again apart from the end-to-end column.\n\n"
        + table(["variant", "classes", "ms / image", "mIoU %", "setup ms", "iterations ms"], rows)
        + f"\n\n{speed}.\n"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="vit_pcm", help="vit_pcm | toco")
    ap.add_argument("--num-classes", type=int, default=21, help="label count (21: VOC, 81: COCO)")
    ap.add_argument("--sweep-iterations", default="", help="comma-separated mean-field iteration counts to compare")
    ap.add_argument("--write", action="store_true", help="run 21 and 81 classes and update RESULTS.md")
    args = ap.parse_args(argv)
    counts = [21, 81] if args.write else [args.num_classes]
    sweep = [int(n) for n in args.sweep_iterations.split(",") if n] or ([1, 2, 3, 5, 10] if args.write else [])
    results = [run(args.images, args.seed, args.preset, n) for n in counts]
    command = "python benchmarks/bench_crf.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(results, command.strip())
    if sweep:
        text += sweep_markdown(iteration_sweep(args.images, args.seed, args.preset, counts[0], sweep), counts[0])
    print(text)
    if args.write:
        write_section("crf", "Dense CRF: present classes vs all classes", text)
    return results


if __name__ == "__main__":
    main()
