"""Seed refinement by learned affinity (Ahn & Kwak 2018, PSA's AffinityNet + random walk).

The graph and its labels, as functions of tensors and arrays; `wsss.engine.refine` (the `wsss refine`
command) chains them over a split with cached, resumable artefacts:

1. `confident_labels`: from saved seed maps (`wsss pseudo-label --save-maps`), the background score
   (1 - max_c fg)^alpha with a low and a high alpha, each refined by the dense CRF; where the two labelings
   agree the label is kept, elsewhere 255 (ignore). Low alpha -> a large background score -> confident
   background; high alpha -> confident foreground. (PSA's `infer_cls.py` uses alphas 4 and 32; SEAM 4 and 24;
   MCTformer 1 and 12.)
2. AffinityNet (`wsss.methods.affinity`): a backbone + embedding head trained by the engine trainer on those
   labels; pairs of feature cells within `radius`: same label -> affinity 1 (background and foreground pairs
   averaged separately), different -> 0, pairs touching 255 ignored. Loss bg/4 + fg/4 + neg/2 (PSA).
3. `random_walk`: a_ij = exp(-mean_d |f_i - f_j|)^beta for |i - j| < radius (and i = j), row-normalised into
   a transition matrix T, seed maps propagated 2^logt steps. Stored sparse: [N, M] neighbour indices and
   weights (M offsets in the disk), memory linear in N = h*w, never an N x N matrix. PSA's `infer_aff.py`
   normalises the dense matrix's columns and multiplies the maps from the left (v T): for a symmetric
   affinity that is the same averaging, v_i <- sum_j a_ij v_j / sum_j a_ij, which is ours.
4. `walk_to_mask`: the walked foreground against a constant background threshold (MCTformer's `--bg_thr`,
   chosen on train by `refine(..., sweep_thresholds=)`), or PSA's walked (1 - max)^alpha (`bg_alpha` > 0);
   optionally a dense CRF after it, by default IRN's CRF on the mask as a labelling (`walk_crf`).
5. `fill_background` (`merge: fill`): the seeds' own CRF masks keep their foreground, the walk's mask only
   labels their background. Ours, not PSA's (the reason at `AffinityConfig.merge`).

PSA's facts (jiwoon-ahn/psa and xulianuwa/MCTformer `psa/`): the pair loss bg/4 + fg/4 + neg/2 with each
term averaged over its own pairs; radius 5 on the stride-8 grid; beta 8; logt 6 (MCTformer; the original
default is 8); affinity exp(-mean over channels |f_i - f_j|) (the issue's L1 norm, divided by D so the scale
does not depend on the embedding width). Differences: the labels keep a pixel only where the two alphas'
CRF labelings agree (PSA keeps the low alpha's foreground and the high alpha's background, so a pixel one
calls class c and the other class d keeps c); labels reach the feature grid by nearest sampling (PSA
average-pools the CRF scores by 8, then takes the argmax).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsss.config import CRFConfig
from wsss.errors import DataError
from wsss.io import IGNORE_INDEX

# ------------------------------------------------------------------------------------------- neighbours


def disk_offsets(radius: int, half: bool = False) -> list[tuple[int, int]]:
    """(dy, dx) offsets with 0 < dy^2 + dx^2 < radius^2. `half`: one of each +/- pair (dy > 0, or dy = 0
    and dx > 0), as the training pairs are counted once."""
    out = []
    for dy in range(-radius + 1, radius):
        for dx in range(-radius + 1, radius):
            d2 = dy * dy + dx * dx
            if d2 == 0 or d2 >= radius * radius:
                continue
            if half and not (dy > 0 or (dy == 0 and dx > 0)):
                continue
            out.append((dy, dx))
    return out


def shifted_pairs(x: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of x [..., h, w] that put cell (y, x) against cell (y + dy, x + dx), both in bounds."""
    h, w = x.shape[-2:]
    y0, y1 = max(0, -dy), h - max(0, dy)
    x0, x1 = max(0, -dx), w - max(0, dx)
    return x[..., y0:y1, x0:x1], x[..., y0 + dy : y1 + dy, x0 + dx : x1 + dx]


