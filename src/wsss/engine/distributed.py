"""Distributed helpers: torchrun env init (NCCL on CUDA, gloo on CPU), DDP wrapping, rank-0 gating,
all-reduce for averaged logs. Every helper is a no-op in a single process, so callers never branch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (or WORLD_SIZE=1) this is a single process on `device`.
    """
    from wsss.engine.inference import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, False)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
        owns = True
    return DistInfo(rank, world, local_rank, dev, owns)


def cleanup(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place; returned for chaining)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_dict(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over ranks (same keys on every rank, e.g. the loss terms of an epoch)."""
    if not is_dist() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on any rank: every rank takes the same branch (e.g. stop on a NaN)."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_object(obj):
    """A list with every rank's `obj` (rank order); `[obj]` in a single process."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sync_batchnorm(module: nn.Module, info: DistInfo) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when distributed on GPU, so a BN layer sees the global batch, not
    batch_size / world_size images (the quality of a run then does not depend on the process count).
    torch implements SyncBatchNorm for accelerators only: on CPU (gloo) the module is returned as is."""
    if not info.distributed or info.device.type == "cpu":
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def wrap_ddp(module: nn.Module, info: DistInfo, find_unused_parameters: bool = True) -> nn.Module:
    """DistributedDataParallel over the parameters that require grad *now*.

    DDP registers its gradient hooks at construction, so the trainer re-wraps when it unfreezes the
    backbone. find_unused_parameters defaults to True: a method may skip parameters on some steps
    (a PCE projection during its warm-up, a branch used every other step), and a missing gradient
    would otherwise hang the all-reduce. A method can opt out with `ddp_find_unused_parameters = False`.
    """
    if not info.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids, output_device=ids[0] if ids else None,
               find_unused_parameters=find_unused_parameters)


def shard(n: int, info: DistInfo) -> list[int]:
    """This rank's indices of n items, strided so the shards are disjoint and balanced."""
    return list(range(info.rank, n, info.world_size))
