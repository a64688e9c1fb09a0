"""Seed refinement by learned affinity (Ahn & Kwak 2018, PSA's AffinityNet + random walk).

Three steps, each a function here; `refine` (the `wsss refine` command) chains them over a split:

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
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsss.config import Config, CRFConfig
from wsss.data.base import SegmentationDataset
from wsss.errors import ConfigError, DataError
from wsss.io import IGNORE_INDEX, atomic_write_json, read_mask, write_mask

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


# --------------------------------------------------------------------------------------------- refine


def _check_settings(path: Path, settings: dict, what: str = "masks") -> None:
    """Write `settings` to PATH, or refuse (ConfigError) when PATH holds others: outputs of two
    configurations never mix in one folder."""
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ConfigError(f"{path.parent}: holds {what} made with other settings ({', '.join(diff)} differ; "
                              f"see {path.name}); choose another folder or delete it")
    else:
        atomic_write_json(path, settings)


def _trained(run: Path, epochs: int) -> bool:
    from wsss.io import load_checkpoint

    last = run / "last.pt"
    return last.is_file() and int(load_checkpoint(last).get("epoch", -1)) >= epochs


def _save_walk(path: Path, classes: list[int], walked: torch.Tensor) -> None:
    import io

    from wsss.io import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, walked=walked.numpy().astype(np.float32), classes=np.asarray(classes, dtype=np.int16))
    atomic_write_bytes(path, buf.getvalue())


def _load_walk(path: Path) -> tuple[list[int], torch.Tensor] | None:
    """A cached walk, or None when absent or unreadable (a file cut short is recomputed)."""
    try:
        with np.load(path) as z:
            return [int(c) for c in z["classes"]], torch.from_numpy(z["walked"].astype(np.float32))
    except (OSError, ValueError, KeyError, EOFError):
        return None


def _seed_protocol(seeds: Path) -> dict:
    try:
        return dict(json.loads((seeds / "summary.json").read_text(encoding="utf-8")).get("protocol") or {})
    except (OSError, ValueError):
        return {}


# settings of step 4 alone: the walks (step 3) do not depend on them, so one walk serves them all
_MASK_KEYS = ("bg_threshold", "walk_crf", "walk_crf_confidence")


def _checked_thresholds(thresholds: list[float], method, ds: SegmentationDataset, split: str) -> list[float]:
    """--sweep-threshold's values sorted, without repeats; ConfigError when there is nothing to sweep."""
    if method.bg_alpha > 0:
        raise ConfigError("--sweep-threshold: method.bg_alpha > 0 walks the background, there is no threshold")
    if not ds.has_masks:
        raise ConfigError(f"--sweep-threshold: split {split!r} has no masks to choose the threshold on")
    thresholds = sorted({round(float(t), 6) for t in thresholds})
    if not thresholds:
        raise ConfigError("--sweep-threshold: no thresholds")
    return thresholds


@dataclasses.dataclass
class _Refinement:
    """What the steps of `refine` share: the config, the split, the three folders and the images skipped
    so far (`skipped` is the list `refine` reports, appended to in place)."""

    cfg: Config
    ds: SegmentationDataset
    run: Path
    seeds: Path
    out: Path
    split: str
    skip_bad: bool
    skipped: list[str]
    alphas: list[float]  # the confident labels' two background alphas (`seed_alphas`)
    seed_protocol: dict  # the seeds' own protocol (their summary.json), read once

    def bad(self, e: DataError) -> None:
        """An unusable image: raise, or with skip_bad warn on stderr, record it and go on without it."""
        if not self.skip_bad:
            raise e
        msg = " ".join(str(e).split())
        print(f"warning: skipped {msg}", file=sys.stderr)
        self.skipped.append(msg)

    def seed_maps(self, id_: str) -> tuple[Path, list[int], np.ndarray]:
        """(path, classes, probs) of an image's saved seed maps."""
        path = self.seeds / "maps" / f"{id_}.npz"
        return (path, *load_maps(path))

    def cached_walk(self, i: int) -> tuple[list[int], torch.Tensor, np.ndarray | None]:
        """(classes, walked) of image i's walk in OUT/walk/, and its mask (None when the split has none)."""
        classes, walked = _load_walk(self.out / "walk" / f"{self.ds.ids[i]}.npz")
        gt = self.ds.load_mask(i) if self.ds.has_masks else None
        return classes, walked, gt


@dataclasses.dataclass(frozen=True)
class _Threshold:
    """Step 4's background threshold: its value (None: the walked background decides), how it was chosen,
    and with a sweep the mIoU of each threshold tried."""

    value: float | None
    chosen: str
    sweep: dict[str, float] | None = None


