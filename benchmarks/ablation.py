"""Quality ablations on the embedded benchmark: train demo presets with method knobs changed, make val
pseudo masks with ground-truth tags (no CRF) and report mIoU and time.

Tuning happened on the demo data (seed 0); the table is made on a benchmark built with another seed
(`--data-seed 1`, the default), so the numbers are on data that was not used to tune.
Methods without a background class (CAM, USAGE) get their background threshold chosen on the train
split by a sweep and are reported on val, as the literature does. Stage-2 rows (`segment`) train on the
given train pseudo masks and report the predictions' (no tags) mIoU on train (what to choose by) and val.

    python benchmarks/ablation.py tkp            # K and PCE / ET on/off (patch classification)
    python benchmarks/ablation.py usage          # CAM vs USAGE for the CNN and the Transformer
    python benchmarks/ablation.py tau            # the tau sweep per backbone kind
    python benchmarks/ablation.py tkp --write    # also replace the matching section of RESULTS.md
    python benchmarks/ablation.py tau --data-seed 0 --only "CNN: tau=4"   # one row (appended to rows.jsonl)
    python benchmarks/ablation.py tau --data-seed 0 --table-only --write  # the table of every row run
    python benchmarks/ablation.py tkp --only "top-K, K=10%" --train-seed 1   # the same row, another run
    python benchmarks/ablation.py tkp --only "top-K, K=10%" --nproc 2   # trained under torchrun, 2 processes
    python benchmarks/ablation.py usage --only "CNN" --rescore   # the runs again, at the presets' test scales now
    python benchmarks/ablation.py segment --data-seed 0 --pseudo wsss-demo/pseudo/train_crf   # stage 2 on a
                                                 # stage-1 run's train pseudo masks of that data (`wsss demo`'s)

A run on 400 images for 150 steps varies a lot with the training seed (weights of the new layers, data
order, augmentation): the table shows every training seed run and their mean, so compare means over the
same seeds, and treat single-seed differences of a few points as noise.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from wsss.config import load_config
from wsss.data.demo import ensure_demo
from wsss.engine.pseudo_masks import pseudo_label
from wsss.engine.trainer import train
from wsss.methods import METHODS

HERE = Path(__file__).parent
# 0.02, 0.03, 0.05 .. 0.80: max-like pooling (small tau > 0) makes peaky maps whose best threshold is low
THRESHOLDS = [0.02, 0.03] + [round(0.05 * i, 2) for i in range(1, 17)]

SUITES: dict[str, list[tuple[str, str, list[str]]]] = {
    # (row name, preset, overrides): same backbone, data and budget within a suite.
    "tkp": [
        ("ViT-PCM: max pooling (K=1)", "demo/vit_pcm", []),
        ("top-K, K=5% ", "demo/tkp", ["method.k=0.05"]),
        ("top-K, K=10%", "demo/tkp", ["method.k=0.1"]),
        ("top-K, K=20%", "demo/tkp", ["method.k=0.2"]),
        ("top-K, K=40%", "demo/tkp", ["method.k=0.4"]),
        ("top-K adaptive", "demo/tkp", ["method.pooling=adaptive"]),
        ("TKP-PCL: top-K 10% + PCE", "demo/tkp_pcl", []),
        ("top-K 10% + ET", "demo/tkp", ["method.et.weight=1.0"]),
        ("TKP-PCL + ET", "demo/tkp_pcl", ["method.et.weight=1.0"]),
    ],
    "usage": [
        ("CNN: CAM (tau=inf)", "demo/cam_cnn", []),
        ("CNN: USAGE L_GEN only", "demo/usage_cnn", ["method.reg.weight=0"]),
        ("CNN: USAGE (L_GEN + L_REG)", "demo/usage_cnn", []),
        ("Transformer: CAM (tau=inf)", "demo/cam_vit", []),
        ("Transformer: USAGE L_GEN only", "demo/usage_vit", ["method.reg.weight=0"]),
        ("Transformer: USAGE (L_GEN + L_REG)", "demo/usage_vit", []),
    ],
    "tau": [
        (f"{kind}: tau={tau}", preset, [f"method.tau={tau}", "method.reg.weight=0"])
        for kind, preset in (("CNN", "demo/cam_cnn"), ("Transformer", "demo/cam_vit"))
        for tau in ("-4", "-1", "1", "4", "inf")
    ],
    "segment": [  # stage 2; the preset is 1x backbone lr, stem frozen, 10 epochs of batch 8
        ("backbone lr 0.1x, all blocks, 6 epochs, batch 16 (before 2026-12-02)", "demo/segment",
         ["train.backbone_lr_mult=0.1", "train.trainable_blocks=-1", "train.epochs=6", "train.batch_size=16"]),
        ("head lr 3e-3, backbone 0.1x, all blocks, 6 epochs, batch 16", "demo/segment",
         ["train.lr=0.003", "train.backbone_lr_mult=0.1", "train.trainable_blocks=-1", "train.epochs=6", "train.batch_size=16"]),
        ("backbone lr 1x, all blocks, 6 epochs, batch 16", "demo/segment",
         ["train.trainable_blocks=-1", "train.epochs=6", "train.batch_size=16"]),
        ("backbone lr 1x, stem frozen, 6 epochs, batch 16", "demo/segment", ["train.epochs=6", "train.batch_size=16"]),
        ("backbone lr 1x, stem frozen, 10 epochs, batch 16", "demo/segment", ["train.batch_size=16"]),
        ("demo/segment: backbone lr 1x, stem frozen, 10 epochs, batch 8", "demo/segment", []),
    ],
}


def _stage2(cfg) -> bool:
    """A segmentation network trained on masks (the registry's `target`, as `wsss segment` checks it)."""
    return METHODS[cfg.method.name].target == "mask"


def run_row(
    name: str, preset: str, overrides: list[str], data_root: Path, work: Path, extra: list[str], train_seed: int = 0,
    nproc: int = 1, trained: dict | None = None, pseudo: Path | None = None,
) -> dict:
    """Train the row's run and score it. `trained`: the row of an earlier run of it, whose training is
    kept: only the scoring is redone, at the preset's current inference settings (`--rescore`)."""
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_") + (f"_s{train_seed}" if train_seed else "")
    run_dir = work / slug
    # no in-training val: the rows are scored below (CAM with the threshold chosen on train)
    options = [f"data.root={data_root}", "train.val_every=0", f"train.seed={train_seed}", *overrides, *extra]
    cfg = load_config(preset, options)
    if trained is not None:
        row = {k: trained[k] for k in ("name", "preset", "overrides", "train_seed", "train_s")}
        return {**row, **score(cfg, run_dir, data_root)}
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    if _stage2(cfg):  # on the pseudo masks (checked by main)
        from wsss.segment.train import train_segmenter

        train_segmenter(cfg, pseudo, run_dir)
    elif nproc > 1:  # the same training under torchrun (gloo on CPU), as a user would launch it
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "wsss", "train", preset, "--out", str(run_dir), *[a for o in options for a in ("-o", o)]]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    else:
        train(cfg, run_dir, progress=False)
    train_s = time.perf_counter() - t0
    row = {"name": name, "preset": preset, "overrides": " ".join(overrides), "train_seed": train_seed,
           "train_s": round(train_s, 1)}
    return {**row, **score(cfg, run_dir, data_root)}


