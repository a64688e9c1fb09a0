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

Backends (issue 18): `--backend torch|pydensecrf|both` times the backends instead: ms per image at 1 thread
and at all threads, for the present classes (2-3 channels), 21 and 81 channels, the preset's 10 iterations,
peak RSS growth during one call (CUDA: torch.cuda.max_memory_allocated), images per second over the images
with `--workers` CRF worker processes (CRFPool), and a CUDA column when a GPU is there. `--agreement` also
labels every image with both backends: share of equal pixels and each backend's mIoU against the masks.

    python benchmarks/bench_crf.py --backend both --images 3 --agreement            # all presets
    python benchmarks/bench_crf.py --backend both --images 3 --agreement --write   # the "Dense CRF: torch backend" section
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
from wsss.postprocess.crf import CRFPool, has_pydensecrf, refine, resolve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RSSPeak, machine, table, write_section  # noqa: E402

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


def _channels(probs: np.ndarray, mask: np.ndarray, channels: str) -> np.ndarray:
    return probs[present_classes(mask)] if channels == "present" else probs


def time_backend(samples: list, backend: str, cfg: CRFConfig, channels: str, threads: int,
                 device: str = "cpu") -> dict:
    """Median / min ms per image of `refine` with `backend` on `samples` (CUDA: one warm-up call first), and the
    peak memory one call adds (CPU: RSS sampled by a thread; CUDA: max_memory_allocated)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = replace(cfg, backend=backend)
        dev = None if device == "cpu" else device
        if device != "cpu":  # CUDA context and kernels: not the image's cost
            image, mask, probs = samples[0]
            refine(image, _channels(probs, mask, channels), cfg, dev)
        times, peak = [], 0.0
        for image, mask, probs in samples:
            p = _channels(probs, mask, channels)
            if device != "cpu":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                refine(image, p, cfg, dev)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                peak = max(peak, torch.cuda.max_memory_allocated() / 2**20)
            else:
                with RSSPeak(0.005) as rss:
                    t0 = time.perf_counter()
                    refine(image, p, cfg, dev)
                    times.append(time.perf_counter() - t0)
                peak = max(peak, rss.main_mb - rss.start_mb)
        return {"ms": 1000 * float(np.median(times)), "min_ms": 1000 * min(times), "peak_mb": peak,
                "k": int(p.shape[0])}
    finally:
        torch.set_num_threads(old)


def split_throughput(samples: list, backend: str, cfg: CRFConfig, channels: str, workers: int) -> float:
    """Images per second of CRF over the samples with `workers` worker processes (CRFPool, one thread
    each), pool start-up excluded."""
    cfg = replace(cfg, backend=backend)
    with CRFPool(workers=workers) as pool:
        first = samples[0]
        list(pool.map([(0, first[0], _channels(first[2], first[1], channels))], cfg))  # start the workers
        t0 = time.perf_counter()
        n = sum(1 for _ in pool.map(((i, im, _channels(pr, m, channels)) for i, (im, m, pr) in enumerate(samples)), cfg))
        return n / (time.perf_counter() - t0)


def agreement(samples: list, cfg: CRFConfig, channels: str, num_classes: int) -> dict:
    """Both backends on every sample: share of pixels with the same label, each one's mIoU vs the masks."""
    same = total = 0
    conf = {b: np.zeros((num_classes, num_classes), np.int64) for b in ("pydensecrf", "torch")}
    for image, mask, probs in samples:
        keep = present_classes(mask) if channels == "present" else np.arange(num_classes)
        out = {b: keep[refine(image, probs[keep], replace(cfg, backend=b))] for b in conf}
        same += int((out["pydensecrf"] == out["torch"]).sum())
        total += mask.size
        for b in conf:
            conf[b] += confusion(out[b].astype(np.int64), mask.astype(np.int64), num_classes)
    return {"agree": same / total, "miou": {b: miou(c) for b, c in conf.items()}}


def run_backends(images: int, seed: int, presets: list[str], backends: list[str], channel_sets: list[str],
                 threads: list[int], workers: int, do_agreement: bool) -> dict:
    import torch

    rows, agree_rows = [], []
    cuda = torch.cuda.is_available()
    for chans in channel_sets:
        nc = 81 if chans == "81" else 21
        rng = np.random.default_rng(seed)
        samples = [make_sample(rng, nc) for _ in range(images)]
        which = "present" if chans == "present" else "all"
        cfg = resolve(CRFConfig(preset=presets[0]))
        for backend in backends:
            row = {"channels": chans, "backend": backend, "preset": presets[0]}
            for t in threads:
                row[f"cpu_{t}"] = time_backend(samples, backend, cfg, which, t)
            if workers > 0:
                row["img_s"] = split_throughput(samples, backend, cfg, which, workers)
            if cuda and backend == "torch":
                row["cuda"] = time_backend(samples, backend, cfg, which, 1, "cuda")
            rows.append(row)
            print(row, flush=True)
        if do_agreement:
            for preset in presets:
                a = agreement(samples, resolve(CRFConfig(preset=preset)), which, nc)
                agree_rows.append({"channels": chans, "preset": preset, **a})
                print(agree_rows[-1], flush=True)
    return {"rows": rows, "agreement": agree_rows, "threads": threads, "workers": workers, "images": images,
            "cuda": cuda}