def _confident_label_step(job: _Refinement) -> list[int]:
    """Step 1: RUN/labels/<id>.png for every image with readable seeds (present ones are kept, the settings
    in RUN/labels.json must match); the indices of the images that have labels."""
    a, labels = job.cfg.method, job.run / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    crf_settings = dataclasses.asdict(job.cfg.infer.crf) if a.crf else None
    _check_settings(job.run / "labels.json", {"seeds": str(job.seeds.resolve()), "alphas": job.alphas,
                                              "crf": crf_settings}, "confident labels")
    train_ids = []
    for i, id_ in enumerate(job.ds.ids):
        path = labels / f"{id_}.png"
        if path.is_file():
            train_ids.append(i)
            continue
        try:
            src, classes, probs = job.seed_maps(id_)
            rgb = np.array(job.ds.load_image(i), dtype=np.uint8)
            if rgb.shape[:2] != probs.shape[1:]:
                raise DataError(f"{src}: maps are {probs.shape[2]}x{probs.shape[1]}, "
                                f"the image {rgb.shape[1]}x{rgb.shape[0]}")
        except DataError as e:
            job.bad(e)
            continue
        write_mask(path, confident_labels(rgb, probs, classes, job.alphas, job.cfg.infer.crf, crf=a.crf))
        train_ids.append(i)
    if not train_ids:
        raise DataError(f"{job.seeds}: no usable seed maps for split {job.split!r}")
    return train_ids


def _train_step(job: _Refinement, train_ids: list[int], progress: bool) -> None:
    """Step 2: AffinityNet trained on the images' confident labels into RUN, resumed from RUN/last.pt; nothing
    to do once it holds the last epoch."""
    from wsss.engine.trainer import train
    from wsss.segment.train import PseudoMaskDataset

    if not _trained(job.run, job.cfg.train.epochs):
        sub = PseudoMaskDataset(_Subset(job.ds, train_ids), job.run / "labels")
        train(job.cfg, job.run, resume=True, progress=progress, train_dataset=sub)


def _walk_settings(job: _Refinement) -> dict:
    """OUT/walk.json: everything the walks depend on (the method's settings less _MASK_KEYS)."""
    cfg = job.cfg
    return {"run": str(job.run.resolve()), "seeds": str(job.seeds.resolve()), "split": job.split,
            **{k: v for k, v in dataclasses.asdict(cfg.method).items() if k not in _MASK_KEYS},
            # the input size sets the walk's grid: walks at two sizes never mix in one folder
            "infer_size": int(cfg.infer.size or cfg.data.crop_size), "infer_resize": cfg.infer.resize}


def _walk_step(job: _Refinement, walk_settings: dict, device: str) -> tuple[int, list[int]]:
    """Step 3: each image's seeds walked on its AffinityNet features into OUT/walk/<id>.npz (grid resolution;
    a readable one is kept). (walks computed, indices of the images with a walk)."""
    from wsss.engine.inference import eval_transform, load_run, resolve_device
    from wsss.provenance import write_env

    out, ds = job.out, job.ds
    out.mkdir(parents=True, exist_ok=True)
    write_env(out)
    _check_settings(out / "walk.json", walk_settings, "walks")
    (out / "walk").mkdir(exist_ok=True)
    tf = eval_transform(job.cfg)
    dev = resolve_device(device)
    net = None  # loaded with the first walk to compute: a rerun over cached walks never loads it
    computed, usable = 0, []
    for i, id_ in enumerate(ds.ids):
        path = out / "walk" / f"{id_}.npz"
        if path.is_file() and _load_walk(path) is not None:
            usable.append(i)
            continue
        try:
            _, classes, probs = job.seed_maps(id_)
            sample = ds[i]
        except DataError as e:
            job.bad(e)
            continue
        if net is None:
            _, net, _ = load_run(job.run, device=dev)
        x = tf(sample, ds.num_classes)["image"].to(dev)
        with torch.no_grad():
            feats = net.embed(x[None])[0]
            walked = walk_maps(feats, torch.from_numpy(probs), job.cfg.method)
        _save_walk(path, classes, walked)
        computed += 1
        usable.append(i)
    return computed, usable


def _threshold_step(job: _Refinement, usable: list[int], sweep_thresholds: list[float] | None) -> _Threshold:
    """Step 4's threshold: the walked background (method.bg_alpha > 0), method.bg_threshold, or the best of
    `sweep_thresholds`."""
    a = job.cfg.method
    if a.bg_alpha > 0:
        threshold = _Threshold(None, f"(1 - max_c)^{a.bg_alpha:g} walked")
    else:
        threshold = _Threshold(float(a.bg_threshold), "fixed")
    return threshold if sweep_thresholds is None else _sweep_threshold(job, usable, sweep_thresholds)