def score(cfg, run_dir: Path, data_root: Path) -> dict:
    """Val pseudo-mask mIoU of a trained run at `cfg`'s test scales and flip (CAM: with the background
    threshold chosen on train)."""
    infer = {"scales": cfg.infer.scales, "flip": cfg.infer.flip, "progress": False}
    row: dict = {}
    threshold = None
    for name in ("sweep", "val", "train"):  # a rescore must not resume from masks made at other settings
        shutil.rmtree(run_dir / name, ignore_errors=True)
    if _stage2(cfg):  # predictions without tags; train mIoU is what to choose by
        from wsss.segment.predict import predict_dataset

        row["train_miou"] = predict_dataset(run_dir, data_root, cfg.data.train_split, run_dir / "train", progress=False)["miou"]
        t0 = time.perf_counter()
        row["val_miou"] = predict_dataset(run_dir, data_root, cfg.data.val_split, run_dir / "val", progress=False)["miou"]
        row["label_s"] = round(time.perf_counter() - t0, 1)
        return {**row, "bg_threshold": None, "scales": list(cfg.infer.scales)}
    if cfg.method.name == "cam":  # background threshold chosen on train, reported on val
        sweep = pseudo_label(run_dir, data_root, cfg.data.train_split, run_dir / "sweep", sweep_thresholds=THRESHOLDS, **infer)
        threshold = sweep["best_threshold"]
        row["train_miou"] = sweep["sweep"][threshold] if threshold in sweep["sweep"] else max(sweep["sweep"].values())
    t0 = time.perf_counter()
    result = pseudo_label(run_dir, data_root, cfg.data.val_split, run_dir / "val", bg_threshold=threshold, **infer)
    row["label_s"] = round(time.perf_counter() - t0, 1)
    row["val_miou"] = result["miou"]
    row["bg_threshold"] = threshold
    row["scales"] = list(cfg.infer.scales)
    return row


def _mean(runs: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in runs)


