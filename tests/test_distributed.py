"""Two CPU processes with gloo: DDP training completes, rank 0 alone writes the run, shards are disjoint."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from engine_fakes import make_voc
from wsss.io import load_checkpoint

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, voc: str, out: str, record: str) -> None:
    # what torchrun would set
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from engine_fakes import make_cfg as mk  # registers the fake method in this process
    from wsss.data.transforms import TransformedDataset
    from wsss.engine.trainer import train

    seen: list[str] = []
    original = TransformedDataset.__getitem__

    def spy(self, index):
        item = original(self, index)
        seen.append(item["id"])
        return item

    TransformedDataset.__getitem__ = spy
    import wsss.engine.inference as inf

    val_seen: list[int] = []
    weights: list[float] = []
    evaluate = inf.evaluate_seeds

    def spy_eval(method, dataset, cfg, indices=None, progress=False):
        val_seen.extend(indices)
        weights[:] = [float(p.double().sum()) for p in method.parameters()]
        return evaluate(method, dataset, cfg, indices, progress)

    import wsss.engine.trainer as tr

    tr.evaluate_seeds = spy_eval
    summary = train(mk(Path(voc), epochs=2, batch_size=4, freeze_backbone_epochs=1), out, progress=False)
    Path(record, f"rank{rank}.json").write_text(json.dumps({"train": seen, "val": val_seen, "weights": weights,
                                                                   "summary": summary}))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_process_gloo(tmp_path):
    voc = make_voc(tmp_path / "voc")
    out, record = tmp_path / "run", tmp_path / "record"
    record.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(voc), str(out), str(record)), nprocs=WORLD, join=True)

    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in range(WORLD)]
    # 8 images, global batch 4 -> 2 per process, 2 steps per epoch, 2 epochs: each rank 8 samples
    for r in ranks:
        assert len(r["train"]) == 8
    for epoch in range(2):  # within an epoch the shards are disjoint and cover the split
        a, b = (set(r["train"][4 * epoch : 4 * epoch + 4]) for r in ranks)
        assert not a & b and len(a | b) == 8
    va, vb = (set(r["val"]) for r in ranks)
    assert not va & vb and va | vb == {0, 1, 2, 3}
    # gradients synced, also for the backbone unfrozen after the warm-up (DDP re-wrapped)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["summary"]["miou"] == ranks[1]["summary"]["miou"] is not None  # all-reduced

    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and state["world_size"] == WORLD and len(state["rng"]) == WORLD
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    assert not list(out.glob(".*.tmp"))
    lines = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]  # rank 0 alone logs
    assert json.loads(lines[-1])["img_s"] > 0


def _train_worker(rank: int, world: int, port: int, voc: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from engine_fakes import make_cfg as mk
    from wsss.engine.trainer import train

    cfg = mk(Path(voc), epochs=2, batch_size=4, freeze_bn=True, method={"dropout": 0.0})
    train(cfg, out, progress=False)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_processes_train_the_same_weights_as_one(tmp_path):
    """`train.batch_size` is the global batch and augmentation is seeded per sample: with frozen BatchNorm
    (train.freeze_bn) and no dropout, 2 gloo processes end with the weights 1 process ends with."""
    voc = make_voc(tmp_path / "voc")
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"run{world}"
        mp.spawn(_train_worker, args=(world, _free_port(), str(voc), str(out)), nprocs=world, join=True)
        runs[world] = load_checkpoint(out / "last.pt")["model"]
    one, two = runs[1], runs[2]
    assert one.keys() == two.keys()
    trained = [k for k in one if one[k].is_floating_point()]
    for k in trained:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    init = _initial_fake_weights()
    assert any(not torch.allclose(one[k], init[k]) for k in init), "training changed nothing"


def _initial_fake_weights() -> dict:
    from engine_fakes import FakeConfig, FakeMethod

    return FakeMethod(FakeConfig(), None, 3).state_dict()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_cli_real_method(tmp_path):
    """`torchrun --nproc_per_node=2 -m wsss train ...`: USAGE (EMA teacher outside DDP's parameters),
    frozen warm-up then partial unfreezing, on 2 gloo processes."""
    import subprocess

    voc = make_voc(tmp_path / "voc")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "wsss",
           "train", "demo/usage_cnn", "--out", str(run), "-o", f"data.root={voc}", "-o", "data.crop_size=32",
           "-o", "data.num_workers=0", "-o", "train.batch_size=4", "-o", "train.epochs=2",
           "-o", "train.freeze_backbone_epochs=1", "-o", "train.trainable_blocks=2",
           "-o", "train.extend_unrecognised=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])
    assert summary["epochs"] == 2
    state = load_checkpoint(run / "last.pt")
    assert state["world_size"] == 2 and state["epoch"] == 2
    assert [json.loads(x)["epoch"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_sync_batchnorm_only_for_distributed_accelerators():
    """GPU DDP gets SyncBatchNorm (statistics over the global batch); CPU and single-process keep BN."""
    from torch import nn

    from wsss.engine.distributed import DistInfo, sync_batchnorm

    def net():
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))

    def kinds(m):
        return [type(x).__name__ for x in m.modules() if "BatchNorm" in type(x).__name__]

    gpu_ddp = DistInfo(world_size=2, device=torch.device("cuda", 0))  # conversion itself needs no GPU
    assert kinds(sync_batchnorm(net(), gpu_ddp)) == ["SyncBatchNorm", "SyncBatchNorm"]
    assert kinds(sync_batchnorm(net(), DistInfo(world_size=2))) == ["BatchNorm2d", "BatchNorm2d"]
    assert kinds(sync_batchnorm(net(), DistInfo(world_size=1, device=torch.device("cuda", 0)))) == ["BatchNorm2d"] * 2