def pair_affinity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(-mean over channels |a - b|) for [B, D, ...] features (PSA's affinity; mean, so D does not
    change its scale)."""
    return torch.exp(-(a - b).abs().mean(1))


def affinity_loss(feats: torch.Tensor, labels: torch.Tensor, radius: int) -> dict[str, torch.Tensor]:
    """PSA's loss over the pairs within `radius` of the feature grid. feats [B, D, h, w]; labels long
    [B, h, w] (255 = ignore). {"loss", "bg", "fg", "neg"}; an empty pair set contributes 0."""
    eps = 1e-5
    sums = {"bg": 0.0, "fg": 0.0, "neg": 0.0}
    counts = {"bg": 0.0, "fg": 0.0, "neg": 0.0}
    for dy, dx in disk_offsets(radius, half=True):
        fa, fb = shifted_pairs(feats, dy, dx)
        la, lb = shifted_pairs(labels, dy, dx)
        if la.numel() == 0:
            continue
        aff = pair_affinity(fa.float(), fb.float())
        valid = (la != IGNORE_INDEX) & (lb != IGNORE_INDEX)
        same = valid & (la == lb)
        masks = {"bg": same & (la == 0), "fg": same & (la != 0), "neg": valid & (la != lb)}
        for k, m in masks.items():
            m = m.float()
            term = -torch.log(aff + eps) if k != "neg" else -torch.log(1.0 + eps - aff)
            sums[k] = sums[k] + (m * term).sum()
            counts[k] = counts[k] + m.sum()
    terms = {k: sums[k] / (counts[k] + eps) if torch.is_tensor(sums[k]) else feats.sum() * 0 for k in sums}
    loss = terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2
    return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}


# ---------------------------------------------------------------------------------------- random walk


def transition(feats: torch.Tensor, radius: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse row-normalised transition matrix of a feature grid [D, h, w]: (idx long [N, M], weights
    float [N, M]), N = h*w, M = 1 + the disk's offsets (self first). Out-of-grid neighbours point at the
    cell itself with weight 0. Each +/- offset pair's affinities are computed once, on shifted views of
    the grid (no gathered copies of the features)."""
    d, h, w = feats.shape
    n = h * w
    half = disk_offsets(radius, half=True)
    offsets = [(0, 0), *half, *[(-dy, -dx) for dy, dx in half]]
    col = {o: m for m, o in enumerate(offsets)}
    grid = torch.arange(n, device=feats.device).view(h, w)
    idx = grid.reshape(n, 1).repeat(1, len(offsets))
    wts = torch.zeros((h, w, len(offsets)), dtype=torch.float32, device=feats.device)
    wts[:, :, 0] = 1.0  # exp(0)^beta
    f = feats.float()
    idx = idx.view(h, w, len(offsets))
    for dy, dx in half:
        fa, fb = shifted_pairs(f, dy, dx)  # cell p against p + (dy, dx)
        if fa.numel() == 0:
            continue
        a = torch.exp(-(fa - fb).abs().mean(0)).pow(beta)
        ga, gb = shifted_pairs(grid, dy, dx)
        y0, y1, x0, x1 = max(0, -dy), h - max(0, dy), max(0, -dx), w - max(0, dx)
        m, mr = col[(dy, dx)], col[(-dy, -dx)]
        wts[y0:y1, x0:x1, m] = a
        idx[y0:y1, x0:x1, m] = gb
        wts[y0 + dy : y1 + dy, x0 + dx : x1 + dx, mr] = a  # the same pair seen from the other end
        idx[y0 + dy : y1 + dy, x0 + dx : x1 + dx, mr] = ga
    idx, wts = idx.reshape(n, -1), wts.reshape(n, -1)
    return idx, wts / wts.sum(1, keepdim=True).clamp_min(1e-12)