def markdown(suite: str, rows: list[dict], command: str) -> str:
    stage2 = suite.startswith("segment")
    cpu = platform.processor() or platform.machine()
    head = (
        f"<!-- ablation:{suite} -->\n"
        f"Command: `{command}`  \n"
        f"Machine: {torch.get_num_threads()} threads, {cpu}, torch {torch.__version__}, CPU.\n\n"
        f"| run | overrides | val mIoU (mean) | per training seed | {'train mIoU' if stage2 else 'bg thr (train)'} | train s | label s |\n"
        "|---|---|---:|---|---|---:|---:|\n"
    )
    lines = []
    for runs in rows:  # one table row per ablation row: its runs, one per training seed
        seeds = ", ".join(f"{r.get('train_seed', 0)}: {r['val_miou']:.3f}" for r in runs)
        thr = ", ".join(f"{r['train_miou']:.3f}" if stage2 else str(r["bg_threshold"])
                        for r in runs if stage2 or r["bg_threshold"] is not None)
        r = runs[0]
        lines.append(f"| {r['name']} | `{r['preset']}` {r['overrides']} | {_mean(runs, 'val_miou'):.4f} | {seeds} | {thr} | "
                     f"{_mean(runs, 'train_s'):.0f} | {_mean(runs, 'label_s'):.0f} |")
    return head + "\n".join(lines) + f"\n<!-- /ablation:{suite} -->\n"


def write_section(text: str, suite: str, title: str) -> None:
    path = HERE / "RESULTS.md"
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    start, end = f"<!-- ablation:{suite} -->", f"<!-- /ablation:{suite} -->\n"
    if start in doc:
        doc = doc[: doc.index(start)] + text + doc[doc.index(end) + len(end) :]
    else:
        doc += f"\n## {title}\n\n{text}"
    path.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--data-seed", type=int, default=1, help="benchmark seed (0 was used for tuning)")
    parser.add_argument("--work", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--only", default="", help="run only rows whose name contains this ('a|b': either)")
    parser.add_argument("--train-seed", type=int, default=0, help="train.seed of the runs (rows keep one run per seed)")
    parser.add_argument("--nproc", type=int, default=1, help="train under torchrun with this many processes")
    parser.add_argument("--rescore", action="store_true",
                        help="keep each row's trained run, redo only its scoring at the preset's current test settings")
    parser.add_argument("--pseudo", type=Path, help="segment suite: the train pseudo masks (`wsss pseudo-label RUN "
                        "--split train --crf --out DIR` of a stage-1 run on the --data-seed data)")
    parser.add_argument("--table-only", action="store_true", help="run nothing: the table from the rows run so far")
    parser.add_argument("-o", "--override", action="append", default=[], help="extra key=value for every row")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()

    data_root = args.work / f"data_seed{args.data_seed}"
    work = args.work / f"{args.suite}_seed{args.data_seed}"
    # Every finished row is appended to rows.jsonl, so a suite can be run a row at a time (or on two
    # machines' worth of processes) and the table made from all of them (`--table-only`).
    rows_file = work / "rows.jsonl"
    done: dict[str, dict[int, dict]] = {}  # name -> train seed -> row; the latest run of a seed wins
    if rows_file.is_file():
        for line in rows_file.read_text().splitlines():
            row = json.loads(line)
            done.setdefault(row["name"], {})[row.get("train_seed", 0)] = row
    if not args.table_only:
        if args.suite == "segment" and not (args.pseudo and args.pseudo.is_dir()):
            parser.error(f"segment: --pseudo must be a folder of train pseudo masks, got {args.pseudo}")
        ensure_demo(data_root, seed=args.data_seed)
        for name, preset, overrides in SUITES[args.suite]:
            if args.only and not any(part in name for part in args.only.split("|")):
                continue
            if args.nproc > 1:
                name = f"{name} [torchrun x{args.nproc}]"
            trained = None
            if args.rescore:
                trained = done.get(name, {}).get(args.train_seed)
                if trained is None:
                    print(f"--rescore: no earlier run of {name!r}, train seed {args.train_seed}: skipped", file=sys.stderr)
                    continue
            row = run_row(name, preset, overrides, data_root, work, args.override, args.train_seed, args.nproc, trained,
                          args.pseudo)
            print(json.dumps(row), flush=True)
            with rows_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done.setdefault(row["name"], {})[row["train_seed"]] = row
    names = [n for name, _, _ in SUITES[args.suite] for n in (name, *(m for m in done if m.startswith(f"{name} [")))]
    rows = [[done[name][k] for k in sorted(done[name])] for name in names if name in done]
    command = "python benchmarks/ablation.py " + " ".join(
        [args.suite, f"--data-seed {args.data_seed}"] + ([f"--pseudo {args.pseudo}"] if args.pseudo else [])
        + [f"-o {o}" for o in args.override]
    )
    text = markdown(f"{args.suite}:seed{args.data_seed}", rows, command)
    print(text)
    if args.write:
        kind = "tuning data" if args.data_seed == 0 else "held-out data"
        title = f"Ablation: {args.suite} ({kind}, demo seed {args.data_seed})"
        write_section(text, f"{args.suite}:seed{args.data_seed}", title)


if __name__ == "__main__":
    main()
