"""Dense CRF: it sharpens blurred, shifted probabilities to the image's edges; restricting to the present
classes changes nothing on an image that only has those; presets; the worker pool."""

import numpy as np
import pytest

from wsss.config import ConfigError, CRFConfig
from wsss.postprocess.crf import PRESETS, CRFPool, has_pydensecrf, refine, resolve

native = pytest.mark.skipif(not has_pydensecrf(), reason="pydensecrf2 not installed (wsss[crf-native])")
BACKENDS = [pytest.param("pydensecrf", marks=native), "torch"]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _toy(h=64, w=80, shift=6, seed=0):
    """Two flat colour regions (a square on a background) and a blurred, shifted soft map of them."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((h, w), bool)
    truth[16:48, 20:56] = True
    image = np.where(truth[..., None], [200, 40, 40], [30, 90, 200]).astype(np.float32)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    # the classifier's view: the square shifted right and blurred with a box filter
    soft = np.roll(truth, shift, axis=1).astype(np.float32)
    k = 9
    pad = np.pad(soft, k // 2, mode="edge")
    soft = np.mean([pad[i : i + h, j : j + w] for i in range(k) for j in range(k)], axis=0)
    fg = np.clip(0.1 + 0.8 * soft, 0, 1)
    return image, truth, np.stack([1 - fg, fg]).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", ["psa", "vit_pcm", "toco"])
def test_crf_improves_iou(preset, backend):
    image, truth, probs = _toy()
    before = _iou(probs.argmax(0) == 1, truth)
    labels = refine(image, probs, CRFConfig(preset=preset, backend=backend))
    assert labels.shape == truth.shape and labels.dtype == np.uint8
    after = _iou(labels == 1, truth)
    assert after > before + 0.03, (before, after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_restricted_equals_all_classes_on_two_class_image(backend):
    image, _, probs = _toy()
    k = 21
    cfg = CRFConfig(backend=backend)
    full = np.full((k, *probs.shape[1:]), 1e-6, np.float32)
    full[0], full[7] = probs[0], probs[1]  # class 7 is the object; the other 19 classes are absent
    restricted = np.array([0, 7])[refine(image, probs, cfg)]
    assert np.array_equal(restricted, refine(image, full, cfg))


def test_presets_and_custom():
    assert resolve(CRFConfig(preset="toco")).bilateral_sxy == PRESETS["toco"]["bilateral_sxy"]
    assert resolve(CRFConfig(preset="psa")).bilateral_srgb == 13
    v = resolve(CRFConfig(preset="vit_pcm"))  # ViT-PCM's own inference
    assert (v.iterations, v.gaussian_sxy, v.gaussian_compat) == (10, 1, 3)
    assert (v.bilateral_sxy, v.bilateral_srgb, v.bilateral_compat) == (67, 3, 4)
    custom = CRFConfig(preset="custom", bilateral_sxy=5.0)
    assert resolve(custom) is custom
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve(CRFConfig(preset="nope"))
    image, _, probs = _toy()
    for backend in ("torch", *(("pydensecrf",) if has_pydensecrf() else ())):
        cfg = CRFConfig(backend=backend)
        assert not refine(image, probs[:1], cfg).any()  # one class: nothing to decide
        with pytest.raises(ValueError, match="does not match"):
            refine(image[:10], probs, cfg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pool_matches_inline(backend):
    cfg = CRFConfig(backend=backend)
    items = [_toy(seed=s, shift=s) for s in range(3)]
    inline = {i: refine(img, p, cfg) for i, (img, _, p) in enumerate(items)}
    with CRFPool(workers=1, max_in_flight=2) as pool:
        got = dict(pool.map(((i, img, p) for i, (img, _, p) in enumerate(items)), cfg))
    assert got.keys() == inline.keys()
    assert all(np.array_equal(got[i], inline[i]) for i in inline)
