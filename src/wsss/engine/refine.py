"""`wsss refine`: seed maps -> confident labels -> AffinityNet -> random walk -> refined masks, as IRN's
stages: each step writes its artefacts atomically and skips what is already there, so a killed run resumes.

The graph math (pairs, walk, labels) lives in `wsss.postprocess.affinity`; this module owns the folders:

    RUN/labels/<id>.png, RUN/labels.json     step 1, confident labels and the settings they came from
    RUN/last.pt                              step 2, the AffinityNet (the engine trainer)
    OUT/walk/<id>.npz, OUT/walk.json         step 3, walked seed maps at grid resolution
    OUT/<id>.png, OUT/refine.json            step 4, masks at the background threshold (OUT/sweep.json),
                                             merged with the seeds' CRF masks (--crf-masks, `method.merge`)
    OUT/summary.json                         their metrics, protocol and diagnostics
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from wsss.config import Config
from wsss.data.base import SegmentationDataset
from wsss.diagnostics import MaskStats
from wsss.errors import ConfigError, DataError
from wsss.evaluation.metrics import ConfusionMatrix, MultiConfusion, mask_tensor
from wsss.io import (
    IGNORE_INDEX,
    atomic_write_bytes,
    atomic_write_json,
    claim_settings,
    load_checkpoint,
    read_mask,
    write_mask,
)
from wsss.postprocess.affinity import MERGES, confident_labels, load_maps, walk_maps, walk_to_mask


def _trained(run: Path, epochs: int) -> bool:
    last = run / "last.pt"
    return last.is_file() and int(load_checkpoint(last).get("epoch", -1)) >= epochs


def _save_walk(path: Path, classes: list[int], walked: torch.Tensor) -> None:
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
_MASK_KEYS = ("bg_threshold", "walk_crf", "walk_crf_confidence", "merge")


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
    merge: str  # `merge_mode`: walk (the walk's masks alone), fill or relabel (over `crf_masks`)
    crf_masks: Path | None  # the seeds' CRF masks, <id>.png, that fill / relabel read; None with walk

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

    def merged(self, i: int, walk_mask: np.ndarray) -> np.ndarray:
        """Image i's walk mask as step 4 writes it: as it is (walk), or merged with the image's CRF mask."""
        if self.merge == "walk":
            return walk_mask
        path = self.crf_masks / f"{self.ds.ids[i]}.png"
        if not path.is_file():
            raise DataError(f"{path}: no CRF mask for this image (method.merge: {self.merge} reads the CRF masks)")
        try:
            return MERGES[self.merge](read_mask(path), walk_mask)
        except ValueError as e:  # the two sizes differ: name the file
            raise DataError(f"{path}: {e}") from None


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
    claim_settings(job.run / "labels.json", {"seeds": str(job.seeds.resolve()), "alphas": job.alphas,
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


def _label_shares(job: _Refinement, train_ids: list[int]) -> dict:
    """The confident labels' pixel shares over the split: ignored (the two alphas disagree) and foreground,
    read from the labels on disk (a resumed run reports the same). What the AffinityNet learns from; not a
    verdict: a high share flagged CAM seeds whose walk lost to the CRF, but the fixed alphas of seeds with a
    background channel ignore a wide band whether the walk pays or not (RESULTS.md, "Affinity refinement")."""
    ignored = foreground = total = 0
    for i in train_ids:
        m = read_mask(job.run / "labels" / f"{job.ds.ids[i]}.png")
        ignored += int(np.count_nonzero(m == IGNORE_INDEX))
        foreground += int(np.count_nonzero((m > 0) & (m != IGNORE_INDEX)))
        total += m.size
    return {"ignored": round(ignored / max(total, 1), 4), "foreground": round(foreground / max(total, 1), 4)}


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
    claim_settings(out / "walk.json", walk_settings, "walks")
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
    mc = MultiConfusion(job.ds.num_classes, thresholds)
    for i in usable:
        try:
            classes, walked, gt = job.cached_walk(i)
        except DataError as e:
            job.bad(e)
            continue
        if gt is None:
            continue
        g = mask_tensor(gt)
        for t in thresholds:
            mc.update(t, mask_tensor(walk_to_mask(walked, classes, job.cfg.method, gt.shape, t)), g)
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
                pred = job.merged(i, pred)
                write_mask(path, pred)
                written += 1
        except DataError as e:
            job.bad(e)
            continue
        diag.add(pred)
        if cm is not None and gt is not None:
            cm.update(mask_tensor(pred), mask_tensor(gt))
    metrics = cm.as_json(ds.class_names) if cm is not None else {}
    return written, metrics, diag.summary("refined masks")


def _write_summary(job: _Refinement, threshold: _Threshold, crf_name: str | None, metrics: dict,
                   diagnostics: dict, labels: dict) -> dict:
    """OUT/summary.json: the masks' metrics, threshold, skipped images, protocol and diagnostics (their alarm,
    if any, also on stderr)."""
    proto = {**job.seed_protocol, "split": job.split, "stage": "refined", "alphas": job.alphas,
             "crf": crf_name, "bg_threshold": threshold.value, "bg_threshold_chosen": threshold.chosen,
             "checkpoint": "last (AffinityNet)", "merge": job.merge,
             **({"crf_masks": str(job.crf_masks)} if job.crf_masks else {})}
    summary = {**metrics, "num_images": len(job.ds), "split": job.split, "bg_threshold": threshold.value,
               **({"sweep": threshold.sweep} if threshold.sweep else {}),
               **({"skipped": job.skipped} if job.skipped else {}), "protocol": proto, "diagnostics": diagnostics,
               "confident_labels": labels}
    if diagnostics["alarm"]:
        print(f"warning: {job.out}: {diagnostics['alarm']}", file=sys.stderr)
    atomic_write_json(job.out / "summary.json", summary)  # no timings: a resumed run writes the same bytes
    return summary


def refine(cfg, run_dir, seeds_dir, data_root, split: str, out_dir, device: str = "auto", skip_bad: bool = False,
           progress: bool = True, sweep_thresholds: list[float] | None = None, crf: bool = False,
           crf_masks=None) -> dict:
    """`wsss refine`, four resumable steps:

    1. confident labels of the split's images (two alphas, CRF, disagreement ignored) into RUN/labels/
       (RUN/labels.json: the seeds and settings they came from; other settings are refused);
    2. AffinityNet trained on them into RUN (the engine trainer, resumed from RUN/last.pt; skipped once it
       holds the last epoch);
    3. each image's seeds walked on its affinity features into OUT/walk/<id>.npz (grid resolution);
    4. masks OUT/<id>.png at the background threshold: `cfg.method.bg_threshold`, or with `sweep_thresholds`
       (a split with masks) the best of them by mIoU on this split (OUT/sweep.json), "the threshold chosen on
       train" of PSA's protocol; with `crf`, the dense CRF follows (`walk_to_mask`: IRN's label CRF on that
       mask, or `cfg.infer.crf` on the walked scores; the sweep itself is without it); then with
       `cfg.method.merge` the masks in `crf_masks` (the seeds' CRF masks, <id>.png) keep their foreground and
       the walk labels only their background (fill; auto's choice for seeds cut at a threshold), or give their
       class where both draw foreground (relabel; auto's for seeds with a background channel).

    Every file is written atomically and skipped on a rerun when present, so kill -9 loses at most the
    image (or the epoch) in flight. OUT/walk.json / OUT/refine.json hold the settings of the walks / masks.
    With masks, OUT/summary.json holds the mIoU and its protocol. One image at a time: memory does not grow
    with the split."""
    from wsss.data import open_dataset
    from wsss.methods.affinity import check_config, merge_mode, seed_alphas

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
    if crf_masks is not None and not Path(crf_masks).is_dir():
        raise DataError(f"{crf_masks}: CRF masks folder not found (make it with `wsss pseudo-label RUN --crf`)")
    protocol = _seed_protocol(seeds)
    seed_threshold = protocol.get("bg_threshold")  # None: seeds with a background channel
    alphas = seed_alphas(cfg.method, seed_threshold)
    merge = merge_mode(cfg.method, seed_threshold, crf_masks is not None)
    if cfg.method.merge == "auto" and crf_masks is None:  # the merge it would pick did better wherever measured
        would = merge_mode(cfg.method, seed_threshold, crf_masks=True)
        print(f"note: method.merge auto: no --crf-masks, so the walk's masks alone; with these seeds' CRF masks "
              f"(`wsss pseudo-label RUN --crf`) it would {would} them, which did better wherever measured",
              file=sys.stderr)
    job = _Refinement(cfg, ds, run, seeds, out, split, skip_bad, skipped, alphas, protocol, merge,
                      None if merge == "walk" else Path(crf_masks))

    # every config check is above, before anything is written or trained; below, each step refuses a folder
    # holding its files made with other settings (labels.json, walk.json, refine.json)
    train_ids = _confident_label_step(job)
    labels = _label_shares(job, train_ids)
    _train_step(job, train_ids, progress)
    walk_settings = _walk_settings(job)
    computed, usable = _walk_step(job, walk_settings, device)
    threshold = _threshold_step(job, usable, sweep_thresholds)
    crf_name, mask_crf = _mask_crf_settings(cfg, crf)
    claim_settings(out / "refine.json", {**walk_settings, "bg_threshold": threshold.value,
                                          "bg_threshold_chosen": threshold.chosen, **mask_crf,
                                          # only with a merge: a walk-only folder's settings stay as before
                                          **({"merge": merge, "crf_masks": str(job.crf_masks.resolve())}
                                             if job.crf_masks else {})})
    written, metrics, diagnostics = _write_masks(job, usable, threshold.value, crf)
    summary = _write_summary(job, threshold, crf_name, metrics, diagnostics, labels)
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
