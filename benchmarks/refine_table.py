"""Affinity refinement against the CRF pseudo masks (issue 17), per family member, stage-1 preset and
training seed: train pseudo-mask mIoU (GT tags) of the seeds + dense CRF and of the refined masks, and the
paired difference; with `--segment`, stage 2 trained on each and scored on val without tags.

Each cell reuses the stage-1 run of `benchmarks/family_table.py` (the same weights as the transfer table)
and goes through the CLI as a user would:

    wsss pseudo-label RUN --data F --split train --crf --out RUN/pseudo_train_crf
    wsss pseudo-label RUN --data F --split train --save-maps --out RUN/pseudo_train_maps
    wsss refine RUN/refine_affinity --seeds RUN/pseudo_train_maps --data F --split train --crf \
        --sweep-threshold 0.1:0.9:0.05 -o train.seed=S --out RUN/refine_train
    wsss segment demo/segment --pseudo RUN/refine_train ...   (--segment; the CRF side is family_table's
                                                               `segment` cell)

Resumable: every step whose summary exists is read, not redone.

    python benchmarks/refine_table.py --families F0 F3 --presets tkp_pcl --seeds 0 1 2 \
        --data /work/fam --work /work/runs/fam --segment
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from family_table import FAMILIES, _train, _wsss, cell, make_family, stage2  # noqa: E402

SWEEP = "0.1:0.9:0.05"  # the range `wsss run --refine` sweeps (wsss.pipeline.SWEEP)


def _miou(folder: Path) -> float:
    return json.loads((folder / "summary.json").read_text())["miou"]


def _stage2_miou(root: Path, masks: Path, seed: int, run: Path) -> float:
    """Val mIoU of `demo/segment` trained on MASKS into RUN (trained once, read back after)."""
    if not (run / "pseudo" / "summary.json").exists():
        stage2(root, masks, seed, run, [])
    return _miou(run / "pseudo")


def refine_cell(family: str, preset: str, seed: int, data: Path, work: Path, segment: bool,
                overrides: list[str] = (), name: str = "") -> dict:
    """One (family, preset, seed). `overrides` go to `wsss refine` alone, into RUN/refine_affinity_NAME and
    RUN/refine_train_NAME (an ablation of the refinement on the same seeds)."""
    root = make_family(family, data)
    run = work / family / f"{preset}_s{seed}"
    _train(preset, root, seed, run, [])
    log = run / "cell.log"
    suffix = f"_{name}" if name else ""
    crf, maps, refined = run / "pseudo_train_crf", run / "pseudo_train_maps", run / f"refine_train{suffix}"
    for folder, extra in ((crf, ["--crf"]), (maps, ["--save-maps"])):
        if not (folder / "summary.json").exists():
            _wsss("pseudo-label", str(run), "--data", str(root), "--split", "train", *extra, "--out", str(folder),
                  log=log)
    if not (refined / "summary.json").exists():
        _wsss("refine", str(run / f"refine_affinity{suffix}"), "--seeds", str(maps), "--data", str(root), "--split",
              "train", "--crf", "--sweep-threshold", SWEEP, *[a for o in [f"train.seed={seed}", *overrides]
                                                               for a in ("-o", o)], "--out", str(refined), log=log)
    row = {"family": family, "preset": preset, "refine": name or "as shipped", "seed": seed, "crf": _miou(crf),
           "seeds": _miou(maps), "refined": _miou(refined),
           "threshold": json.loads((refined / "summary.json").read_text())["bg_threshold"]}
    if segment and not name:
        if preset == "tkp_pcl":  # family_table's `segment` cell trains on this run's CRF masks: reuse it
            row["segment_crf"] = cell(family, "segment", seed, data, work, [])["miou"]
            row["segment_refined"] = _stage2_miou(root, refined, seed, work / family / f"segment_refined_s{seed}")
        else:  # the same stage 2 on the other presets' masks, in folders named after them
            row["segment_crf"] = _stage2_miou(root, crf, seed, work / family / f"segment_crf_{preset}_s{seed}")
            row["segment_refined"] = _stage2_miou(root, refined, seed,
                                                  work / family / f"segment_refined_{preset}_s{seed}")
    return row


def _stat(values: list[float]) -> str:
    sd = f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"**{statistics.fmean(values):.3f}**{sd}"


def table(rows: list[dict]) -> str:
    """Markdown: a row per (family, preset); mean +- sd over seeds, the paired gain and each seed's."""
    lines = ["| family | preset | refine | training seeds | seeds | seeds + CRF | refined | refined - CRF (each seed) | "
             "stage 2 on CRF | stage 2 on refined |", "|---|---|---|---|---|---|---|---|---|---|"]
    for f, p, name in dict.fromkeys((r["family"], r["preset"], r["refine"]) for r in rows):
        got = sorted((r for r in rows if (r["family"], r["preset"], r["refine"]) == (f, p, name)), key=lambda r: r["seed"])
        gain = [r["refined"] - r["crf"] for r in got]
        seg = [(r["segment_crf"], r["segment_refined"]) for r in got if "segment_refined" in r]
        lines.append(
            f"| {f}{' (tuning)' if f == 'F0' else ' (held out)'} | `demo/{p}` | {name} | {', '.join(str(r['seed']) for r in got)} "
            f"| {_stat([r['seeds'] for r in got])} | {_stat([r['crf'] for r in got])} | {_stat([r['refined'] for r in got])} "
            f"| {statistics.fmean(gain) * 100:+.1f} ({', '.join(f'{g * 100:+.1f}' for g in gain)}) "
            f"| {_stat([a for a, _ in seg]) if seg else 'not run'} | {_stat([b for _, b in seg]) if seg else 'not run'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=["F0", "F3"], choices=sorted(FAMILIES))
    ap.add_argument("--presets", nargs="+", default=["tkp_pcl"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--data", type=Path, default=Path("family"))
    ap.add_argument("--work", type=Path, default=Path("runs/family"))
    ap.add_argument("--jobs", type=int, default=1, help="cells at once (each at OMP_NUM_THREADS, default 1)")
    ap.add_argument("--segment", action="store_true", help="also stage 2 (demo/segment) on both masks")
    ap.add_argument("-o", "--override", action="append", default=[], help="key=value for `wsss refine` alone")
    ap.add_argument("--name", default="", help="suffix of the refine folders (required with -o)")
    args = ap.parse_args()
    if args.override and not args.name:
        ap.error("-o needs --name: the refined masks of other settings go to their own folders")
    for f in args.families:
        make_family(f, args.data)
    todo = [(f, p, s) for f in args.families for p in args.presets for s in args.seeds]
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(refine_cell, f, p, s, args.data, args.work, args.segment, args.override, args.name)
                for f, p, s in todo]
        for fut in jobs:
            try:
                rows.append(fut.result())
            except subprocess.CalledProcessError as e:
                print(f"failed: {e}", file=sys.stderr)
                continue
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
