"""The training loop: seeded data, two-group optimizer with a frozen warm-up, per-step schedule, AMP,
DDP, per-epoch val pseudo-mask mIoU, atomic checkpoints and an exact resume.

Run folder (docs/architecture.md): config.yaml, classes.json, log.jsonl (one line per epoch), last.pt
(every epoch) and best.pt (best val mIoU).

Exact resume: last.pt holds the model, optimizer, scheduler, scaler, counters and every RNG state
(torch CPU/CUDA, numpy, python, the loader generator that seeds workers) of every rank, as tensors and
plain Python values (loadable with weights_only=True). The sampler's order is a function of
(seed, epoch) (DistributedSampler), and loader workers are re-created each epoch from the saved
generator, so a run killed at any point and resumed ends with the same weights as one never stopped
(bit-exact on CPU; on GPU up to non-deterministic kernels).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wsss.diagnostics import picks_tags, tensorboard_scalars, train_check
from wsss.engine import distributed as D
from wsss.engine.inference import evaluate_seeds, loader_iter, resolve_workers
from wsss.errors import ConfigError, DataError, TrainingError
from wsss.io import atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint

# ----------------------------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader generator; numpy and random follow from it.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def rng_state(loader_gen: torch.Generator) -> dict:
    """Every RNG state as tensors / plain values, so weights_only=True can load it."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # this process's GPU only (one per rank): querying every device would touch all of them
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": [version, list(internal), py_gauss],
        "loader": loader_gen.get_state(),
    }


