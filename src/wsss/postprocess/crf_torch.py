"""Dense CRF (Kraehenbuehl & Koltun 2011) in PyTorch: the model of pydensecrf's `DenseCRF2D` as `wsss` uses it.

Why it is written here: the only implementation the WSSS papers' code calls is pydensecrf (the C++ of the
original authors behind a Cython wrapper). Its maintained fork on PyPI, pydensecrf2, ships no wheels for
every platform and Python and so needs a C++ compiler to install, and it runs on the CPU only; no
maintained, pip-installable package offers the permutohedral-lattice dense CRF on tensors (CPU and GPU).
So `wsss[crf]` needs no compiler, this module implements the same model with torch only.

The model (the one `refine` in `crf.py` builds with pydensecrf's defaults, DIAG_KERNEL and
NORMALIZE_SYMMETRIC):

- unary U = -log p, Q0 = softmax(-U) over the K labels;
- two Potts pairwise terms with weights w: a Gaussian on position, features (x/sxy, y/sxy), and a
  bilateral one on position and colour, (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb);
- each filter is a permutohedral-lattice Gaussian (Adams et al. 2010) applied symmetrically normalised:
  k(Q) = n * L(n * Q) with n = 1 / sqrt(L(1)), L the lattice filter (self included, as in pydensecrf);
- mean field: Q <- softmax(-U + sum_terms w * k(Q)) for `iterations` steps (Potts with compatibility
  -w I, as pydensecrf's PottsCompatibility).

The lattice follows the same construction as pydensecrf's (elevation onto the hyperplane with the same
scale factors, the enclosing simplex by rounding and ranking, barycentric weights, a [1/2, 1, 1/2] blur
along each of the d+1 lattice directions, the same final scaling constant), so labels agree with
pydensecrf's to floating-point noise, not merely to "both approximate a Gaussian"; tests measure it
against exact O(N^2) filtering and against pydensecrf. Vectorised: lattice keys are packed into one
int64 code each (the packing is linear, so a neighbour's code is the key's code plus a constant),
deduplicated with `torch.unique`, neighbours found with `torch.searchsorted`; splat, blur and slice are
sparse CSR matrices built once per image (and reused by every mean-field iteration), applied to all
channels at once by sparse-dense matmuls.
Device-agnostic: the same code runs on CPU and CUDA; several images of one size go through as a batch.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

EPS = 1e-8


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's round(): halves away from zero (torch.round rounds halves to even)."""
    return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5))


