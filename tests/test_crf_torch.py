"""The torch dense CRF (`wsss.postprocess.crf_torch`): its permutohedral lattice against exact O(N^2)
Gaussian filtering, its labels against pydensecrf's, backend selection, batching, CUDA."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from wsss.config import ConfigError, CRFConfig
from wsss.postprocess import crf as crf_mod
from wsss.postprocess.crf import PRESETS, choose_backend, has_pydensecrf, refine, resolve
from wsss.postprocess.crf_torch import (
    Lattice,
    bilateral_features,
    mean_field,
    position_features,
    refine_batch,
)


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(gaussian_filter(rng.random((h, w, 3)) * 255, (2, 2, 0)), 0, 255).astype(np.uint8)


def _probs(k, h, w, seed=0):
    rng = np.random.default_rng(seed)
    p = gaussian_filter(rng.random((k, h, w)), (0, 4, 4)).astype(np.float32) ** 4
    return p / p.sum(0, keepdims=True)


def _exact(features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_j exp(-|f_i - f_j|^2 / 2) v_j, in float64, O(N^2)."""
    f = features.double()
    return torch.exp(-0.5 * torch.cdist(f, f) ** 2) @ values.double()


@pytest.mark.parametrize(
    "name, max_rel",
    [("gaussian", 0.02), ("bilateral", 0.04)],
)
def test_lattice_approximates_exact_filter(name, max_rel):
    """The normalised filter L(v) / L(1) (what the CRF's normalisation leaves of the kernel's scale) is
    within a few % of the exact Gaussian's; the raw scale is the lattice's own (pydensecrf's too)."""
    h, w = 24, 32
    if name == "gaussian":
        f = position_features(1, h, w, 3.0, "cpu")
    else:
        f = bilateral_features(torch.from_numpy(_image(h, w))[None], 5.0, 10.0)
    v = torch.rand(h * w, 4, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(h * w, 1)
    lat = Lattice(f)
    approx = lat.filter(v[None])[0].double() / lat.filter(ones[None])[0].double()
    exact = _exact(f[0], v) / _exact(f[0], ones)
    rel = float((approx - exact).norm() / exact.norm())
    assert rel < max_rel, rel
    scale = float(lat.filter(ones[None]).sum() / _exact(f[0], ones).sum())
    assert 0.3 < scale < 1.2, scale


def test_lattice_images_in_a_batch_do_not_interact():
    h, w = 12, 16
    imgs = torch.from_numpy(np.stack([_image(h, w, 0), _image(h, w, 1)]))
    f = bilateral_features(imgs, 4.0, 8.0)
    v = torch.rand(2, h * w, 3, generator=torch.Generator().manual_seed(1))
    both = Lattice(f).filter(v)
    for b in range(2):
        alone = Lattice(f[b : b + 1]).filter(v[b : b + 1])[0]
        assert torch.allclose(both[b], alone, atol=1e-5)


@pytest.mark.skipif(not has_pydensecrf(), reason="pydensecrf2 not installed (wsss[crf-native])")
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("k", [2, 5])
def test_matches_pydensecrf(preset, k):
    """Same labels as pydensecrf on small images (and Q to float noise: the same lattice construction)."""
    import pydensecrf.densecrf as dcrf

    h, w = 48, 64
    image, probs = _image(h, w, k), _probs(k, h, w, k)
    torch_labels = refine(image, probs, CRFConfig(preset=preset, backend="torch"))
    native_labels = refine(image, probs, CRFConfig(preset=preset, backend="pydensecrf"))
    assert (torch_labels == native_labels).mean() >= 0.999
    cfg = resolve(CRFConfig(preset=preset))
    unary = -np.log(np.clip(probs, 1e-8, None)).reshape(k, -1)
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(np.ascontiguousarray(unary))
    d.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    d.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb, rgbim=image, compat=cfg.bilateral_compat)
    q_native = np.asarray(d.inference(cfg.iterations)).reshape(k, h, w)
    q_torch = mean_field(torch.from_numpy(image)[None], torch.from_numpy(unary.reshape(1, k, h, w)), cfg.iterations,
                         cfg.gaussian_sxy, cfg.gaussian_compat, cfg.bilateral_sxy, cfg.bilateral_srgb,
                         cfg.bilateral_compat)[0].numpy()
    assert np.abs(q_native - q_torch).max() < 1e-3