def set_rng_state(state: dict, loader_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    loader_gen.set_state(state["loader"])


# ------------------------------------------------------------------------------------------------ pieces


class _LossModule(nn.Module):
    """Makes forward_losses the module's forward, so DDP's gradient sync sees it."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, images, labels, epoch: int):
        return self.method.forward_losses(images, labels, epoch)


def _open_datasets(cfg):
    """(train, val or None). Val only when the split exists and has masks; a val split that exists but
    cannot be used is an error. With `data.skip_bad`, split files are read leniently: ids naming missing
    images, repeated ids or paths are dropped and their problems listed in `dataset.problems` (an empty
    split stays an error)."""
    from wsss.data import available_splits, open_dataset

    d = cfg.data
    train = open_dataset(d.root, d.train_split, d.format, d.tags_file, strict=not d.skip_bad)
    val = None
    if d.val_split:
        try:
            val = open_dataset(d.root, d.val_split, d.format, d.tags_file, strict=not d.skip_bad)
        except DataError as e:
            if d.val_split in available_splits(d.root, d.format):
                raise
            print(f"note: no validation ({e})", file=sys.stderr)
        if val is not None and (not val.has_masks or len(val) == 0):
            val = None
    return train, val


def build_optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    t = cfg.train
    groups = [g for g in groups if g["params"]]
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay, eps=t.adam_eps)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, eps=t.adam_eps)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    raise ConfigError(f"train.optimizer: unknown optimizer {t.optimizer!r} (adam, adamw, sgd)")


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "poly":
        return (1.0 - p) ** 0.9
    if kind == "constant":
        return 1.0
    raise ConfigError(f"train.scheduler: unknown schedule {kind!r} (cosine, poly, constant)")


def lr_at(step: int, total: int, warmup: int, kind: str, base: float, warmup_lr: float = 0.0,
          min_lr: float = 0.0) -> float:
    """The lr of a group whose base lr is `base` at optimizer step `step`, with timm's `warmup_lr` (the
    linear warm-up starts there) and `min_lr` (the decay ends there); both 0: base * lr_factor."""
    if step < warmup:
        return warmup_lr + (base - warmup_lr) * (step + 1) / warmup
    return min_lr + (base - min_lr) * lr_factor(step, total, warmup, kind)


def build_scheduler(opt: torch.optim.Optimizer, cfg, total: int, warm: int, cycles: list[int] | None = None):
    """(LambdaLR over the whole run, the base lrs its lambdas read). With warmup_lr / min_lr the lambdas
    are per group (those lrs are absolute, as timm's); `unfreeze_optimizer` changes the bases. `cycles`:
    a one-item list the trainer holds, 1 once `restart_schedule` has run: the schedule then starts again
    from its top over `train.extend_unrecognised` x its length (a warm restart into one long schedule)."""
    t = cfg.train
    lr_factor(0, total, warm, t.scheduler)  # validate the name before training
    bases = [g["lr"] for g in opt.param_groups]
    cycles = cycles if cycles is not None else [0]

    def local(s: int) -> tuple[int, int]:  # (step within the current schedule, its length)
        return (s, total) if cycles[0] == 0 else (s - total, total * max(1, t.extend_unrecognised))

    if t.warmup_lr == 0 and t.min_lr == 0:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(*local(s), warm, t.scheduler)), bases

    def group_lambda(i: int):
        def f(s: int) -> float:
            b = bases[i]
            return lr_at(*local(s), warm, t.scheduler, b, t.warmup_lr, t.min_lr) / b if b > 0 else 0.0
        return f

    return torch.optim.lr_scheduler.LambdaLR(opt, [group_lambda(i) for i in range(len(bases))]), bases


def restart_schedule(opt: torch.optim.Optimizer, sched, cycles: list[int]) -> None:
    """Begin the extra schedule (`train.extend_unrecognised`): the optimizer's moments are kept, the next
    step's lr is the schedule's first again."""
    cycles[0] += 1
    for i, g in enumerate(opt.param_groups):  # the lr of the next step, as LambdaLR would set it
        g["lr"] = sched.base_lrs[i] * sched.lr_lambdas[i](sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]


FIRST_SCHEDULE = "first_schedule.pt"  # RUN/first_schedule.pt: the weights when a run extends


def _extend(cfg, method, train_raw, val_raw, info, record: dict) -> bool:
    """At the end of the first schedule with `train.extend_unrecognised` set: True (and the record and the
    console say so) when the classifier does not yet pick the tags, at train.extend_gain, by any of three
    counts: the alarm's check on its fixed train images, the last epoch's batches (the `tag_hit` a method
    logs), and with `train.extend_on_val` the same check on the val split's first images (tags only).
    Training then goes on for the longer schedule."""
    from wsss.diagnostics import recognised_summary

    method.eval()  # every check below scores whole images; the next epoch sets train mode again
    masks = record.get("masks")
    if masks is None:  # no validation pass this epoch: the same check, on the same fixed train images
        masks = train_check(method, train_raw, cfg, info)
        if masks is None:  # a method without class maps: nothing to decide by
            return False
        record["masks"] = masks
    checked = recognised_summary(masks, cfg.train.extend_gain)
    held_out, val_checked = None, None  # the same check on images the classifier has not trained on
    if cfg.train.extend_on_val and val_raw is not None:
        held_out = train_check(method, val_raw, cfg, info)
        if held_out is not None and "top_hit_rate" in held_out:
            record["val_check"] = {k: held_out[k] for k in ("top_hit_rate", "top_hit_chance", "scored")}
            val_checked = recognised_summary(held_out, cfg.train.extend_gain)
    # The batches ask the same question of every train image (augmented, over the epoch), the check of 32.
    # On the ten-digit data (F1L, RESULTS.md "Transfer") the check passed at 87.5% while the last
    # epoch's batches stood at 79% (bar 84%), and the 12 epochs more took val from 0.248 to 0.397.
    logged = "tag_hit" in record
    batches = picks_tags(record["tag_hit"], record["tag_chance"], cfg.train.extend_gain) if logged else None
    if checked is not False and batches is not False and val_checked is not False:
        return False
    record["extended"] = True
    more = cfg.train.epochs * cfg.train.extend_unrecognised
    if info.is_main:
        counts = [f"{m['top_hit_rate']:.0%} of {m['images']} {split} images (chance {m['top_hit_chance']:.0%})"
                  for split, m in (("train", masks), ("val", held_out)) if m is not None and "top_hit_rate" in m]
        if logged:
            counts.append(f"{record['tag_hit']:.0%} of the last epoch's batches (chance {record['tag_chance']:.0%})")
        print(f"note: epoch {record['epoch']}: the classifier does not pick the tags yet (top class a tag in "
              f"{' and '.join(counts)}): "
              f"{more} more epochs, the lr schedule restarted (train.extend_unrecognised: "
              f"{cfg.train.extend_unrecognised})", file=sys.stderr)
    return True


def check_phases(cfg) -> None:
    t = cfg.train
    if (t.lr_after_freeze > 0 or t.reset_optimizer_after_freeze) and t.freeze_backbone_epochs <= 0:
        raise ConfigError("train.lr_after_freeze / train.reset_optimizer_after_freeze act when the backbone starts "
                          "training: they need train.freeze_backbone_epochs > 0")
    if not 0 < t.extend_gain <= 1:
        raise ConfigError(f"train.extend_gain must be within (0, 1] (a share of the way from chance to every image), "
                          f"got {t.extend_gain}")
    if t.lr_after_freeze < 0 or t.warmup_lr < 0 or t.min_lr < 0:
        raise ConfigError("train.lr_after_freeze, train.warmup_lr and train.min_lr must be >= 0")
    if t.lr_after_freeze > 0 and t.lr <= 0:
        raise ConfigError("train.lr_after_freeze scales the groups' lrs: train.lr must be > 0")


def unfreeze_optimizer(opt: torch.optim.Optimizer, sched, bases: list[float], cfg) -> None:
    """At the first epoch the backbone trains: with `train.reset_optimizer_after_freeze` a fresh optimizer
    (its per-parameter state dropped: Adam's moments and step count), with `train.lr_after_freeze` every
    group's base lr scaled by lr_after_freeze / lr (head: lr_after_freeze; backbone: x backbone_lr_mult).
    Both are in the optimizer's and scheduler's state dicts, so a resume after this point needs nothing."""
    t = cfg.train
    if t.reset_optimizer_after_freeze:
        opt.state.clear()
    if t.lr_after_freeze > 0:
        ratio = t.lr_after_freeze / t.lr
        for i, g in enumerate(opt.param_groups):
            bases[i] = sched.base_lrs[i] = g["initial_lr"] = sched.base_lrs[i] * ratio
        for i, g in enumerate(opt.param_groups):  # the lr of the next step, as LambdaLR would set it
            g["lr"] = sched.base_lrs[i] * sched.lr_lambdas[i](sched.last_epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]


def _freeze_bn_affine(method, head: list, live: list, dead: list) -> tuple[list, list]:
    """`train.freeze_bn_affine`: the backbone BatchNorm weights and biases move from the trained to the
    never-trained parameters (PSA, SEAM: requires_grad False, not in the optimizer)."""
    bn = {id(p) for b in method.backbone_blocks() for m in b.modules()
          if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters(recurse=False)}
    bn -= {id(p) for p in head}
    return [p for p in live if id(p) not in bn], [*dead, *(p for p in live if id(p) in bn)]


def _amp(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler)."""
    if amp == "auto":
        return (torch.bfloat16 if device.type == "cuda" else None), False
    if amp == "bf16":
        return torch.bfloat16, False
    if amp == "fp16":
        return torch.float16, True
    if amp == "off":
        return None, False
    raise ConfigError(f"train.amp: unknown mode {amp!r} (auto, bf16, fp16, off)")


def _split_params(method, trainable_blocks: int):
    """(head params, backbone params trained after the warm-up, backbone params never trained, blocks
    frozen for good). Parameters the method itself froze (an EMA teacher) are left alone."""
    head = list(method.head_parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in method.parameters() if p.requires_grad and id(p) not in head_ids]
    blocks = list(method.backbone_blocks())
    if trainable_blocks < 0:
        return head, backbone, [], []
    live = blocks[len(blocks) - trainable_blocks:] if trainable_blocks > 0 else []
    live_ids = {id(p) for b in live for p in b.parameters()}
    return (head, [p for p in backbone if id(p) in live_ids], [p for p in backbone if id(p) not in live_ids],
            [b for b in blocks if all(b is not x for x in live)])


def _freeze_bn(modules) -> None:
    """Frozen blocks keep their BatchNorm statistics too (eval mode), as a frozen backbone should."""
    for b in modules:
        for m in b.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _log_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()] if path.is_file() else []


def _truncate_log(path: Path, epochs_done: int) -> None:
    """Drop log lines of epochs after the checkpoint (written before a kill, redone on resume)."""
    lines = _log_lines(path)
    keep = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= epochs_done]
    if keep != lines:
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _append_log(path: Path, record: dict) -> None:
    """Append one line, atomically (the log is rewritten through a temp file: a kill never leaves half a
    line behind)."""
    atomic_write_text(path, "".join(ln + "\n" for ln in [*_log_lines(path), json.dumps(record)]))


