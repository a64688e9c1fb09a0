"""Every demo preset on every member of the benchmark family (issue 21): val pseudo-mask mIoU with GT
tags and no CRF, mean +- sd over training seeds, as the presets ship.

Each cell is what a user would run, through the CLI:

    wsss train demo/P -o data.root=F -o train.val_every=0 -o train.seed=S --out RUN
    wsss pseudo-label RUN --data F --split val --out RUN/pseudo

`segment` is stage 2 on the CRF train pseudo masks of the same family's and seed's `tkp_pcl` run
(`wsss pseudo-label ... --split train --crf`, `wsss segment demo/segment --pseudo ...`), scored by its
tag-free predictions on val. Runs are resumable: a cell whose summary exists is read, not redone, so
the grid can be filled across sessions. `--jobs 2` runs two cells at once, one thread each (2 cores).

    python benchmarks/family_table.py --families F3 F4 --presets tkp cam_cnn --seeds 0 1 2 \
        --data /work/fam --work /work/runs --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The family members of benchmarks/RESULTS.md ("Transfer: benchmark family"); F0 is the tuning family.
FAMILIES = {
    "F0": [],
    "F1": ["--num-train", "400", "--num-val", "150", "--size", "128", "--source", "mnist",
           "--object-scale", "0.3-0.7", "--objects", "1-3"],
    "F2": ["--num-train", "400", "--num-val", "150", "--size", "384-512", "--variant", "hard",
           "--object-scale", "0.1-0.25", "--objects", "1-4", "--no-overlap", "--clutter", "6"],
    "F3": ["--num-train", "400", "--num-val", "150", "--size", "96-160", "--object-scale", "0.3-0.6",
           "--objects", "1-3"],
    "F4": ["--num-train", "400", "--num-val", "150", "--size", "384-512", "--object-scale", "0.15-0.3",
           "--objects", "1-4", "--no-overlap", "--clutter", "6"],
    "F5": ["--source", "mnist", "--size", "224-256", "--object-scale", "0.35-0.6", "--objects", "1-2",
           "--no-overlap"],
    # added 2026-12-03 (third session) as a fresh held-out member, defined before any run on it: mid-size
    # images, more objects overlapping, some clutter, other draws (seed 2)
    "F6": ["--seed", "2", "--num-train", "400", "--num-val", "150", "--size", "256-320", "--object-scale", "0.2-0.4",
           "--objects", "2-5", "--clutter", "3"],
    # added 2026-12-06 (eleventh session): F1 at issue 21's own size (1,500 train / 300 val), held out
    "F1L": ["--num-train", "1500", "--num-val", "300", "--size", "128", "--source", "mnist",
            "--object-scale", "0.3-0.7", "--objects", "1-3"],
}
PRESETS = ["vit_pcm", "tkp", "tkp_pcl", "cam_cnn", "usage_cnn", "cam_vit", "usage_vit", "segment"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # one thread a cell


def _wsss(*args: str, log: Path) -> None:
    with log.open("a") as f:
        subprocess.run([sys.executable, "-m", "wsss", *args], check=True, stdout=f, stderr=subprocess.STDOUT, env=_env())


def make_family(name: str, data: Path) -> Path:
    root = data / name
    if not (root / "class_names.txt").exists():
        subprocess.run([sys.executable, "-m", "wsss", "data", "make-demo", "--out", str(root), "--seed", "0",
                        *FAMILIES[name]], check=True, stdout=subprocess.DEVNULL)  # a later --seed wins
    return root


def _options(root: Path, seed: int, extra: list[str]) -> list[str]:
    opts = [f"data.root={root}", "train.val_every=0", f"train.seed={seed}", *extra]
    return [a for o in opts for a in ("-o", o)]


def _train(preset: str, root: Path, seed: int, run: Path, extra: list[str]) -> None:
    """Trains RUN, or continues it from RUN/last.pt: a stopped cell resumes exactly (a finished one is a no-op)."""
    run.mkdir(parents=True, exist_ok=True)
    _wsss("train", f"demo/{preset}", *_options(root, seed, extra), "--out", str(run), "--resume",
          log=run / "cell.log")


def stage2(root: Path, masks: Path, seed: int, run: Path, extra: list[str]) -> None:
    """`demo/segment` trained on MASKS into RUN (continued from RUN/last.pt when it has one), then its tag-free
    predictions on val into RUN/pseudo."""
    run.mkdir(parents=True, exist_ok=True)
    _wsss("segment", "demo/segment", "--pseudo", str(masks), *_options(root, seed, extra), "--out", str(run),
          "--resume", log=run / "cell.log")
    code = ("import sys; from wsss.segment.predict import predict_dataset; "
            "predict_dataset(sys.argv[1], sys.argv[2], 'val', sys.argv[3], progress=False)")
    subprocess.run([sys.executable, "-c", code, str(run), str(root), str(run / "pseudo")], check=True, env=_env())


def _row(summary: Path, family: str, preset: str, seed: int) -> dict:
    s = json.loads(summary.read_text())
    diag = s.get("diagnostics") or {}
    return {"family": family, "preset": preset, "seed": seed, "miou": s["miou"],
            "foreground": diag.get("foreground_fraction"), "alarm": diag.get("alarm")}


def _summary(run: Path, absent: str | None) -> Path:
    """Where a cell's val score lives: RUN/pseudo (the preset as it ships) or RUN/pseudo_MODE (--absent)."""
    return run / ("pseudo" if absent is None else f"pseudo_{absent}") / "summary.json"


