"""Dense CRF (Kraehenbuehl & Koltun 2011) over the classes present in an image.

Two backends of the same model (`infer.crf.backend`): `pydensecrf` (pydensecrf2, C++, CPU, needs a
compiler to install: `wsss[crf-native]`) and `torch` (`crf_torch.py`, built in, CPU or CUDA, agrees with
pydensecrf to float noise); `auto` takes pydensecrf when it is importable and the device is the CPU.

`refine(image, probs, cfg)` takes the probabilities of only the K channels the caller keeps (background +
the image's classes): the mean-field cost is linear in K, so 2-3 channels instead of 21 (VOC) or 81 (COCO)
is what makes CRF on a whole split affordable, and absent classes cannot appear in the output.

Presets (the parameters the papers' public code passes to pydensecrf):
- `psa`: PSA's `crf_inference` (Ahn & Kwak 2018), which many CAM papers reuse:
  gaussian sxy=3 compat=3, bilateral sxy=80 srgb=13 compat=10, 10 mean-field iterations.
- `vit_pcm`: ViT-PCM's own inference (Rossetti et al. 2022): 10 iterations, gaussian sxy=1 compat=3,
  bilateral sxy=67 srgb=3 compat=4.
- `toco`: ToCo (Ru et al. 2023): rulixiang/ToCo `tools/infer_seg_voc.py` `crf_proc` (checked
  2026-12-03 at commit 6d47d97) builds its `DenseCRF` with iter_max=10, pos_xy_std=1, pos_w=1,
  bi_xy_std=121, bi_rgb_std=5, bi_w=4 (gaussian sxy / compat, bilateral sxy / srgb / compat). Its
  wrapper (`utils/dcrf.py`, deeplab-pytorch's) is not in the stored copy; the mapping assumes it passes
  those six values straight to pydensecrf, as deeplab-pytorch's does.
- `irn_label`: IRN's `crf_inference_label` (Ahn et al. 2019, jiwoon-ahn/irn `misc/imutils.py`), the CRF
  it runs on a hard labelling: gaussian sxy=3 compat=3, bilateral sxy=50 srgb=5 compat=10, 10 iterations;
  with `label_scores` (confidence 0.7) as the unary.
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
    "psa": dict(
        iterations=10, gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80, bilateral_srgb=13, bilateral_compat=10
    ),
    "vit_pcm": dict(
        iterations=10, gaussian_sxy=1, gaussian_compat=3, bilateral_sxy=67, bilateral_srgb=3, bilateral_compat=4
    ),
    "irn_label": dict(
        iterations=10, gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=50, bilateral_srgb=5, bilateral_compat=10
    ),
    "toco": dict(
        iterations=10, gaussian_sxy=1, gaussian_compat=1, bilateral_sxy=121, bilateral_srgb=5, bilateral_compat=4
    ),
}
EPS = 1e-8
BACKENDS = ("auto", "torch", "pydensecrf")


def check_label_confidence(confidence: float, key: str = "label confidence") -> None:
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"{key} must be within (0, 1), got {confidence}")


def label_scores(labels: np.ndarray, k: int, confidence: float = 0.7) -> np.ndarray:
    """Scores float32 [K, H, W] of a hard labelling (indices int [H, W] into K channels) for `refine`:
    `confidence` on each pixel's label, the rest shared by the other K - 1 channels. This is
    pydensecrf.utils.unary_from_labels(zero_unsure=False), IRN's unary for a labelling; written here so the
    torch backend takes it too."""
    check_label_confidence(confidence)
    labels = np.asarray(labels)
    if k < 2:
        return np.ones((1, *labels.shape), np.float32)
    out = np.full((k, *labels.shape), (1.0 - confidence) / (k - 1), np.float32)
    np.put_along_axis(out, labels[None].astype(np.int64), np.float32(confidence), 0)
    return out


def has_pydensecrf() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(cfg: CRFConfig, device: Any = None) -> str:
    """`torch` or `pydensecrf` for this config and device (None: the CPU); ConfigError on a bad value or
    when pydensecrf is asked for but not installed."""
    backend = getattr(cfg, "backend", "auto")
    if backend not in BACKENDS:
        raise ConfigError(f"infer.crf.backend: unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    on_cpu = device is None or str(device).split(":")[0] == "cpu"
    if backend == "auto":
        return "pydensecrf" if on_cpu and has_pydensecrf() else "torch"
    if backend == "pydensecrf":
        if not on_cpu:
            raise ConfigError(f"infer.crf.backend: pydensecrf runs on the CPU only, not {device}; use torch or auto")
        if not has_pydensecrf():
            raise ConfigError("infer.crf.backend: pydensecrf is not installed (pip install 'wsss[crf-native]', "
                              "needs a C++ compiler), or use backend torch / auto")
    return backend


def resolve(cfg: CRFConfig) -> CRFConfig:
    """The config with the preset's values filled in (`custom`: unchanged); the backend is validated."""
    if getattr(cfg, "backend", "auto") not in BACKENDS:
        choose_backend(cfg)  # raises the ConfigError
    if cfg.preset == "custom":
        return cfg
    if cfg.preset not in PRESETS:
        raise ConfigError(f"infer.crf.preset: unknown preset {cfg.preset!r} (known: {', '.join(PRESETS)}, custom)")
    p = PRESETS[cfg.preset]
    return replace(cfg, **{k: (int(v) if k == "iterations" else float(v)) for k, v in p.items()})


def refine(image: np.ndarray, probs: np.ndarray, cfg: CRFConfig | None = None, device: Any = None) -> np.ndarray:
    """Dense-CRF labels for one image, by the backend `cfg.backend` picks (see `choose_backend`).

    image: uint8 [H, W, 3] RGB; probs: float [K, H, W] scores of the K kept classes (they need not sum
    to 1: the unary is -log p, and a per-pixel constant cancels in the mean-field softmax); a torch
    tensor is accepted too. device: where the torch backend runs (None: the CPU).
    Returns indices into the K channels, uint8 [H, W] (int64 when K > 256)."""
    cfg = resolve(cfg or CRFConfig())
    backend = choose_backend(cfg, device)
    if backend == "torch":
        return _refine_torch(image, probs, cfg, device)
    import pydensecrf.densecrf as dcrf  # optional dependency (wsss[crf-native]); imported where used

    probs = probs.detach().cpu().numpy() if hasattr(probs, "detach") else probs
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


def _refine_torch(image: Any, probs: Any, cfg: CRFConfig, device: Any) -> np.ndarray:
    from wsss.postprocess.crf_torch import refine_torch

    if probs.ndim != 3:
        raise ValueError(f"probs must be [K, H, W], got shape {tuple(probs.shape)}")
    k, h, w = probs.shape
    if tuple(image.shape) != (h, w, 3):
        raise ValueError(f"image shape {tuple(image.shape)} does not match probs {tuple(probs.shape)} "
                         f"(expected [{h}, {w}, 3])")
    dtype = np.uint8 if k <= 256 else np.int64
    if k == 1:
        return np.zeros((h, w), dtype)
    return refine_torch(image, probs, cfg, device).astype(dtype)


def default_workers() -> int:
    """The cores this process may use (affinity-aware), at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _worker_init() -> None:
    """One thread per worker: the torch backend must not run `workers` x cores threads."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


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
            concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                                   initializer=_worker_init)
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