def _sweep_threshold(job: _Refinement, usable: list[int], thresholds: list[float]) -> _Threshold:
    """The threshold of the best mIoU on the split's masks, from the cached walks and without the CRF;
    OUT/sweep.json holds every threshold's mIoU."""
    from wsss.engine.inference import _tensor
    from wsss.evaluation.metrics import MultiConfusion

    mc = MultiConfusion(job.ds.num_classes, thresholds)
    for i in usable:
        try:
            classes, walked, gt = job.cached_walk(i)
        except DataError as e:
            job.bad(e)
            continue
        if gt is None:
            continue
        g = _tensor(gt)
        for t in thresholds:
            mc.update(t, _tensor(walk_to_mask(walked, classes, job.cfg.method, gt.shape, t)), g)
    best, res = mc.best()
    table = {f"{t:g}": mc[t].compute()["miou"] for t in thresholds}
    threshold = _Threshold(float(best), f"swept on {job.split}", table)
    atomic_write_json(job.out / "sweep.json", {"split": job.split, "sweep": table, "best_threshold": best,
                                               "best_miou": res["miou"]})
    return threshold


def _mask_crf_settings(cfg: Config, crf: bool) -> tuple[str | None, dict]:
    """With `crf`: the CRF after the walk, as the protocol names it, and its settings for OUT/refine.json;
    without: (None, {})."""
    if not crf:
        return None, {}
    a = cfg.method
    name = f"irn_label (confidence {a.walk_crf_confidence:g})" if a.walk_crf == "label" else cfg.infer.crf.preset
    return name, {"crf": dataclasses.asdict(cfg.infer.crf), "walk_crf": a.walk_crf,
                  "walk_crf_confidence": a.walk_crf_confidence}


def _write_masks(job: _Refinement, usable: list[int], threshold: float | None, crf: bool) -> tuple[int, dict, dict]:
    """Step 4's masks: OUT/<id>.png from each cached walk (one present is read back, not redone), scored
    against the split's masks when it has them. (masks written, metrics ({} without masks), diagnostics)."""
    from wsss.diagnostics import MaskStats
    from wsss.engine.inference import _tensor
    from wsss.engine.pseudo_masks import _metrics
    from wsss.evaluation.metrics import ConfusionMatrix

    cfg, ds = job.cfg, job.ds
    cm = ConfusionMatrix(ds.num_classes) if ds.has_masks else None
    diag = MaskStats()
    written = 0
    for i in usable:
        path = job.out / f"{ds.ids[i]}.png"
        try:
            if path.is_file():
                pred = read_mask(path)
                gt = ds.load_mask(i) if cm is not None else None
            else:
                classes, walked, gt = job.cached_walk(i)
                size = gt.shape if gt is not None else ds.load_image(i).size[::-1]
                rgb = np.array(ds.load_image(i), dtype=np.uint8) if crf else None
                pred = walk_to_mask(walked, classes, cfg.method, size, threshold, rgb=rgb, crf_cfg=cfg.infer.crf)
                write_mask(path, pred)
                written += 1
        except DataError as e:
            job.bad(e)
            continue
        diag.add(pred)
        if cm is not None and gt is not None:
            cm.update(_tensor(pred), _tensor(gt))
    metrics = _metrics(cm, ds.class_names) if cm is not None else {}
    return written, metrics, diag.summary("refined masks")


def _write_summary(job: _Refinement, threshold: _Threshold, crf_name: str | None, metrics: dict,
                   diagnostics: dict) -> dict:
    """OUT/summary.json: the masks' metrics, threshold, skipped images, protocol and diagnostics (their alarm,
    if any, also on stderr)."""
    proto = {**job.seed_protocol, "split": job.split, "stage": "refined", "alphas": job.alphas,
             "crf": crf_name, "bg_threshold": threshold.value, "bg_threshold_chosen": threshold.chosen,
             "checkpoint": "last (AffinityNet)"}
    summary = {**metrics, "num_images": len(job.ds), "split": job.split, "bg_threshold": threshold.value,
               **({"sweep": threshold.sweep} if threshold.sweep else {}),
               **({"skipped": job.skipped} if job.skipped else {}), "protocol": proto, "diagnostics": diagnostics}
    if diagnostics["alarm"]:
        print(f"warning: {job.out}: {diagnostics['alarm']}", file=sys.stderr)
    atomic_write_json(job.out / "summary.json", summary)  # no timings: a resumed run writes the same bytes
    return summary