def test_batch_equals_single():
    h, w, k = 20, 28, 3
    images = np.stack([_image(h, w, s) for s in range(3)])
    probs = np.stack([_probs(k, h, w, s) for s in range(3)])
    cfg = resolve(CRFConfig(preset="psa", backend="torch"))
    batch = refine_batch(torch.from_numpy(images), torch.from_numpy(probs), cfg).numpy()
    for b in range(3):
        assert np.array_equal(batch[b], refine(images[b], probs[b], cfg))


def test_backend_selection(monkeypatch):
    with pytest.raises(ConfigError, match="unknown backend"):
        resolve(CRFConfig(backend="cuda"))
    with pytest.raises(ConfigError, match="unknown backend"):
        refine(_image(8, 8), _probs(2, 8, 8), CRFConfig(backend="nope"))
    assert choose_backend(CRFConfig(backend="torch")) == "torch"
    assert choose_backend(CRFConfig(backend="auto"), "cuda") == "torch"
    with pytest.raises(ConfigError, match="CPU only"):
        choose_backend(CRFConfig(backend="pydensecrf"), "cuda:0")
    expected = "pydensecrf" if has_pydensecrf() else "torch"
    assert choose_backend(CRFConfig(backend="auto")) == expected
    assert choose_backend(CRFConfig(backend="auto"), "cpu") == expected
    monkeypatch.setattr(crf_mod, "has_pydensecrf", lambda: False)  # as where pydensecrf2 is absent
    assert choose_backend(CRFConfig(backend="auto")) == "torch"
    with pytest.raises(ConfigError, match="not installed"):
        choose_backend(CRFConfig(backend="pydensecrf"))
    image, probs = _image(16, 20), _probs(2, 16, 20)
    assert refine(image, probs, CRFConfig()).shape == (16, 20)  # auto falls back to torch


def test_accepts_tensors():
    image, probs = _image(16, 20), _probs(3, 16, 20)
    cfg = CRFConfig(backend="torch")
    assert np.array_equal(refine(torch.from_numpy(image), torch.from_numpy(probs), cfg), refine(image, probs, cfg))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    h, w, k = 60, 80, 4
    image, probs = _image(h, w), _probs(k, h, w)
    cfg = CRFConfig(preset="vit_pcm", backend="auto")
    on_gpu = refine(image, probs, cfg, device="cuda")
    on_cpu = refine(image, probs, CRFConfig(preset="vit_pcm", backend="torch"))
    assert (on_gpu == on_cpu).mean() >= 0.999


def test_sparse_filter_equals_vertex_by_vertex_reference():
    """The CSR splat / blur / slice matrices compute what the index_add_ + gather formulation does."""
    h, w = 20, 24
    f = bilateral_features(torch.from_numpy(np.stack([_image(h, w, 0), _image(h, w, 1)])), 4.0, 8.0)
    v = torch.rand(2, h * w, 5, generator=torch.Generator().manual_seed(2))
    lat = Lattice(f)
    ref = lat.filter_reference(v)
    assert torch.allclose(lat.filter(v), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_bench_crf_backend_mode_tiny(monkeypatch):
    """`benchmarks/bench_crf.py --backend` on one small image: both backends where pydensecrf is there
    (and their agreement), torch alone otherwise; rows with ms, peak memory and the markdown table."""
    import importlib
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    sys.modules.pop("bench_crf", None)
    bench_crf = importlib.import_module("bench_crf")
    monkeypatch.setattr(bench_crf, "H", 60)
    monkeypatch.setattr(bench_crf, "W", 80)
    backend = "both" if has_pydensecrf() else "torch"
    res = bench_crf.main(["--backend", backend, "--images", "1", "--channels", "present,21", "--threads", "1",
                          "--workers", "0", *(["--agreement"] if backend == "both" else [])])
    assert [(r["channels"], r["backend"]) for r in res["rows"]][:2] in (
        [("present", "pydensecrf"), ("present", "torch")], [("present", "torch"), ("21", "torch")])
    assert all(r["cpu_1"]["ms"] > 0 and r["cpu_1"]["peak_mb"] >= 0 for r in res["rows"])
    assert "ms / image, 1 thread" in res["markdown"]
    if backend == "both":
        assert len(res["agreement"]) == 6 and all(a["agree"] >= 0.99 for a in res["agreement"])