class Lattice:
    """A permutohedral lattice over features [B, N, d] (B images of N points each; points of different
    images never interact). `filter(values [B, N, C]) -> [B, N, C]` approximates
    out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j over the points j of the same image (including i)."""

    def __init__(self, features: torch.Tensor):
        if features.ndim != 3:
            raise ValueError(f"features must be [B, N, d], got {tuple(features.shape)}")
        b, n, d = features.shape
        dev = features.device
        f = features.to(torch.float32).reshape(b * n, d)
        self.b, self.n, self.d = b, n, d
        d1 = d + 1
        # elevate onto the hyperplane sum = 0 of R^{d+1} (Adams et al. p.5), pydensecrf's scale factors
        inv_std = np.float32(math.sqrt(2.0 / 3.0) * d1)
        scale = torch.tensor([np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std) for i in range(d)],
                             dtype=torch.float32, device=dev)
        cf = f * scale  # [P, d]
        # sm_j = sum_{k >= j} cf_k; elevated[j] = sm_{j} - j * cf_{j-1} (j = 1..d), elevated[0] = sm_0
        tail = torch.flip(torch.cumsum(torch.flip(cf, [1]), 1), [1])  # tail[:, j] = sum_{k >= j} cf_k
        after = torch.cat([tail[:, 1:], torch.zeros_like(tail[:, :1])], 1)  # sum_{k > j-1}, for j = 1..d
        js = torch.arange(1, d1, device=dev, dtype=torch.float32)
        elevated = torch.cat([tail[:, :1], after - js * cf], 1)  # [P, d+1]
        # the nearest 0-coloured lattice point, then the simplex by ranking the differences
        down = np.float32(1.0 / d1)
        rd = _round_half_away(elevated * down)
        rem0 = rd * d1
        total = rd.sum(1, keepdim=True).to(torch.int64)
        diff = elevated - rem0
        di, dj = diff[:, :, None], diff[:, None, :]
        idx = torch.arange(d1, device=dev)
        upper = idx[None, :] > idx[:, None]  # [i, j]: j > i
        lower = idx[None, :] < idx[:, None]  # j < i
        # pydensecrf's pairwise ranking: rank[i] = #{j > i: d_j > d_i} + #{j < i: d_j >= d_i} (0 = largest)
        rank = ((dj > di) & upper).sum(2) + ((dj >= di) & lower).sum(2)
        rank = rank + total
        low, high = rank < 0, rank > d
        rank = torch.where(low, rank + d1, torch.where(high, rank - d1, rank))
        rem0 = torch.where(low, rem0 + d1, torch.where(high, rem0 - d1, rem0))
        # barycentric coordinates (p.10)
        v = (elevated - rem0) * down
        bary = torch.zeros(b * n, d + 2, device=dev, dtype=torch.float32)
        bary.scatter_add_(1, d - rank, v)
        bary.scatter_add_(1, d - rank + 1, -v)
        bary[:, 0] += 1.0 + bary[:, d1]
        self.weights = bary[:, :d1].contiguous()  # [P, d+1]
        # the d+1 vertices: key_r[i] = rem0[i] + canonical[r][rank[i]], i < d
        r = torch.arange(d1, device=dev)[None, :, None]  # [1, R, 1]
        rk = rank[:, None, :d]  # [P, 1, d]
        canon = torch.where(rk <= d - r, r, r - d1)
        keys = rem0[:, None, :d].to(torch.int64) + canon  # [P, R, d]
        # pack keys into int64 codes, linear in the key (margin d+1 so neighbours stay in range)
        lo = keys.amin((0, 1)) - d1
        span = keys.amax((0, 1)) - lo + d1 + 1
        strides = [1]
        for s in span.tolist()[:-1]:
            strides.append(strides[-1] * int(s))
        per_image = strides[-1] * int(span[-1])
        if per_image * b >= 2**62:
            raise ValueError("dense CRF: lattice keys do not fit in 64 bits (features spread too widely: "
                             "a very small sxy or srgb?)")
        stride_t = torch.tensor(strides, dtype=torch.int64, device=dev)
        codes = ((keys - lo) * stride_t).sum(2)  # [P, R]
        img = torch.arange(b, device=dev, dtype=torch.int64).repeat_interleave(n)
        codes = codes + (img * per_image)[:, None]
        uniq, inverse = torch.unique(codes.reshape(-1), sorted=True, return_inverse=True)
        m = uniq.numel()
        self.m = m
        self.offsets = inverse.reshape(b * n, d1)  # [P, R] into the M lattice points
        # neighbours along direction j: key - 1 everywhere but key[j] + d (n1), and the opposite (n2)
        total_stride = int(sum(strides))
        n1, n2 = [], []
        for j in range(d1):
            delta = -total_stride + (d1 * strides[j] if j < d else 0)
            for sign, out in ((1, n1), (-1, n2)):
                want = uniq + sign * delta
                pos = torch.searchsorted(uniq, want).clamp_(max=m - 1)
                out.append(torch.where(uniq[pos] == want, pos, torch.full_like(pos, m)))  # m: the zero row
        self.n1, self.n2 = n1, n2
        self.alpha = float(np.float32(1.0) / (np.float32(1.0) + np.float32(2.0) ** np.float32(-d)))
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            self._build_sparse(dev)

    def _build_sparse(self, dev) -> None:
        """splat, the d+1 blurs and slice as CSR matrices: one sparse-dense matmul each, all C channels at
        once (multi-threaded on CPU, cuSPARSE on CUDA); 2-3x faster at 21 channels on CPU than index_add_
        and gathers vertex by vertex (`filter_reference`)."""
        p, d1, m = self.b * self.n, self.d + 1, self.m
        rows = self.offsets.reshape(-1)
        w = self.weights.reshape(-1)
        # slice [P, M]: row i holds the d+1 vertices of point i
        # int32 indices where they fit: MKL's (and cuSPARSE's) own, no conversion on every matmul
        ix = torch.int32 if 3 * max(p * d1, m) < 2**31 else torch.int64

        def csr(crow, col, val, size):
            return torch.sparse_csr_tensor(crow.to(ix), col.to(ix), val, size)

        self.slice_m = csr(torch.arange(0, p * d1 + 1, d1, device=dev), rows, w, (p, m))
        # splat [M, P] = slice^T: points sorted by lattice vertex
        order = torch.argsort(rows, stable=True)
        counts = torch.bincount(rows, minlength=m)
        crow = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(counts, 0)])
        self.splat_m = csr(crow, torch.div(order, d1, rounding_mode="floor"), w[order], (m, p))
        # blur along direction j [M, M]: 1 on the diagonal, 1/2 on each neighbour that exists (no
        # duplicate or explicit-zero entries, which not every sparse backend accepts)
        ar = torch.arange(m, device=dev)
        weights3 = torch.tensor([1.0, 0.5, 0.5], device=dev).expand(m, 3)
        self.blur_m = []
        for j in range(d1):
            cols = torch.stack([ar, self.n1[j], self.n2[j]], 1)  # [M, 3]; m = no neighbour
            ok = cols < m
            crow_j = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(ok.sum(1), 0)])
            self.blur_m.append(csr(crow_j, cols[ok], weights3[ok], (m, m)))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """values [B, N, C] -> [B, N, C]: splat, blur along the d+1 directions, slice (sparse matmuls)."""
        b, n, c = values.shape
        buf = self.splat_m @ values.reshape(b * n, c).to(torch.float32).contiguous()
        for blur in self.blur_m:
            buf = blur @ buf
        return (self.slice_m @ buf * self.alpha).reshape(b, n, c)

    def filter_reference(self, values: torch.Tensor) -> torch.Tensor:
        """The same filter by index_add_ and gathers, vertex by vertex (the sparse matrices' check)."""
        b, n, c = values.shape
        vals = values.reshape(b * n, c).to(torch.float32)
        buf = torch.zeros(self.m + 1, c, device=vals.device, dtype=torch.float32)
        for r in range(self.d + 1):
            buf.index_add_(0, self.offsets[:, r], vals * self.weights[:, r : r + 1])
        for j in range(self.d + 1):
            new = torch.zeros_like(buf)
            new[: self.m] = buf[: self.m] + 0.5 * (buf[self.n1[j]] + buf[self.n2[j]])
            buf = new
        out = buf[self.offsets[:, 0]] * self.weights[:, :1]
        for r in range(1, self.d + 1):
            out += buf[self.offsets[:, r]] * self.weights[:, r : r + 1]
        return (out * self.alpha).reshape(b, n, c)