def refine(cfg, run_dir, seeds_dir, data_root, split: str, out_dir, device: str = "auto", skip_bad: bool = False,
           progress: bool = True, sweep_thresholds: list[float] | None = None, crf: bool = False) -> dict:
    """`wsss refine`, four resumable steps:

    1. confident labels of the split's images (two alphas, CRF, disagreement ignored) into RUN/labels/
       (RUN/labels.json: the seeds and settings they came from; other settings are refused);
    2. AffinityNet trained on them into RUN (the engine trainer, resumed from RUN/last.pt; skipped once it
       holds the last epoch);
    3. each image's seeds walked on its affinity features into OUT/walk/<id>.npz (grid resolution);
    4. masks OUT/<id>.png at the background threshold: `cfg.method.bg_threshold`, or with `sweep_thresholds`
       (a split with masks) the best of them by mIoU on this split (OUT/sweep.json), "the threshold chosen on
       train" of PSA's protocol; with `crf`, the dense CRF follows (`walk_to_mask`: IRN's label CRF on that
       mask, or `cfg.infer.crf` on the walked scores; the sweep itself is without it).

    Every file is written atomically and skipped on a rerun when present, so kill -9 loses at most the
    image (or the epoch) in flight. OUT/walk.json / OUT/refine.json hold the settings of the walks / masks.
    With masks, OUT/summary.json holds the mIoU and its protocol. One image at a time: memory does not grow
    with the split."""
    from wsss.data import open_dataset
    from wsss.methods.affinity import check_config, seed_alphas

    t0 = time.time()
    if cfg.method.name != "affinity":
        raise ConfigError(f"method.name: `wsss refine` trains an AffinityNet (affinity), got {cfg.method.name!r}")
    check_config(cfg.method)  # before hours of training, not after
    run, seeds, out = Path(run_dir), Path(seeds_dir), Path(out_dir)
    if not (seeds / "maps").is_dir():
        raise DataError(f"{seeds / 'maps'}: seed maps not found (make them with `wsss pseudo-label ... --save-maps`)")
    cfg.data.root, cfg.data.train_split, cfg.data.val_split = str(data_root), split, ""
    cfg.data.skip_bad = bool(skip_bad)
    ds = open_dataset(data_root, split, cfg.data.format, cfg.data.tags_file, strict=not skip_bad)
    skipped = [" ".join(p.split()) for p in getattr(ds, "problems", [])]
    if sweep_thresholds is not None:
        sweep_thresholds = _checked_thresholds(sweep_thresholds, cfg.method, ds, split)
    protocol = _seed_protocol(seeds)
    alphas = seed_alphas(cfg.method, protocol.get("bg_threshold"))
    job = _Refinement(cfg, ds, run, seeds, out, split, skip_bad, skipped, alphas, protocol)

    # every config check is above, before anything is written or trained; below, each step refuses a folder
    # holding its files made with other settings (labels.json, walk.json, refine.json)
    train_ids = _confident_label_step(job)
    _train_step(job, train_ids, progress)
    walk_settings = _walk_settings(job)
    computed, usable = _walk_step(job, walk_settings, device)
    threshold = _threshold_step(job, usable, sweep_thresholds)
    crf_name, mask_crf = _mask_crf_settings(cfg, crf)
    _check_settings(out / "refine.json", {**walk_settings, "bg_threshold": threshold.value,
                                          "bg_threshold_chosen": threshold.chosen, **mask_crf})
    written, metrics, diagnostics = _write_masks(job, usable, threshold.value, crf)
    summary = _write_summary(job, threshold, crf_name, metrics, diagnostics)
    result = {"split": split, "num_images": len(ds), "computed": computed, "written": written, "out_dir": str(out)}
    if skipped:
        result["skipped"] = skipped
    result.update(summary)
    result["seconds"] = round(time.time() - t0, 3)
    return result


class _Subset(SegmentationDataset):
    """`base` restricted to some indices (the images that have seeds); module level, so it pickles."""

    def __init__(self, base, indices):
        self.base, self.indices = base, list(indices)
        self.root, self.split = getattr(base, "root", ""), getattr(base, "split", "")
        self.class_names = base.class_names
        self.ids = [base.ids[i] for i in self.indices]

    @property
    def has_masks(self):
        return self.base.has_masks

    def image_path(self, k):
        return self.base.image_path(self.indices[k])

    def load_image(self, k):
        return self.base.load_image(self.indices[k])

    def load_mask(self, k):
        return self.base.load_mask(self.indices[k])

    def tags(self, k):
        return self.base.tags(self.indices[k])
