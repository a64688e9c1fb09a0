"""Dense CRF (Kraehenbuehl & Koltun 2011, through pydensecrf2) over the classes present in an image.

`refine(image, probs, cfg)` takes the probabilities of only the K channels the caller keeps (background +
the image's classes): the mean-field cost is linear in K, so 2-3 channels instead of 21 (VOC) or 81 (COCO)
is what makes CRF on a whole split affordable, and absent classes cannot appear in the output.

Presets (the parameters the papers' public code passes to pydensecrf):
- `vit_pcm`: PSA's `crf_inference` (Ahn & Kwak 2018), which ViT-PCM and most CAM papers reuse:
  gaussian sxy=3 compat=3, bilateral sxy=80 srgb=13 compat=10, 10 mean-field iterations.
- `toco`: ToCo (Ru et al. 2023, rulixiang/ToCo `tools/infer_seg_voc.py`, the same as their AFA): DeepLab's
  `DenseCRF` wrapper with iter_max=10, pos_xy_std=1, pos_w=1, bi_xy_std=121, bi_rgb_std=5, bi_w=4.
  (Written from our knowledge of that code; no copy of it was available offline to re-check.)
- `custom`: the values in `CRFConfig` as given.

`refine` is a top-level function of numpy arrays and a dataclass, so it pickles into worker processes;
`CRFPool` runs it over many images with a bounded number in flight.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from wsss.config import CRFConfig
from wsss.errors import ConfigError

PRESETS: dict[str, dict[str, float]] = {
    "vit_pcm": dict(
        iterations=10, gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80, bilateral_srgb=13, bilateral_compat=10
    ),
    "toco": dict(
        iterations=10, gaussian_sxy=1, gaussian_compat=1, bilateral_sxy=121, bilateral_srgb=5, bilateral_compat=4
    ),
}
EPS = 1e-8


def resolve(cfg: CRFConfig) -> CRFConfig:
    """The config with the preset's values filled in (`custom`: unchanged)."""
    if cfg.preset == "custom":
        return cfg
    if cfg.preset not in PRESETS:
        raise ConfigError(f"infer.crf.preset: unknown preset {cfg.preset!r} (known: {', '.join(PRESETS)}, custom)")
    p = PRESETS[cfg.preset]
    return replace(cfg, **{k: (int(v) if k == "iterations" else float(v)) for k, v in p.items()})


def refine(image: np.ndarray, probs: np.ndarray, cfg: CRFConfig | None = None) -> np.ndarray:
    """Dense-CRF labels for one image.

    image: uint8 [H, W, 3] RGB; probs: float [K, H, W] scores of the K kept classes (they need not sum
    to 1: the unary is -log p, and a per-pixel constant cancels in the mean-field softmax).
    Returns indices into the K channels, uint8 [H, W] (int64 when K > 256)."""
    import pydensecrf.densecrf as dcrf  # optional dependency (wsss[crf]); imported where used

    cfg = resolve(cfg or CRFConfig())
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3:
        raise ValueError(f"probs must be [K, H, W], got shape {probs.shape}")
    k, h, w = probs.shape
    if image.shape != (h, w, 3):
        raise ValueError(f"image shape {image.shape} does not match probs {probs.shape} (expected [{h}, {w}, 3])")
    dtype = np.uint8 if k <= 256 else np.int64
    if k == 1:
        return np.zeros((h, w), dtype)
    crf = dcrf.DenseCRF2D(w, h, k)
    unary = -np.log(np.clip(probs, EPS, None)).reshape(k, -1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=cfg.bilateral_sxy,
        srgb=cfg.bilateral_srgb,
        rgbim=np.ascontiguousarray(image, dtype=np.uint8),
        compat=cfg.bilateral_compat,
    )
    q = np.asarray(crf.inference(int(cfg.iterations)), dtype=np.float32)
    return q.argmax(0).reshape(h, w).astype(dtype)


def default_workers() -> int:
    """The cores this process may use (affinity-aware), at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _refine_keyed(key: Any, image: np.ndarray, probs: np.ndarray, cfg: CRFConfig) -> tuple[Any, np.ndarray]:
    return key, refine(image, probs, cfg)


class CRFPool:
    """`refine` over many images in worker processes, at most `max_in_flight` submitted at once (so a
    long split streams in bounded memory).

        with CRFPool(workers=4) as pool:
            for key, labels in pool.map(((id, rgb, probs) for ...), cfg):
                ...

    workers: -1 = `default_workers()`, 0 = run in this process (no pool). Workers are spawned, not forked:
    they must not inherit the parent's torch thread pools. Results come back in completion order.
    """

    def __init__(self, workers: int = -1, max_in_flight: int | None = None):
        self.workers = default_workers() if workers < 0 else workers
        self.max_in_flight = max_in_flight or 2 * max(self.workers, 1)
        self._pool = (
            concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
            if self.workers > 0
            else None
        )

    def map(self, items: Iterable[tuple[Any, np.ndarray, np.ndarray]], cfg: CRFConfig) -> Iterator[tuple[Any, np.ndarray]]:
        cfg = resolve(cfg)
        if self._pool is None:
            for key, image, probs in items:
                yield key, refine(image, probs, cfg)
            return
        pending: set[concurrent.futures.Future] = set()
        for key, image, probs in items:
            if len(pending) >= self.max_in_flight:  # wait for a slot
                concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            done = {f for f in pending if f.done()}  # hand back whatever finished, without waiting
            pending -= done
            for f in done:
                yield f.result()
            pending.add(self._pool.submit(_refine_keyed, key, image, probs, cfg))
        for f in concurrent.futures.as_completed(pending):
            yield f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