def _record_skipped(path: Path, messages: list[str]) -> None:
    """RUN/skipped.txt: every sample skipped with data.skip_bad so far ("PATH: problem" a line)."""
    old = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    new = [m for m in messages if m not in old]
    if new:
        print("skipped (data.skip_bad):\n  " + "\n  ".join(new), file=sys.stderr)
        atomic_write_text(path, "".join(m + "\n" for m in [*old, *new]))


def _batch_skipped(batch: dict) -> list[str]:
    """The skip messages a batch carries (TransformedDataset with skip_bad, see there)."""
    return [m for text in batch.get("skipped", ()) for m in text.split("\n") if m]


# ------------------------------------------------------------------------------------------------- train


def train(cfg, out_dir, resume: bool = False, progress: bool = True, train_dataset=None) -> dict:
    """Train `cfg`'s method; RUN = out_dir. Under torchrun every rank calls this (DDP, gloo or NCCL).

    `resume=True` continues from RUN/last.pt (from scratch when there is none); without it an existing
    last.pt is an error, so a finished run is never silently overwritten. `train_dataset`: a prepared
    SegmentationDataset to train on instead of `cfg.data.train_split` (`wsss segment` passes the split
    with its masks replaced by pseudo masks).
    Returns {"epochs", "best_miou", "miou" (last val), "seconds", "out_dir"}.
    """
    info = D.init_distributed("auto")
    try:
        return _train(cfg, Path(out_dir), resume, progress, info, train_dataset)
    finally:
        D.cleanup(info)