def propagate(maps: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` applications of T to maps [K, N]: v_i <- sum_m wts[i, m] v[idx[i, m]]."""
    v = maps.float()
    if v.device.type in ("cpu", "cuda"):  # a CSR matrix times [N, K]: ~10x the gather below
        n, m = idx.shape
        order = idx.argsort(1)  # CSR wants sorted columns within a row
        crow = torch.arange(0, n * m + 1, m, device=idx.device)
        with warnings.catch_warnings():  # "beta state" / "invariant checks disabled": built valid here
            warnings.simplefilter("ignore", UserWarning)
            t = torch.sparse_csr_tensor(crow, idx.gather(1, order).reshape(-1), wts.gather(1, order).reshape(-1),
                                        (n, n), check_invariants=False)
        x = v.T.contiguous()
        for _ in range(steps):
            x = t @ x
        return x.T.contiguous()
    for _ in range(steps):
        v = (v[:, idx] * wts).sum(-1)
    return v


def random_walk(feats: torch.Tensor, seeds: torch.Tensor, radius: int = 5, beta: float = 8.0, logt: int = 6) -> torch.Tensor:
    """Seed maps [K, h, w] propagated 2^logt steps over the affinity graph of feats [D, h, w]."""
    k, h, w = seeds.shape
    if feats.shape[-2:] != (h, w):
        raise ValueError(f"feature grid {tuple(feats.shape[-2:])} and seed grid {(h, w)} differ")
    idx, wts = transition(feats, radius, beta)
    return propagate(seeds.reshape(k, h * w).to(wts.device), idx, wts, 2 ** int(logt)).reshape(k, h, w)


def walk_maps(feats: torch.Tensor, probs: torch.Tensor, cfg) -> torch.Tensor:
    """The walked maps on the feature grid, float32 [K', h, w] on the CPU: the foreground seed maps
    probs[1:] ([K, H, W], max-normalised, as `--save-maps` stores them) average-pooled to the grid of
    feats [D, h, w] and propagated; with `cfg.bg_alpha` > 0 the background (1 - max fg)^alpha is walked
    with them (channel 0; PSA's original form), else only the foreground: the constant background of
    PSA's `--bg_thr` form stays that constant under the walk (each step averages), so it is compared
    afterwards (`walk_to_mask`), which lets one walk serve every threshold of a sweep."""
    h, w = feats.shape[-2:]
    fg = F.adaptive_avg_pool2d(probs[1:].float()[None], (h, w))[0]
    if cfg.bg_alpha > 0:
        fg = torch.cat([(1 - fg.amax(0, keepdim=True)).clamp_min(0).pow(cfg.bg_alpha), fg])
    if fg.shape[0] == 0:
        return fg
    return random_walk(feats, fg.to(feats.device), cfg.radius, cfg.beta, cfg.logt).cpu()


def _upsampled(walked: torch.Tensor, out_size) -> torch.Tensor:
    return F.interpolate(walked.float()[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]


def walk_to_mask(walked: torch.Tensor, classes: list[int], cfg, out_size, bg_threshold: float | None = None,
                 rgb: np.ndarray | None = None, crf_cfg=None) -> np.ndarray:
    """A refined mask uint8 [H, W] from `walk_maps`' output: upsampled (bilinear) to out_size, then the
    argmax against the background: the walked channel 0 with `cfg.bg_alpha` > 0, else the constant
    `bg_threshold` (default `cfg.bg_threshold`) against the walked foreground as it is (PSA / MCTformer's
    `infer_aff.py`: no renormalisation after the walk). A tie goes to the background. With `rgb` (uint8
    [H, W, 3]) the dense CRF follows (the PSA paper's "random walk + dCRF"; its code stops at the walk):
    `cfg.walk_crf` label: on that argmax as a labelling (IRN's `crf_inference_label`: confidence
    `cfg.walk_crf_confidence`, preset irn_label, `crf_cfg`'s backend); scores: on the scores (`crf_cfg`)."""
    lut = torch.tensor(classes, dtype=torch.uint8)
    if walked.shape[0] == 0 or len(classes) < 2:
        return np.zeros(tuple(out_size), np.uint8)
    up = _upsampled(walked, out_size)
    if cfg.bg_alpha <= 0:
        thr = float(cfg.bg_threshold if bg_threshold is None else bg_threshold)
        up = torch.cat([torch.full_like(up[:1], thr), up])
    if cfg.bg_alpha > 0:
        idx = up.argmax(0)
    else:
        top, arg = up[1:].max(0)
        idx = torch.where(top > up[0], arg + 1, torch.zeros_like(arg))
    if rgb is None:
        return lut[idx].numpy()
    from wsss.postprocess.crf import label_scores
    from wsss.postprocess.crf import refine as crf_refine

    image = np.ascontiguousarray(rgb, dtype=np.uint8)
    if cfg.walk_crf == "label":
        label_cfg = dataclasses.replace(crf_cfg or CRFConfig(), preset="irn_label")
        out = crf_refine(image, label_scores(idx.numpy(), len(classes), cfg.walk_crf_confidence), label_cfg)
    else:
        out = crf_refine(image, up.clamp_min(1e-5).numpy(), crf_cfg)
    return lut.numpy()[np.asarray(out, dtype=np.int64)]


def _same_size(crf_mask: np.ndarray, walk_mask: np.ndarray) -> None:
    """The merges' one check (`refine` names the file when it fails)."""
    if crf_mask.shape != walk_mask.shape:
        raise ValueError(f"CRF mask {crf_mask.shape} and walk mask {walk_mask.shape} differ in size")


def fill_background(crf_mask: np.ndarray, walk_mask: np.ndarray) -> np.ndarray:
    """The walk's mask where `crf_mask` says background (0), `crf_mask` elsewhere (its classes and any 255
    kept): the walk may add objects or parts the CRF missed, never move or relabel what it drew."""
    _same_size(crf_mask, walk_mask)
    return np.where(crf_mask == 0, walk_mask, crf_mask).astype(np.uint8)


def relabel_foreground(crf_mask: np.ndarray, walk_mask: np.ndarray) -> np.ndarray:
    """The walk's mask, with `crf_mask`'s class wherever both draw a class (not 0 or 255): the walk decides
    the extent, the seeds' CRF masks the class (`method.merge: relabel`)."""
    _same_size(crf_mask, walk_mask)
    both = (walk_mask > 0) & (walk_mask != 255) & (crf_mask > 0) & (crf_mask != 255)
    return np.where(both, crf_mask, walk_mask).astype(np.uint8)


MERGES = {"fill": fill_background, "relabel": relabel_foreground}  # the merges that read the CRF masks


def walk_mask(feats: torch.Tensor, classes: list[int], probs: torch.Tensor, cfg, out_size) -> np.ndarray:
    """`walk_to_mask(walk_maps(...))`: one image's refined mask uint8 [H, W]."""
    return walk_to_mask(walk_maps(feats, probs, cfg), classes, cfg, out_size)


# ----------------------------------------------------------------------------------- confident labels


def background(fg: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - max_c fg)^alpha [1, H, W] for max-normalised foreground maps [C, H, W] (1 where C = 0)."""
    top = fg.max(0, keepdims=True) if len(fg) else np.zeros((1, *fg.shape[1:]), np.float32)
    return np.clip(1.0 - top, 0.0, None) ** alpha


def confident_labels(rgb: np.ndarray, probs: np.ndarray, classes, alphas, crf_cfg=None, crf: bool = True) -> np.ndarray:
    """uint8 [H, W] class ids: the CRF labelings with background alphas[0] and alphas[1] where they agree,
    255 where they disagree. probs [K, H, W]: saved seed maps (channel 0 is replaced), classes: their ids.
    `crf=False`: plain argmax of each (tests, or without pydensecrf)."""
    lut = np.asarray(classes, dtype=np.uint8)
    fg = np.asarray(probs[1:], dtype=np.float32)
    labelings = []
    for alpha in alphas:
        scores = np.concatenate([background(fg, float(alpha)), fg]).astype(np.float32)
        if crf:
            from wsss.postprocess.crf import refine as crf_refine

            idx = crf_refine(np.ascontiguousarray(rgb, dtype=np.uint8), scores, crf_cfg)
        else:
            idx = scores.argmax(0)
        labelings.append(lut[idx])
    out = labelings[0].copy()
    for other in labelings[1:]:
        out[out != other] = IGNORE_INDEX
    return out


def load_maps(path: Path) -> tuple[list[int], np.ndarray]:
    """(classes, probs float32 [K, H, W]) from a `--save-maps` file; DataError naming it when unreadable."""
    try:
        with np.load(path) as z:
            probs, classes = z["probs"].astype(np.float32), [int(c) for c in z["classes"]]
    except FileNotFoundError:
        raise DataError(f"{path}: seed maps not found (make them with `wsss pseudo-label ... --save-maps`)") from None
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise DataError(f"{path}: cannot read seed maps ({e})") from None
    if probs.ndim != 3 or probs.shape[0] != len(classes):
        raise DataError(f"{path}: probs {probs.shape} do not match {len(classes)} classes")
    return classes, probs
