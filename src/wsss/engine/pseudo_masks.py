"""Pseudo masks over a split (`wsss pseudo-label`): the seeds of `engine/inference.py` streamed to PNG
masks (resumable: finished PNGs are read back, not recomputed), optionally refined by a dense CRF in
worker processes, evaluated when the split has masks, with the masks' collapse diagnostics.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

from wsss.data.base import checked_sample
from wsss.diagnostics import MaskStats
from wsss.engine.extent import DEFAULT_GUARD, LABELLED_SPLIT, apply_extent_guard
from wsss.engine.inference import (
    _progress,
    _threshold_mask,
    crf_channels,
    eval_transform,
    load_run,
    loader_iter,
    resolve_device,
    resolve_workers,
    run_checkpoint,
    seed_mask,
    seed_probs,
)
from wsss.errors import ConfigError, DataError
from wsss.evaluation.metrics import mask_tensor
from wsss.io import atomic_write_bytes, atomic_write_json, claim_settings, read_mask, write_mask

# ------------------------------------------------------------------------------------------ pseudo masks


def _identity(x):
    return x


class _Items(torch.utils.data.Dataset):
    """What the main loop needs per image, decoded in loader workers. A `done` image (its PNG exists)
    yields only its stored prediction and GT, for the metric. With `skip_bad`, an image raising DataError
    yields {"id", "error": "PATH: problem"} instead."""

    def __init__(self, dataset, indices, done: set[int], out_dir: Path, transform, need_rgb: bool,
                 skip_bad: bool = False):
        self.dataset, self.indices, self.done, self.out_dir = dataset, indices, done, out_dir
        self.transform, self.need_rgb, self.skip_bad = transform, need_rgb, skip_bad

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        try:
            return self._item(self.indices[k])
        except DataError as e:
            if not self.skip_bad:
                raise
            return {"id": self.dataset.ids[self.indices[k]], "error": " ".join(str(e).split())}

    def _item(self, i: int) -> dict:
        ds = self.dataset
        if i in self.done:
            pred_path = self.out_dir / f"{ds.ids[i]}.png"
            gt, pred = ds.load_mask(i), read_mask(pred_path)
            if gt is not None and gt.shape != pred.shape:
                raise DataError(f"{pred_path}: pseudo mask is {pred.shape[1]}x{pred.shape[0]} but the ground truth "
                                f"of {ds.ids[i]} is {gt.shape[1]}x{gt.shape[0]}")
            return {"id": ds.ids[i], "mask": gt, "pred": pred}
        sample = checked_sample(ds, i)
        return {
            "id": sample.id,
            "mask": sample.mask,
            "tags": sample.tags,
            "size": (sample.image.height, sample.image.width),
            "image": self.transform(sample, ds.num_classes)["image"],
            "rgb": np.array(sample.image, dtype=np.uint8) if self.need_rgb else None,  # writable: pydensecrf needs it
        }


def _save_maps(path: Path, keep: list[int], probs: torch.Tensor) -> None:
    buf = io.BytesIO()
    np.savez(buf, probs=probs.cpu().numpy().astype(np.float16), classes=np.asarray(keep, dtype=np.int16))
    atomic_write_bytes(path, buf.getvalue())


def crf_pool(crf_cfg):
    """A CRFPool for this CRF config; a ConfigError now (not in a worker) when its backend cannot run."""
    from wsss.postprocess.crf import CRFPool, choose_backend

    choose_backend(crf_cfg)  # CRF workers run on the CPU
    return CRFPool(crf_cfg.workers)


def _override_infer(infer, **values) -> None:
    """The command line's inference settings over the run's (None: keep the run's)."""
    casts = {"scales": lambda v: [float(s) for s in v], "flip": bool, "bg_threshold": float, "absent": str}
    for key, value in values.items():
        if value is not None:
            setattr(infer, key, casts[key](value))


def _open_split(cfg, class_names: list[str], data_root, split: str, data_format: str | None, skip_bad: bool):
    """The split to label, checked against the run's classes. The run's format and tags file apply only
    when it is the run's own data root; elsewhere the layout is detected."""
    from wsss.data import open_dataset

    same_root = bool(cfg.data.root) and Path(data_root).resolve() == Path(cfg.data.root).resolve()
    fmt = data_format or (cfg.data.format if same_root else "auto")
    ds = open_dataset(data_root, split, fmt, cfg.data.tags_file if same_root else "", strict=not skip_bad)
    if ds.num_classes != len(class_names):
        raise DataError(f"{data_root}: {ds.num_classes} classes, but the run was trained on {len(class_names)} "
                        f"({', '.join(class_names)})")
    if list(ds.class_names) != list(class_names):
        print(f"warning: the class names of {data_root} differ from the run's classes.json", file=sys.stderr)
    return ds


def _claim_mask_settings(path: Path, infer, weights, split: str, crf: bool, predicted_tags: bool) -> None:
    """Resuming into a folder is only safe with the settings that made its masks (OUT/pseudo_label.json):
    refuse a mismatch. The CRF's worker count changes no mask, so it is left out and may differ."""
    crf_config = {k: v for k, v in dataclasses.asdict(infer.crf).items() if k != "workers"} if crf else {}
    claim_settings(path, {
        "checkpoint": str(Path(weights).resolve()),
        "split": split, "crf": bool(crf), "predicted_tags": bool(predicted_tags), "scales": infer.scales,
        "flip": infer.flip, "size": infer.size, "bg_threshold": infer.bg_threshold,
        "bg_alpha": infer.bg_alpha, "crf_config": crf_config,
        **({"bg_power": infer.bg_power} if infer.bg_power != 1.0 else {}),
        # only when not the default, so folders written before these keys existed still resume
        **({"resize": infer.resize} if infer.resize != "short" else {}),
        **({"normalise": infer.normalise} if infer.normalise != "full" else {}),
        **({"absent": infer.absent} if infer.absent != "drop" else {}),
    }, "pseudo masks")


def _extent_brief(record: dict) -> dict:
    """The extent guard's decision for summary.json: the knob, its shipped and chosen settings, and at each
    setting computed the share of the classifier's score the masks keep and of the pixels they cover."""
    return {"knob": record["knob"], "shipped": record["shipped"], "chosen": record["chosen"],
            "guard": record["guard"], "max_area": record["max_area"],
            "target_area": record["target_area"], "source": record["source"],
            "kept": {s: round(r["kept_ratio"], 4) for s, r in record["settings"].items()},
            "area": {s: round(r["area"], 4) for s, r in record["settings"].items()}}


def _write_sweep(out_dir: Path, sweep_cm, common: dict, proto: dict) -> dict:
    """OUT/sweep.json: the mIoU at each background threshold, and the best; returns those figures."""
    table = {t: sweep_cm[t].compute()["miou"] for t in sweep_cm.keys()}
    best, res = sweep_cm.best()
    atomic_write_json(out_dir / "sweep.json", {
        **common, "sweep": {f"{t:g}": m for t, m in table.items()}, "best_threshold": best, "best_miou": res["miou"],
        "protocol": {**proto, "bg_threshold": None, "bg_threshold_chosen": f"swept on {common['split']}"},
    })
    return {"sweep": table, "best_threshold": best, "best_miou": res["miou"]}


def pseudo_label(
    run_dir,
    data_root,
    split: str,
    out_dir,
    checkpoint=None,
    crf: bool = False,
    predicted_tags: bool = False,
    scales: list[float] | None = None,
    flip: bool | None = None,
    bg_threshold: float | None = None,
    absent: str | None = None,
    extent_guard: bool | None = None,
    save_maps: bool = False,
    sweep_thresholds: list[float] | None = None,
    device: str = "auto",
    progress: bool = True,
    data_format: str | None = None,
    skip_bad: bool = False,
    threshold_source: str = "",
) -> dict:
    """Write OUT/<id>.png pseudo masks for a split; with GT masks also the mIoU (returned, and written to
    OUT/summary.json in the `wsss evaluate` shape). Always: OUT/summary.json's (and the result's)
    "diagnostics", the masks' foreground figures and collapse alarm (wsss.diagnostics; on stderr when it fires).

    Streams: a loader with a bounded prefetch window, CRF workers with a bounded number of images in flight,
    so memory does not grow with the split. Resumable: an image whose PNG exists (and its maps file, with
    save_maps) is not recomputed, only read back for the metric, so a rerun after a kill finishes the job
    with the same bytes as an uninterrupted run. `save_maps`: OUT/maps/<id>.npz holding `probs` (float16
    [K, H, W]) and `classes` (the K kept class ids, background first). `sweep_thresholds` (methods without a
    background channel, a split with masks): the maps are computed once and the mIoU is taken for each
    constant background threshold; writes OUT/sweep.json and NO masks; returns
    {"sweep": {thr: miou}, "best_threshold", "best_miou", ...}.
    `extent_guard` (None: the run's `infer.extent_guard`; False: off; True: on, at the run's bar or 0.5):
    the masks' extent checked against the run's own classifier and moved to larger masks where they are far
    too small, to smaller ones where they cover more than `infer.extent_max_area` (wsss.engine.extent), not
    when the caller gives `bg_threshold` or sweeps; the decision is in OUT/summary.json's "extent".
    A bad image or mask is a DataError naming the file; with `skip_bad` it is left out (no PNG, no metric)
    and listed, "PATH: problem", in the result's and OUT/summary.json's "skipped" (as are split-file
    problems: ids naming missing images, repeated ids, paths).
    Every JSON written carries a `protocol` (wsss.provenance.protocol; `threshold_source` says how the
    background threshold was chosen, default "fixed") and OUT/env.json records the environment.
    """
    from wsss.evaluation.metrics import ConfusionMatrix, MultiConfusion
    from wsss.provenance import checkpoint_label, protocol, write_env

    t0 = time.time()
    dev = resolve_device(device)
    cfg, method, class_names = load_run(run_dir, checkpoint, dev)
    _override_infer(cfg.infer, scales=scales, flip=flip, bg_threshold=bg_threshold, absent=absent)
    ds = _open_split(cfg, class_names, data_root, split, data_format, skip_bad)
    skipped = [" ".join(p.split()) for p in getattr(ds, "problems", [])]
    out_dir = Path(out_dir)
    sweep = sorted({float(t) for t in sweep_thresholds}) if sweep_thresholds else None
    if sweep is not None:
        if method.has_background:
            raise ConfigError(f"a background-threshold sweep applies to methods without a background channel "
                              f"(CAM-style); {cfg.method.name} predicts its own background")
        if not ds.has_masks:
            raise DataError(f"{data_root}: split {split!r} has no ground-truth masks to sweep thresholds on")
        crf = save_maps = False
    used = run_checkpoint(run_dir, checkpoint)
    extent = None
    if extent_guard is False:
        cfg.infer.extent_guard = 0.0
    elif extent_guard and cfg.infer.extent_guard <= 0:  # asked for on a run whose config has it off
        cfg.infer.extent_guard = DEFAULT_GUARD
    if sweep is None and bg_threshold is None:  # a threshold the caller chose or sweeps is left as it is
        extent = apply_extent_guard(run_dir, cfg, method, used, ds)
        if extent is not None and extent["chosen"] != extent["shipped"]:
            where = "labelled" if extent["source"] == LABELLED_SPLIT else "train"
            threshold_source = threshold_source or f"extent guard on {extent['calibration_images']} {where} images"
    pool = crf_pool(cfg.infer.crf) if crf else None

    done: set[int] = set()
    if sweep is None:
        _claim_mask_settings(out_dir / "pseudo_label.json", cfg.infer, checkpoint or run_dir, split, crf, predicted_tags)
        for i, id_ in enumerate(ds.ids):
            if (out_dir / f"{id_}.png").is_file() and (not save_maps or (out_dir / "maps" / f"{id_}.npz").is_file()):
                done.add(i)
    indices = list(range(len(ds)))  # done images too: their PNGs are read back for the metric and diagnostics
    workers = resolve_workers(cfg.data.num_workers)
    items = _Items(ds, indices, done, out_dir, eval_transform(cfg), need_rgb=crf, skip_bad=skip_bad)
    loader = torch.utils.data.DataLoader(
        items, batch_size=None, collate_fn=_identity, num_workers=workers,
        prefetch_factor=2 if workers else None, pin_memory=dev.type == "cuda",
    )
    cm = ConfusionMatrix(ds.num_classes) if ds.has_masks else None
    diag = MaskStats()  # the collapse alarm's counts (wsss.diagnostics), over every mask of the folder
    sweep_cm = MultiConfusion(ds.num_classes, sweep) if sweep else None
    out_dir.mkdir(parents=True, exist_ok=True)
    write_env(out_dir)
    stage = "stage2" if getattr(method, "target", "label") == "mask" else ("crf" if crf else "seeds")
    proto = protocol(split, stage, predicted_tags, cfg.infer, bool(crf), bool(method.has_background),
                     checkpoint_label(used, cfg.data.val_split), threshold_source)
    pending: dict[str, tuple[list[int], np.ndarray | None]] = {}  # CRF in flight: id -> (kept classes, gt)
    computed = 0

    def finish(id_: str, pred: np.ndarray, gt) -> None:
        write_mask(out_dir / f"{id_}.png", pred)
        diag.add(pred)
        if cm is not None:
            cm.update(torch.from_numpy(pred), mask_tensor(gt))

    def work():
        """Handles every image; yields the CRF jobs (id, rgb, probs) for the pool."""
        nonlocal computed
        with loader_iter(loader) as batches:
            for item in _progress(batches, progress, f"pseudo-label {split}", total=len(items)):
                if "error" in item:  # skip_bad
                    print(f"warning: skipped {item['error']}", file=sys.stderr)
                    skipped.append(item["error"])
                    continue
                gt = item["mask"]
                if "pred" in item:  # finished by an earlier run
                    diag.add(item["pred"])
                    if cm is not None:
                        cm.update(mask_tensor(item["pred"]), mask_tensor(gt))
                    continue
                computed += 1
                keep, probs = seed_probs(method, item["image"], None if predicted_tags else item["tags"],
                                         cfg.infer, item["size"])
                if sweep_cm is not None:
                    gt_t = mask_tensor(gt)
                    for t in sweep:
                        sweep_cm.update(t, _threshold_mask(keep, probs, t).cpu(), gt_t)
                    continue
                if save_maps:  # before the PNG: a PNG on disk means the image is complete
                    _save_maps(out_dir / "maps" / f"{item['id']}.npz", keep, probs)
                if pool is None:
                    finish(item["id"], seed_mask(keep, probs), gt)
                else:
                    keep, probs = crf_channels(method, keep, probs)
                    pending[item["id"]] = (keep, gt)
                    yield item["id"], item["rgb"], probs.cpu().numpy()

    if pool is None:
        for _ in work():
            pass
    else:
        with pool:
            for id_, idx in pool.map(work(), cfg.infer.crf):
                keep, gt = pending.pop(id_)
                finish(id_, np.asarray(keep, dtype=np.uint8)[np.asarray(idx)], gt)

    result: dict = {"split": split, "num_images": len(ds), "computed": computed, "out_dir": str(out_dir)}
    if skipped:
        result["skipped"] = skipped
    common = {"split": split, "predicted_tags": bool(predicted_tags), "scales": cfg.infer.scales, "flip": cfg.infer.flip}
    if sweep_cm is not None:
        result.update(_write_sweep(out_dir, sweep_cm, common, proto))
    else:  # the metric with masks; the diagnostics always
        summary = {**(cm.as_json(ds.class_names) if cm is not None else {}), "num_images": len(ds), "split": split, "crf": bool(crf),
                   **common, **({"skipped": skipped} if skipped else {}), "protocol": proto,
                   **({"extent": _extent_brief(extent)} if extent else {}),
                   "diagnostics": diag.summary(has_background=bool(method.has_background) or not method.uses_tags)}
        if summary["diagnostics"]["alarm"]:
            print(f"warning: {out_dir}: {summary['diagnostics']['alarm']}", file=sys.stderr)
        atomic_write_json(out_dir / "summary.json", summary)  # no timings: a resumed run writes the same bytes
        result.update(summary)
    result["seconds"] = round(time.time() - t0, 3)
    return result