def _write_run_header(cfg, out: Path, info: D.DistInfo, class_names: list[str], split_problems: list[str]) -> None:
    """What a run folder holds before its first epoch: config.yaml, env.json, classes.json, skipped.txt."""
    from wsss.config import save_config
    from wsss.provenance import write_env

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    write_env(out, info.world_size)
    atomic_write_json(out / "classes.json", class_names)
    _record_skipped(out / "skipped.txt", [" ".join(p.split()) for p in split_problems])  # data.skip_bad only


def _make_loader(cfg, train_raw, target: str, info: D.DistInfo):
    """The training data. The sampler's order depends on (seed, epoch) only and the generator seeds the
    workers; with per-sample augmentation seeds, the global batch of a step is the same images, augmented
    alike, whatever the number of processes or loader workers."""
    from wsss.data.transforms import TrainTransform, TransformedDataset

    t = cfg.train
    if cfg.data.augment == "timm" and target == "mask":
        raise ConfigError("data.augment: timm moves pixels without their mask: it cannot train on pseudo masks "
                          "(stage 2); use data.augment: crop")
    dataset = TransformedDataset(train_raw, TrainTransform(cfg.data), skip_bad=cfg.data.skip_bad, seed=t.seed)
    per_batch = max(1, t.batch_size // info.world_size)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                                  shuffle=True, seed=t.seed)
    loader_gen = torch.Generator().manual_seed(t.seed + 7919 * (info.rank + 1))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=per_batch, sampler=sampler, num_workers=resolve_workers(cfg.data.num_workers),
        drop_last=len(sampler) >= per_batch, pin_memory=info.device.type == "cuda", worker_init_fn=_worker_init,
        generator=loader_gen,
        persistent_workers=False,  # fresh workers each epoch, seeded from the saved generator: exact resume
    )
    return dataset, sampler, loader, loader_gen


def _load_last(last_path: Path, method, opt, sched, base_lrs: list[float], scaler, cycles: list[int],
               loader_gen: torch.Generator, info: D.DistInfo) -> tuple[int, int, float | None, float | None]:
    """Restore everything last.pt holds, in place; returns (epoch, global step, best mIoU, last mIoU)."""
    state = load_checkpoint(last_path)
    method.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    base_lrs[:] = sched.base_lrs  # phase 2's bases when the run resumes after the unfreeze
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    cycles[0] = state.get("cycles", 0)
    method.recognised = bool(state.get("recognised", False))
    rngs = state["rng"]
    set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0], loader_gen)
    return state["epoch"], state["global_step"], state.get("best_miou"), state.get("miou")