class _Kernel:
    """A lattice with pydensecrf's NORMALIZE_SYMMETRIC: k(Q) = n * L(n * Q), n = 1 / sqrt(L(1))."""

    def __init__(self, features: torch.Tensor):
        self.lattice = Lattice(features)
        ones = torch.ones(*features.shape[:2], 1, device=features.device, dtype=torch.float32)
        self.norm = 1.0 / torch.sqrt(self.lattice.filter(ones) + 1e-20)  # [B, N, 1]

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return self.norm * self.lattice.filter(q * self.norm)


def position_features(b: int, h: int, w: int, sxy: float, device) -> torch.Tensor:
    """[B, H*W, 2]: (x / sxy, y / sxy), pixels in row-major order (pydensecrf's DenseCRF2D)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    f = torch.stack([xs / np.float32(sxy), ys / np.float32(sxy)], -1).reshape(1, h * w, 2)
    return f.expand(b, -1, -1)


def bilateral_features(image: torch.Tensor, sxy: float, srgb: float) -> torch.Tensor:
    """image [B, H, W, 3] (0-255) -> [B, H*W, 5]: (x / sxy, y / sxy, r / srgb, g / srgb, b / srgb)."""
    b, h, w, _ = image.shape
    pos = position_features(b, h, w, sxy, image.device)
    rgb = image.to(torch.float32).reshape(b, h * w, 3) / np.float32(srgb)
    return torch.cat([pos, rgb], -1)


@torch.no_grad()
def mean_field(image: torch.Tensor, unary: torch.Tensor, iterations: int, gaussian_sxy: float,
               gaussian_compat: float, bilateral_sxy: float, bilateral_srgb: float,
               bilateral_compat: float) -> torch.Tensor:
    """Q after `iterations` mean-field steps. image [B, H, W, 3] uint8/float 0-255 (RGB), unary [B, K, H, W]
    (energies, -log p); returns Q [B, K, H, W] float32 on the unary's device."""
    b, k, h, w = unary.shape
    if image.shape != (b, h, w, 3):
        raise ValueError(f"image shape {tuple(image.shape)} does not match unary {tuple(unary.shape)}")
    u = unary.to(torch.float32).reshape(b, k, h * w).transpose(1, 2).contiguous()  # [B, N, K]
    image = image.to(unary.device)
    kernels = []
    if gaussian_compat != 0:
        kernels.append((float(gaussian_compat), _Kernel(position_features(b, h, w, gaussian_sxy, unary.device))))
    if bilateral_compat != 0:
        kernels.append((float(bilateral_compat), _Kernel(bilateral_features(image, bilateral_sxy, bilateral_srgb))))
    q = torch.softmax(-u, -1)
    for _ in range(int(iterations)):
        energy = -u
        for weight, kern in kernels:
            energy = energy + weight * kern(q)  # Potts, compatibility -w I: pairwise[k].apply = -w k(Q)
        q = torch.softmax(energy, -1)
    return q.transpose(1, 2).reshape(b, k, h, w)