def cell(family: str, preset: str, seed: int, data: Path, work: Path, extra: list[str],
         absent: str | None = None) -> dict:
    """One (family, preset, seed): trains and scores it unless its summary exists; returns its figures.
    `absent`: score the val masks with `wsss pseudo-label --absent MODE` into RUN/pseudo_MODE (the same
    trained run: a paired comparison of inference settings)."""
    root = make_family(family, data)
    run = work / family / f"{preset}_s{seed}"
    absent = None if preset == "segment" else absent  # stage 2 predicts every class: nothing is ruled out
    summary = _summary(run, absent)
    if not summary.exists():
        if preset == "segment":
            stage1 = work / family / f"tkp_pcl_s{seed}"
            _train("tkp_pcl", root, seed, stage1, extra)
            train_masks = stage1 / "pseudo_train_crf"
            if not (train_masks / "summary.json").exists():
                _wsss("pseudo-label", str(stage1), "--data", str(root), "--split", "train", "--crf",
                      "--out", str(train_masks), log=stage1 / "cell.log")
            stage2(root, train_masks, seed, run, extra)
        else:
            _train(preset, root, seed, run, extra)
            _wsss("pseudo-label", str(run), "--data", str(root), "--split", "val", "--out", str(summary.parent),
                  *([] if absent is None else ["--absent", absent]), log=run / "cell.log")
    return _row(summary, family, preset, seed)


def family_label(family: str) -> str:
    """A family's name with its role, as every table here prints it."""
    return f"{family} (tuning)" if family == "F0" else f"{family} (held out)"


def table(rows: list[dict], families: list[str], presets: list[str]) -> str:
    """Markdown: a row per preset, a column per family; mean +- sd (n: each seed; predicted fg range)."""
    head = "| preset | " + " | ".join(family_label(f) for f in families) + " |"
    lines = [head, "|---|" + "---|" * len(families)]
    for p in presets:
        cells = []
        for f in families:
            got = sorted((r for r in rows if r["family"] == f and r["preset"] == p), key=lambda r: r["seed"])
            if not got:
                cells.append("not run")
                continue
            m = [r["miou"] for r in got]
            sd = f" +- {statistics.stdev(m):.3f}" if len(m) > 1 else ""
            fg = [r["foreground"] for r in got if r["foreground"] is not None]
            fg_text = f"; fg {min(fg):.0%}-{max(fg):.0%}" if fg else ""
            cells.append(f"**{statistics.fmean(m):.3f}**{sd} (n={len(m)}: {', '.join(f'{v:.3f}' for v in m)}{fg_text})")
        lines.append(f"| `demo/{p}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=["F3", "F4"], choices=sorted(FAMILIES))
    ap.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--data", type=Path, default=Path("family"), help="where the family datasets are built")
    ap.add_argument("--work", type=Path, default=Path("runs/family"), help="where the runs go")
    ap.add_argument("--jobs", type=int, default=2, help="cells at once (each at OMP_NUM_THREADS, default 1)")
    ap.add_argument("--read-only", action="store_true", help="only tabulate the cells already scored")
    ap.add_argument("-o", "--override", action="append", default=[], help="key=value for every cell (an ablation)")
    ap.add_argument("--absent", choices=["drop", "background", "won"],
                    help="score with `pseudo-label --absent MODE` (RUN/pseudo_MODE), the trained runs reused")
    args = ap.parse_args()
    for f in args.families:  # built once, before the workers race for them
        if not args.read_only:
            make_family(f, args.data)
    todo = [(f, p, s) for f in args.families for p in args.presets for s in args.seeds]
    rows = []
    if args.read_only:
        for f, p, s in todo:
            summary = _summary(args.work / f / f"{p}_s{s}", args.absent)
            if summary.exists():
                rows.append(_row(summary, f, p, s))
    else:
        # stage 2 reuses the tkp_pcl run of its family and seed: those cells go after the rest, so two
        # workers never train the same run
        for wave in ([c for c in todo if c[1] != "segment"], [c for c in todo if c[1] == "segment"]):
            with ThreadPoolExecutor(args.jobs) as pool:
                futures = [pool.submit(cell, f, p, s, args.data, args.work, args.override, args.absent)
                           for f, p, s in wave]
                for fut in futures:
                    try:
                        r = fut.result()
                    except subprocess.CalledProcessError as e:
                        print(f"failed: {e}", file=sys.stderr)
                        continue
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    print(table(rows, args.families, args.presets))


if __name__ == "__main__":
    main()