def _tensorboard_epoch(tb, record: dict, epoch: int) -> None:
    if tb is None:
        return
    for k in ("miou", "img_s", "seconds", "val_seconds"):
        if isinstance(record.get(k), (int, float)):
            tb.add_scalar(f"epoch/{k}", record[k], epoch)
    tensorboard_scalars(tb, record.get("masks") or {}, epoch)
    tb.flush()


def _optimizer_for(cfg, method):
    """(optimizer, trainable parameters, the live backbone parameters, the frozen blocks): the head at
    train.lr, the last `trainable_blocks` of the backbone at lr x backbone_lr_mult, the rest frozen."""
    t = cfg.train
    head, bb_live, bb_dead, dead_blocks = _split_params(method, t.trainable_blocks)
    if t.freeze_bn and t.freeze_bn_affine:
        bb_live, bb_dead = _freeze_bn_affine(method, head, bb_live, bb_dead)
    check_phases(cfg)
    for p in bb_dead:
        p.requires_grad_(False)
    opt = build_optimizer(cfg, [{"params": head, "lr": t.lr},
                                {"params": bb_live, "lr": t.lr * t.backbone_lr_mult}])
    return opt, head + bb_live, bb_live, dead_blocks


def _record_epoch(out: Path, record: dict, skipped: list[str], tb, progress: bool, state: dict) -> None:
    """The main process's end of an epoch: skipped samples, log line, TensorBoard, last.pt, console."""
    _record_skipped(out / "skipped.txt", skipped)
    _append_log(out / "log.jsonl", record)  # before last.pt: a kill between them is undone by _truncate_log
    _tensorboard_epoch(tb, record, record["epoch"])
    save_checkpoint(out / "last.pt", state)
    if progress:
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        print(shown, file=sys.stderr)


