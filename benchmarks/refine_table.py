"""Affinity refinement against the CRF pseudo masks (issue 17), per family member, stage-1 preset and
training seed: train pseudo-mask mIoU (GT tags) of the seeds + dense CRF and of the refined masks, and the
paired difference; with `--segment [crf walk fill]`, stage 2 trained on each and scored on val without tags.

Three refined mask sets per cell: the walk's alone (`wsss refine` without `--crf-masks`, PSA's), `merge:
fill` (the CRF masks keep their foreground, the walk labels their background: `auto`'s choice for seeds cut
at a threshold) and `merge: relabel` (the walk's extent, the CRF masks' class where both say foreground:
`auto`'s for seeds with a background channel), the last two made here from the two folders on disk with
the engine's `MERGES`, as `wsss refine --crf-masks` writes them, so the cells walked before a merge existed
are scored without walking again.

Each cell reuses the stage-1 run of `benchmarks/family_table.py` (the same weights as the transfer table)
and goes through the CLI as a user would:

    wsss pseudo-label RUN --data F --split train --crf --out RUN/pseudo_train_crf
    wsss pseudo-label RUN --data F --split train --save-maps --out RUN/pseudo_train_maps
    wsss refine RUN/refine_affinity --seeds RUN/pseudo_train_maps --data F --split train --crf \
        --sweep-threshold 0.1:0.9:0.05 -o train.seed=S --out RUN/refine_train
    MERGES[fill | relabel](RUN/pseudo_train_crf, RUN/refine_train) -> RUN/refine_train_{fill,relabel}
    wsss segment demo/segment --pseudo RUN/refine_train ...   (--segment; the CRF side is family_table's
                                                               `segment` cell; and on the fill masks)

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
from family_table import FAMILIES, _train, _wsss, cell, family_label, make_family, stage2  # noqa: E402

from wsss.evaluation.metrics import ConfusionMatrix, mask_tensor  # noqa: E402
from wsss.io import atomic_write_json, read_mask, write_mask  # noqa: E402
from wsss.postprocess.affinity import MERGES  # noqa: E402

SWEEP = "0.1:0.9:0.05"  # the range `wsss run --refine` sweeps (wsss.pipeline.SWEEP)
SEGMENT_MASKS = ("crf", "walk", "fill", "relabel")


def _miou(folder: Path) -> float:
    return json.loads((folder / "summary.json").read_text())["miou"]


def _stage2_miou(root: Path, masks: Path, seed: int, run: Path) -> float:
    """Val mIoU of `demo/segment` trained on MASKS into RUN (trained once, read back after)."""
    if not (run / "pseudo" / "summary.json").exists():
        stage2(root, masks, seed, run, [])
    return _miou(run / "pseudo")


def merge_masks(root: Path, crf: Path, walk: Path, out: Path, merge: str = "fill") -> None:
    """OUT/<id>.png = `MERGES[merge](CRF/<id>.png, WALK/<id>.png)` for every walk mask, and OUT/summary.json
    with their mIoU against ROOT/SegmentationClass (the class names from the CRF masks' summary) and, where
    the two masks disagree on a pixel the CRF calls foreground, how often the CRF's class is the true one."""
    names = list(json.loads((crf / "summary.json").read_text())["per_class"])
    cm, foreground, pixels = ConfusionMatrix(len(names)), 0, 0
    disagree = {"walk_background": [0, 0], "walk_other_class": [0, 0]}  # [pixels, CRF's class right]
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(walk.glob("*.png")):
        base, walked = read_mask(crf / path.name), read_mask(path)
        gt = read_mask(root / "SegmentationClass" / path.name)
        mask = MERGES[merge](base, walked)
        write_mask(out / path.name, mask)
        cm.update(mask_tensor(mask), mask_tensor(gt))
        foreground, pixels = foreground + int(((mask > 0) & (mask != 255)).sum()), pixels + mask.size
        drawn = (base > 0) & (base != 255)
        for key, where in (("walk_background", drawn & (walked == 0)), ("walk_other_class", drawn & (walked > 0) & (walked != base))):
            disagree[key][0] += int(where.sum())
            disagree[key][1] += int((where & (gt == base)).sum())
    atomic_write_json(out / "summary.json", {
        **cm.as_json(names), "merge": merge, "crf_masks": str(crf), "walk_masks": str(walk),
        "foreground": foreground / max(pixels, 1),
        "crf_foreground_disagreements": {k: {"pixels": n, "crf_right": right / max(n, 1)} for k, (n, right) in disagree.items()}})


def refine_cell(family: str, preset: str, seed: int, data: Path, work: Path, segment=(),
                overrides: list[str] = (), name: str = "") -> dict:
    """One (family, preset, seed). `overrides` go to `wsss refine` alone, into RUN/refine_affinity_NAME and
    RUN/refine_train_NAME (an ablation of the refinement on the same seeds). `segment`: the mask sets
    (crf, walk, fill) stage 2 trains on (not with NAME)."""
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
    fill, relabel = run / f"refine_train{suffix}_fill", run / f"refine_train{suffix}_relabel"
    for folder, merge in ((fill, "fill"), (relabel, "relabel")):
        if not (folder / "summary.json").exists():
            merge_masks(root, crf, refined, folder, merge)
    row = {"family": family, "preset": preset, "refine": name or "preset", "seed": seed, "crf": _miou(crf),
           "seeds": _miou(maps), "refined": _miou(refined), "fill": _miou(fill),
           "relabel": _miou(relabel),
           "threshold": json.loads((refined / "summary.json").read_text())["bg_threshold"]}
    if name:
        return row
    # stage 2 on each mask set asked for; tkp_pcl's folders predate the others' (and its CRF side is
    # family_table's `segment` cell, trained on this run's CRF masks: reused)
    tag = "" if preset == "tkp_pcl" else f"{preset}_"
    for key in segment:
        if key == "crf" and preset == "tkp_pcl":
            row["segment_crf"] = cell(family, "segment", seed, data, work, [])["miou"]
            continue
        masks, folder = {"crf": (crf, "crf"), "walk": (refined, "refined"), "fill": (fill, "fill"),
                         "relabel": (relabel, "relabel")}[key]
        row["segment_" + ("refined" if key == "walk" else key)] = _stage2_miou(
            root, masks, seed, work / family / f"segment_{folder}_{tag}s{seed}")
    return row


def _stat(values: list[float]) -> str:
    sd = f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"**{statistics.fmean(values):.3f}**{sd}"


def table(rows: list[dict]) -> str:
    """Markdown: a row per (family, preset); mean +- sd over seeds, the paired gains over the CRF masks and
    each seed's."""
    lines = ["| family | preset | refine | training seeds | seeds | seeds + CRF | walk | walk - CRF (each seed) | "
             "fill | fill - CRF (each seed) | relabel | relabel - CRF (each seed) | stage 2 on CRF | on walk | on fill | "
             "on relabel |", "|---" * 16 + "|"]

    def gain(got, key):
        g = [r[key] - r["crf"] for r in got]
        return f"{statistics.fmean(g) * 100:+.1f} ({', '.join(f'{x * 100:+.1f}' for x in g)})"

    def optional(got, key):  # a merge scored after the cell was made: "-" where a seed lacks it
        return f"{_stat([r[key] for r in got])} | {gain(got, key)}" if all(key in r for r in got) else "- | -"

    def stage2_mean(got, key):  # not family_table's stage2
        values = [r[key] for r in got if key in r]
        return _stat(values) if values else "not run"

    for f, p, name in dict.fromkeys((r["family"], r["preset"], r["refine"]) for r in rows):
        got = sorted((r for r in rows if (r["family"], r["preset"], r["refine"]) == (f, p, name)), key=lambda r: r["seed"])
        lines.append(
            f"| {family_label(f)} | `demo/{p}` | {name} | {', '.join(str(r['seed']) for r in got)} "
            f"| {_stat([r['seeds'] for r in got])} | {_stat([r['crf'] for r in got])} | {_stat([r['refined'] for r in got])} "
            f"| {gain(got, 'refined')} | {_stat([r['fill'] for r in got])} | {gain(got, 'fill')} "
            f"| {optional(got, 'relabel')} "
            f"| {stage2_mean(got, 'segment_crf')} | {stage2_mean(got, 'segment_refined')} | {stage2_mean(got, 'segment_fill')} "
            f"| {stage2_mean(got, 'segment_relabel')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=["F0", "F3"], choices=sorted(FAMILIES))
    ap.add_argument("--presets", nargs="+", default=["tkp_pcl"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--data", type=Path, default=Path("family"))
    ap.add_argument("--work", type=Path, default=Path("runs/family"))
    ap.add_argument("--jobs", type=int, default=1, help="cells at once (each at OMP_NUM_THREADS, default 1)")
    ap.add_argument("--segment", nargs="*", choices=SEGMENT_MASKS, default=None,
                    help="also stage 2 (demo/segment) on these mask sets (alone: all three)")
    ap.add_argument("-o", "--override", action="append", default=[], help="key=value for `wsss refine` alone")
    ap.add_argument("--name", default="", help="suffix of the refine folders (required with -o)")
    args = ap.parse_args()
    if args.override and not args.name:
        ap.error("-o needs --name: the refined masks of other settings go to their own folders")
    for f in args.families:
        make_family(f, args.data)
    segment = () if args.segment is None else (args.segment or SEGMENT_MASKS)
    todo = [(f, p, s) for f in args.families for p in args.presets for s in args.seeds]
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(refine_cell, f, p, s, args.data, args.work, segment, args.override, args.name)
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