def backends_markdown(res: dict, command: str) -> str:
    label = {"present": "present (bg + tags)", "21": "21 (all VOC)", "81": "81 (all COCO)"}
    heads = ["channels", "backend"] + [f"ms / image, {t} thread{'s' if t > 1 else ''} (median; min)"
                                       for t in res["threads"]]
    heads += ["peak MB / image", f"images / s, {res['workers']} workers"] + (["CUDA ms (peak MB)"] if res["cuda"] else [])
    body = []
    for r in res["rows"]:
        k = r[f"cpu_{res['threads'][0]}"]["k"]
        line = [f"{label[r['channels']]}, K={k}" if r["channels"] == "present" else label[r["channels"]], r["backend"]]
        line += [f"{r[f'cpu_{t}']['ms']:.0f} ({r[f'cpu_{t}']['min_ms']:.0f})" for t in res["threads"]]
        line += [f"{max(r[f'cpu_{t}']['peak_mb'] for t in res['threads']):.0f}", f"{r.get('img_s', 0):.2f}"]
        if res["cuda"]:
            line.append(f"{r['cuda']['ms']:.1f} ({r['cuda']['peak_mb']:.0f})" if "cuda" in r else "")
        body.append(line)
    text = (f"Command: `{command}`  \nMachine: {machine()}.  \n{res['images']} synthetic 500x375 images "
            f"(`make_sample`), preset `{res['rows'][0]['preset']}` (10 iterations).\n\n" + table(heads, body) + "\n")
    if not res["cuda"]:
        text += ("\nNo CUDA device here; on a GPU machine the same command adds the CUDA column "
                 "(`python benchmarks/bench_crf.py --backend torch --images 10`).\n")
    if res["agreement"]:
        body = [[label[a["channels"]], a["preset"], f"{100 * a['agree']:.2f}",
                 f"{100 * a['miou']['pydensecrf']:.2f}", f"{100 * a['miou']['torch']:.2f}",
                 f"{100 * (a['miou']['torch'] - a['miou']['pydensecrf']):+.2f}"] for a in res["agreement"]]
        text += ("\nAgreement, the same images: share of pixels with the same label, and mIoU against the exact "
                 "masks:\n\n" + table(["channels", "preset", "same label %", "pydensecrf mIoU %", "torch mIoU %",
                                         "delta (points)"], body) + "\n")
    return text


def main(argv: list[str] | None = None) -> list[dict] | dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="vit_pcm", help="vit_pcm | toco")
    ap.add_argument("--num-classes", type=int, default=21, help="label count (21: VOC, 81: COCO)")
    ap.add_argument("--sweep-iterations", default="", help="comma-separated mean-field iteration counts to compare")
    ap.add_argument("--write", action="store_true", help="run 21 and 81 classes and update RESULTS.md")
    ap.add_argument("--backend", choices=["torch", "pydensecrf", "both"], default=None,
                    help="time the backends (1 and all threads, present / 21 / 81 channels) instead")
    ap.add_argument("--channels", default="present,21,81", help="with --backend: present, 21, 81")
    ap.add_argument("--threads", default="", help="with --backend: thread counts (default: 1 and all)")
    ap.add_argument("--workers", type=int, default=-1, help="with --backend: CRF workers for images/s (-1: all cores, 0: skip)")
    ap.add_argument("--agreement", action="store_true", help="with --backend both: labels of both, every preset")
    args = ap.parse_args(argv)
    command = "python benchmarks/bench_crf.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.backend:
        import torch

        from wsss.postprocess.crf import default_workers

        backends = ["pydensecrf", "torch"] if args.backend == "both" else [args.backend]
        if "pydensecrf" in backends and not has_pydensecrf():
            ap.error("pydensecrf2 is not installed (pip install 'wsss[crf-native]')")
        threads = [int(t) for t in args.threads.split(",") if t] or sorted({1, torch.get_num_threads()})
        presets = ["vit_pcm", "psa", "toco"] if args.agreement else [args.preset]
        if args.agreement and args.preset in presets:
            presets = [args.preset] + [p for p in presets if p != args.preset]
        res = run_backends(args.images, args.seed, presets, backends, args.channels.split(","), threads,
                           default_workers() if args.workers < 0 else args.workers,
                           args.agreement and len(backends) == 2)
        res["markdown"] = backends_markdown(res, command.strip())
        print(res["markdown"])
        if args.write:
            write_section("crf_torch", "Dense CRF: torch backend", res["markdown"])
        return res
    counts = [21, 81] if args.write else [args.num_classes]
    sweep = [int(n) for n in args.sweep_iterations.split(",") if n] or ([1, 2, 3, 5, 10] if args.write else [])
    results = [run(args.images, args.seed, args.preset, n) for n in counts]
    text = markdown(results, command.strip())
    if sweep:
        text += sweep_markdown(iteration_sweep(args.images, args.seed, args.preset, counts[0], sweep), counts[0])
    print(text)
    if args.write:
        write_section("crf", "Dense CRF: present classes vs all classes", text)
    return results


if __name__ == "__main__":
    main()