def _train(cfg, out: Path, resume: bool, progress: bool, info: D.DistInfo, train_dataset=None) -> dict:
    from wsss.methods import create_method

    t_start = time.time()
    t = cfg.train
    dev = info.device
    main = info.is_main
    last_path, best_path, log_path = out / "last.pt", out / "best.pt", out / "log.jsonl"
    if last_path.is_file() and not resume:
        raise TrainingError(f"{out}: already holds a run (last.pt); pass --resume to continue it or choose another --out")
    if t.batch_size < info.world_size:
        raise ConfigError(f"train.batch_size {t.batch_size} is the global batch: it must be >= the {info.world_size} processes")

    seed_everything(t.seed)  # same on every rank: identical initial weights
    train_raw, val_raw = _open_datasets(cfg)
    if train_dataset is not None:  # prepared by the caller, e.g. stage 2: train masks = pseudo masks
        train_raw = train_dataset
    if len(train_raw) == 0:  # with data.skip_bad, the split file's problems say why
        raise DataError("; ".join(getattr(train_raw, "problems", []))
                        or f"{cfg.data.root}: split {cfg.data.train_split!r} is empty")
    class_names = list(train_raw.class_names)
    method = create_method(cfg, len(class_names)).to(dev)
    if t.sync_bn:
        method = D.sync_batchnorm(method, info)
    if t.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if main:
        _write_run_header(cfg, out, info, class_names, [*getattr(train_raw, "problems", []),
                                                        *getattr(val_raw, "problems", [])])

    opt, trainable, bb_live, dead_blocks = _optimizer_for(cfg, method)

    dataset, sampler, loader, loader_gen = _make_loader(cfg, train_raw, getattr(method, "target", "label"), info)
    steps = len(loader) if t.max_steps_per_epoch <= 0 else min(len(loader), t.max_steps_per_epoch)
    total, warm = t.epochs * steps, int(round(t.warmup_epochs * steps))
    cycles = [0]  # 1 once the extra schedule of train.extend_unrecognised has begun
    sched, base_lrs = build_scheduler(opt, cfg, total, warm, cycles)
    amp_dtype, use_scaler = _amp(t.amp, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=use_scaler)

    start_epoch, step, best, last_miou = 0, 0, None, None
    if resume and last_path.is_file():
        start_epoch, step, best, last_miou = _load_last(last_path, method, opt, sched, base_lrs, scaler, cycles,
                                                        loader_gen, info)
        if main:
            _truncate_log(log_path, start_epoch)
            print(f"resumed {out} at epoch {start_epoch}/{t.epochs}", file=sys.stderr)
    else:
        if resume and main:
            print(f"note: {last_path} not found, starting from scratch", file=sys.stderr)
        seed_everything(t.seed + 1 + info.rank)  # the data/augmentation stream differs per rank
    D.barrier()

    tb = _tensorboard(out) if t.tensorboard and main else None
    model, phase = None, None
    epoch = start_epoch
    # the run ends after t.epochs, or after the extra (extend_unrecognised x t.epochs) an unrecognising
    # classifier earns at that point
    while epoch < (end := t.epochs * (1 + cycles[0] * t.extend_unrecognised)):
        frozen = epoch < t.freeze_backbone_epochs
        if t.freeze_backbone_epochs > 0 and epoch == t.freeze_backbone_epochs:  # once, resumed or not
            unfreeze_optimizer(opt, sched, base_lrs, cfg)
        if phase != frozen:  # (re)wrap: DDP only syncs the parameters that require grad when built
            for p in bb_live:
                p.requires_grad_(not frozen)
            model = D.wrap_ddp(_LossModule(method), info, getattr(method, "ddp_find_unused_parameters", True))
            if t.compile:
                model = torch.compile(model)
            phase = frozen
        method.train()
        _freeze_bn(list(method.backbone_blocks()) if frozen or t.freeze_bn else dead_blocks)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)

        t0 = time.time()
        sums, skipped, n_steps, n_images, step = _run_epoch(
            cfg, method, model, loader, opt, sched, scaler, amp_dtype, trainable, dev, epoch, step, steps,
            tb, progress and main, last_path, of=end)
        seconds = time.time() - t0
        avg = D.all_reduce_mean_dict({k: v / max(1, n_steps) for k, v in sums.items()}, dev)
        record = {"epoch": epoch + 1, **avg, "lr": opt.param_groups[0]["lr"], "step": step,
                  "seconds": round(seconds, 3), "img_s": round(n_images * info.world_size / max(seconds, 1e-9), 2)}
        if "tag_hit" in avg:  # for the next epoch (pce.after_recognition): on while the tags are picked
            method.recognised = record["recognised"] = picks_tags(avg["tag_hit"], avg["tag_chance"],
                                                                  method.recognition_gain)

        if t.val_every > 0 and ((epoch + 1) % t.val_every == 0 or epoch + 1 == end):
            miou, best = _validate(cfg, method, train_raw, val_raw, info, record, skipped, best, best_path,
                                   epoch, progress and main)
            last_miou = miou if val_raw is not None else last_miou
        first_end = epoch + 1 == end and cycles[0] == 0 and t.extend_unrecognised > 0
        if first_end and _extend(cfg, method, train_raw, val_raw, info, record):
            # the run was just judged not to pick its tags, and its lr jumps back to the top: a loss held
            # back until recognition (PCE) waits for an epoch of the extra schedule that passes again (F1
            # seed 2: one PCE epoch at the restarted lr took the batches' tag hit from 0.64 to 0.21, never back)
            if "recognised" in record:
                method.recognised = record["recognised"] = False
            if main:  # the weights before the extra schedule, for `pseudo-label --checkpoint RUN/first_schedule.pt`:
                #       longer training can spread the maps of a nearly recognising classifier (RESULTS.md, "Transfer")
                save_checkpoint(out / FIRST_SCHEDULE, {"model": method.state_dict(), "epoch": epoch + 1})
            restart_schedule(opt, sched, cycles)
        rng = D.all_gather_object(rng_state(loader_gen))  # every rank's, for an exact multi-process resume
        if cfg.data.skip_bad:  # every rank's skips, listed in log.jsonl and RUN/skipped.txt
            skipped = dict.fromkeys(m for rank in D.all_gather_object(list(skipped)) for m in rank)
            if skipped:
                record["skipped"] = list(skipped)
        if main:
            _record_epoch(out, record, list(skipped), tb, progress, {
                "model": method.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch + 1, "global_step": step, "best_miou": best,
                "miou": last_miou, "rng": rng, "world_size": info.world_size, "cycles": cycles[0],
                "recognised": method.recognised,
            })
        D.barrier()
        epoch += 1

    if tb is not None:
        tb.close()
    return {"epochs": end, "best_miou": best, "miou": last_miou,
            "seconds": round(time.time() - t_start, 3), "out_dir": str(out)}