def refine_torch(image: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor, cfg, device=None) -> np.ndarray:
    """Labels [H, W] (indices into the K channels) of one image; cfg: a resolved CRFConfig.
    probs [K, H, W] scores (any positive scale), image uint8 [H, W, 3] RGB."""
    dev = torch.device(device) if device is not None else (
        probs.device if isinstance(probs, torch.Tensor) else torch.device("cpu"))
    p = torch.as_tensor(probs, dtype=torch.float32).to(dev)
    img = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).to(dev)
    unary = -torch.log(p.clamp_min(EPS))
    q = mean_field(img[None], unary[None], cfg.iterations, cfg.gaussian_sxy, cfg.gaussian_compat,
                   cfg.bilateral_sxy, cfg.bilateral_srgb, cfg.bilateral_compat)
    return q[0].argmax(0).cpu().numpy()


def refine_batch(images: torch.Tensor, probs: torch.Tensor, cfg) -> torch.Tensor:
    """Batched labels: images [B, H, W, 3], probs [B, K, H, W] (same size and K for all) -> long [B, H, W],
    on probs' device. One lattice build and one set of filtering calls for the whole batch."""
    unary = -torch.log(probs.to(torch.float32).clamp_min(EPS))
    q = mean_field(images, unary, cfg.iterations, cfg.gaussian_sxy, cfg.gaussian_compat,
                   cfg.bilateral_sxy, cfg.bilateral_srgb, cfg.bilateral_compat)
    return q.argmax(1)
