"""The GPU suite's CPU dry run (`benchmarks/gpu_suite.py --device cpu --tiny`): it must run end to end before
any GPU time is spent on it. Every part leaves a record (ok, or skipped with its reason), every figure the
fields a reader needs (device name, torch version, batch, resolution, precision), the Markdown table is
written, and a part killed at its cap keeps what it measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
sys.path.insert(0, str(ROOT / "benchmarks"))


def _run(out: Path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SUITE), "--device", "cpu", "--tiny", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    return proc, time.perf_counter() - t0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    proc, secs = _run(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), secs


def test_dry_run_records_every_part(dry_run):
    from gpu_suite import PART_NAMES

    out, res, secs = dry_run
    # About 25 s on an idle 2-core machine; the bound leaves room for a machine shared with other jobs.
    assert secs < 150, secs
    records = {r["part"]: r for r in res["parts"]}
    assert list(records) == PART_NAMES
    for name, rec in records.items():
        assert rec["status"] in ("ok", "skipped"), (name, rec.get("reason"), rec.get("traceback", "")[-2000:])
        if rec["status"] == "skipped":
            assert rec["reason"], name
        assert (out / "parts" / f"{name}.json").is_file()
    lines = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert [ln["part"] for ln in lines] == PART_NAMES
    for name in ("env", "tests_gpu", "matmul", "train_tkp_pcl", "train_vit_pcm", "train_usage_deit_s",
                 "train_usage_resnet38d", "breakdown_tkp_pcl", "loader", "pseudo_label", "deeplab", "crf"):
        assert records[name]["status"] == "ok", name
    assert res["meta"]["peak_flops"] > 0


def test_dry_run_figures_carry_their_conditions(dry_run):
    _, res, _ = dry_run
    rows = [r for rec in res["parts"] for r in rec["rows"]]
    figures = [r for r in rows if r["table"] in ("train", "pseudo", "crf", "matmul", "breakdown", "loader")]
    assert figures
    for r in figures:
        for key in ("device_name", "torch", "batch", "resolution", "precision"):
            assert r.get(key) not in (None, ""), (key, r)
    train = [r for r in rows if r["table"] == "train"]
    cases = {(r["case"], r["kind"]) for r in train}
    for preset in ("voc/tkp_pcl_vit_b16", "voc/vit_pcm_vit_b16", "voc/usage_deit_s", "voc/usage_resnet38d",
                   "voc/deeplab_v2_resnet101"):
        assert (preset, "method") in cases and (preset, "backbone") in cases, preset
    for r in train:
        assert r["img_s"] > 0 and r["flops_per_step"] > 0 and r["mfu"] > 0 and r["peak_mem_mb"] > 0
    pseudo = {r["case"] for r in rows if r["table"] == "pseudo"}
    assert pseudo == {"voc/vit_pcm_vit_b16", "voc/usage_deit_s", "voc/usage_resnet38d"}
    r38 = next(r for r in rows if r["table"] == "pseudo" and r["case"] == "voc/usage_resnet38d")
    assert r38["scales"] == [0.5, 1.0, 1.5, 2.0] and r38["flip"]  # the preset's multi-scale + flip
    # infer.size -1 (the USAGE presets: the image as it is) is fed at the image's own size (it crashed the
    # first GPU run: a -1 x -1 input)
    assert r38["resolution"] == "x".join(map(str, r38["out_size"]))
    loader = next(r for r in rows if r["table"] == "loader")
    assert loader["images"] >= 2 * loader["batch"]  # several batches: the workers can build them in parallel
    tests = [r for r in rows if r["table"] == "test"]
    assert tests and all(r["outcome"] == "skipped" for r in tests)  # no CUDA here


def test_dry_run_writes_the_markdown(dry_run):
    out, _, _ = dry_run
    md = (out / "summary.md").read_text()
    for heading in ("## Parts", "## Training step", "## TKP-PCL with components off",
                    "## Pseudo-label throughput", "## Dense CRF", "## Matmul peak", "## GPU tests"):
        assert heading in md, heading
    assert "| `voc/tkp_pcl_vit_b16` | method |" in md
    assert "MFU denominator" in md


def test_a_part_over_its_cap_is_killed_and_keeps_its_figures(tmp_path):
    """train_tkp_pcl with a cap of 30 ms: killed, recorded as a timeout; the suite goes on to the next part."""
    proc, _ = _run(tmp_path, "--parts", "matmul,train_tkp_pcl,loader", "--cap-scale", "0.0005", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["part"]: r for r in json.loads((tmp_path / "results.json").read_text())["parts"]}
    assert records["train_tkp_pcl"]["status"] == "timeout"
    assert "cap" in records["train_tkp_pcl"]["reason"]
    assert records["env"]["status"] == "skipped" and "not chosen" in records["env"]["reason"]
    assert (tmp_path / "summary.md").is_file()


@pytest.mark.slow
def test_compile_part_dry_run(tmp_path):
    """torch.compile's path (dynamo with the eager backend on CPU): about a minute, hence apart."""
    proc, _ = _run(tmp_path, "--parts", "compile_usage_deit_s", "--cap-scale", "3", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "parts" / "compile_usage_deit_s.json").read_text())
    assert rec["status"] == "ok", rec.get("traceback", rec.get("reason"))
    assert {r["kind"] for r in rec["rows"]} == {"method", "backbone"}
    assert all(r["compile"] == "eager" for r in rec["rows"])


def test_gpu_numerics_dry_run(tmp_path):
    """benchmarks/gpu_numerics.py on the CPU's toy ViT: every variant gives the two comparisons, the fp32
    repeat is exact (the CPU's kernels are deterministic) and the per-group cosines are numbers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WSSS_GPU_TESTS_ON_CPU": "1"}
    out = tmp_path / "numerics.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_numerics.py"), "--tiny", "--modes",
                           "compile", "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    from gpu_numerics import VARIANTS

    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == list(VARIANTS)
    for r in rows:
        assert r["fp32_repeat"]["cosine"] > 0.999999
        assert 0.999 < r["vs_fp32"]["cosine"] <= 1.0 + 1e-9  # the eager backend on the CPU: the same numbers
        assert {"backbone", "classifier"} <= set(r["vs_fp32"]["groups"])
    groups = {r["variant"]: set(r["vs_fp32"]["groups"]) for r in rows}
    assert "hv_bilstm" in groups["recipe (ET off)"] and "hv_bilstm" not in groups["HV-BiLSTM off"]