def _run_epoch(cfg, method, model, loader, opt, sched, scaler, amp_dtype, trainable, dev, epoch: int, step: int,
               steps: int, tb, show: bool, last_path: Path, of: int | None = None):
    """One epoch's optimisation steps. Returns (loss sums, skipped samples, steps, images, global step)."""
    t = cfg.train
    sums: dict[str, float] = defaultdict(float)
    skipped: dict[str, None] = {}  # data.skip_bad: this epoch's skipped samples, in order
    n_steps, n_images = 0, 0
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{of or t.epochs}", dynamic_ncols=True, leave=False)
    # On an error too: the bar is cleared before the CLI prints it, the loader's workers are stopped.
    with loader_iter(loader) as batches, bar if bar is not None else contextlib.nullcontext():
        for batch in batches:
            if n_steps >= steps:
                break
            skipped.update(dict.fromkeys(_batch_skipped(batch)))
            images = batch["image"].to(dev, non_blocking=True)
            labels = batch[method.target].to(dev, non_blocking=True)  # "label", or "mask" (stage 2)
            if t.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext():
                losses = model(images, labels, epoch)
            loss = losses["loss"]
            terms = {k: float(v.detach().float()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}
            if D.any_rank(not math.isfinite(terms["loss"]), dev):
                shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                raise TrainingError(
                    f"non-finite loss at epoch {epoch + 1}, step {n_steps + 1} (global step {step + 1}): {shown}. "
                    f"{last_path} keeps the last good epoch; lower train.lr, set train.grad_clip or train.amp=off"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_([p for p in trainable if p.grad is not None], t.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            method.after_step()
            step += 1
            n_steps += 1
            n_images += images.shape[0]
            for k, v in terms.items():
                sums[k] += v
            if tb is not None:
                for k, v in terms.items():
                    tb.add_scalar(f"train/{k}", v, step)
                tb.add_scalar("train/lr", opt.param_groups[0]["lr"], step)
            if bar is not None:
                bar.update(1)
                if n_steps % max(1, t.log_every) == 0 or n_steps == steps:
                    bar.set_postfix({k: f"{v / n_steps:.4f}" for k, v in sums.items()}, refresh=False)
    return sums, skipped, n_steps, n_images, step


def _validate(cfg, method, train_raw, val_raw, info, record: dict, skipped: dict, best, best_path: Path,
              epoch: int, show: bool):
    """The validation pass: val pseudo-mask mIoU (when val exists; best.pt on improvement) and the
    collapse check on a fixed train subset, which needs no GT. Updates `record` and `skipped`;
    returns (miou or None, best)."""
    miou = None
    if val_raw is not None:
        tv = time.time()
        method.eval()
        val_skipped: list[str] = []
        cm = evaluate_seeds(method, val_raw, cfg, D.shard(len(val_raw), info), progress=show,
                            **({"skipped": val_skipped} if cfg.data.skip_bad else {}))
        skipped.update(dict.fromkeys(val_skipped))
        cm.all_reduce()
        miou = cm.compute()["miou"]
        record.update(miou=miou, val_seconds=round(time.time() - tv, 3))
        if miou is not None and (best is None or miou > best):
            best = miou
            if info.is_main:
                save_checkpoint(best_path, {"model": method.state_dict(), "epoch": epoch + 1, "miou": best})
    method.eval()
    masks = train_check(method, train_raw, cfg, info)  # the collapse alarm, wsss.diagnostics
    if masks is not None:  # None: a method without class maps (AffinityNet)
        record["masks"] = masks
    if info.is_main and (masks or {}).get("alarm"):
        print(f"warning: epoch {epoch + 1}: {masks['alarm']}", file=sys.stderr)
    return miou, best


def _tensorboard(out: Path):
    """A SummaryWriter on RUN/tb (train.tensorboard); the tensorboard package is optional."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"train.tensorboard needs the tensorboard package (pip install tensorboard): {e}") from None
    return SummaryWriter(log_dir=str(out / "tb"))
