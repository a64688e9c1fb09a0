"""USAGE's CNN claim where its premise holds (issue 19): E0 finds a CNN setting whose CAMs under-activate,
E1 sweeps the generation temperature there (L_GEN alone), E2 adds L_REG to the best E1 setting.

The decision rule is fixed in benchmarks/RESULTS.md ("USAGE on CNNs: the premise first") before any
held-out row is run. Every row: train on a family's train split, background threshold chosen on train
(sweep), reported on val with GT tags and no CRF.

    python benchmarks/usage_cnn_premise.py e0                       # candidate settings, one seed each
    python benchmarks/usage_cnn_premise.py e1 --setting small_os8 --family heldout --seeds 0 1 2
    python benchmarks/usage_cnn_premise.py e2 --setting small_os8 --family heldout --tau -4 --mode scaled
    python benchmarks/usage_cnn_premise.py table                    # the rows run so far, as Markdown

Rows are appended to WORK/rows.jsonl as they finish (a kill loses at most the row in flight).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from wsss.config import load_config
from wsss.engine.inference import eval_transform, load_run
from wsss.engine.pseudo_masks import pseudo_label
from wsss.engine.trainer import train
from wsss.io import read_mask

HERE = Path(__file__).parent
THRESHOLDS = [0.02, 0.03] + [round(0.05 * i, 2) for i in range(1, 17)]
# Benchmark families (`wsss data make-demo` options). `tuning`: where a setting and a tau are chosen;
# `heldout`: where the rule is judged (other object kind: many-instance MNIST digits, clutter).
FAMILIES = {
    "tuning": ["--seed", "0", "--size", "320-384", "--object-scale", "0.15-0.35", "--objects", "1-3",
               "--num-train", "240", "--num-val", "80"],
    "heldout": ["--seed", "1", "--variant", "hard", "--size", "320-384", "--object-scale", "0.15-0.35",
                "--objects", "1-3", "--num-train", "240", "--num-val", "80"],
    # E0 only: the tuning family's objects, large (VOC-like: an object is 40-90% of the image side), where
    # a CNN's CAM is expected to fire on the most discriminative part only
    "tuning_large": ["--seed", "0", "--size", "320-384", "--object-scale", "0.5-0.9", "--objects", "1-2",
                     "--num-train", "240", "--num-val", "80"],
}
# E0 candidates: CNN CAM settings expected to under-activate (objects small against the receptive field,
# maps read at the training resolution, single scale, a finer output stride). Plain CAM, L_GEN alone.
BASE = ["method.reg.weight=0", "infer.flip=false"]
STRIDE8_SINGLE_SCALE = ["model.backbone.output_stride=8", "infer.scales=[1.0]", "data.crop_size=320",
                        "data.scale_range=[0.9,1.1]"]
SETTINGS = {
    "preset": [],  # demo/cam_cnn as shipped (the over-activating reference)
    "single_scale": ["infer.scales=[1.0]"],
    "small_os8": STRIDE8_SINGLE_SCALE,
    "small_os16": ["data.crop_size=320", "data.scale_range=[0.9,1.1]", "infer.scales=[1.0]"],
    "large_os8": STRIDE8_SINGLE_SCALE,  # the same setting, on large objects (SETTING_FAMILY)
}
SETTING_FAMILY = {"large_os8": "tuning_large"}  # E0 settings judged on a family of their own
TAUS = [-64.0, -16.0, -4.0, -1.0, math.inf, 16.0, 4.0, 1.0]


TINY = ["--size", "96", "--num-train", "12", "--num-val", "6"]  # --tiny: a smoke run of the script itself


def family(name: str, work: Path, tiny: bool = False) -> Path:
    root = work / "data" / name
    if not (root / ".wsss_demo.json").is_file():
        args = FAMILIES[name] + (TINY if tiny else [])  # later options win
        cmd = [sys.executable, "-m", "wsss", "data", "make-demo", "--out", str(root), *args]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return root


def alpha_entropy(run_dir: Path, data_root: Path, split: str, limit: int = 40) -> float:
    """Mean over (image, present class) of H(alpha_c) / log N at the end of training: 1 = uniform weights
    (GAP, mean pooling), 0 = one position (max or min pooling). Where each tau really sits."""
    from wsss.data import open_dataset
    from wsss.methods.cam import generation_scores  # noqa: F401  (the same form as training)

    cfg, method, _ = load_run(run_dir, None, "cpu")
    if math.isinf(cfg.method.tau):
        return 1.0
    ds = open_dataset(data_root, split)
    tf = eval_transform(cfg)
    values = []
    with torch.inference_mode():
        for i in range(min(limit, len(ds))):
            sample = ds[i]
            x = tf(sample, ds.num_classes)["image"][None]
            a = method.activation_maps(x).flatten(2).float()[0]  # [C, N]
            t = cfg.method.tau
            if cfg.method.tau_mode == "scaled":
                t = t * a.std(dim=-1, keepdim=True).clamp_min(1e-6)
            w = torch.softmax(a / t, dim=-1)
            h = -(w * w.clamp_min(1e-12).log()).sum(-1) / math.log(a.shape[-1])
            values += [float(h[c - 1]) for c in sample.tags]
    return statistics.fmean(values) if values else float("nan")


def foreground_fraction(folder: Path) -> float:
    fg = total = 0
    for p in sorted(folder.glob("*.png")):
        m = read_mask(p)
        valid = m != 255
        fg += int(((m > 0) & valid).sum())
        total += int(valid.sum())
    return fg / max(total, 1)


def run_row(exp: str, setting: str, fam: str, seed: int, extra: list[str], work: Path, epochs: int,
            tiny: bool = False) -> dict:
    data_root = family(fam, work, tiny)
    name = "_".join([exp, setting, fam, f"s{seed}", *[e.replace("=", "-").replace(".", "") for e in extra]])
    run_dir = work / "runs" / "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"data.root={data_root}", "train.val_every=0", f"train.seed={seed}", f"train.epochs={epochs}",
                 *BASE, *SETTINGS[setting], *extra, *(["data.crop_size=64", "train.batch_size=4"] if tiny else [])]
    cfg = load_config("demo/cam_cnn", overrides)
    t0 = time.perf_counter()
    train(cfg, run_dir, progress=False)
    infer = {"scales": cfg.infer.scales, "flip": cfg.infer.flip, "progress": False}
    sweep = pseudo_label(run_dir, data_root, "train", run_dir / "sweep", sweep_thresholds=THRESHOLDS, **infer)
    thr = sweep["best_threshold"]
    chosen = {"bg_threshold": thr, "threshold_source": "swept on train"}
    train_res = pseudo_label(run_dir, data_root, "train", run_dir / "train", **chosen, **infer)
    val_res = pseudo_label(run_dir, data_root, "val", run_dir / "val", **chosen, **infer)
    def measured(res: dict) -> list[str]:  # classes present there (absent ones have no precision / recall)
        return [c for c, v in res["per_class"].items() if c != "background"
                and v["precision"] is not None and v["recall"] is not None]

    fg_train, fg_classes = measured(train_res), measured(val_res)
    row = {
        "exp": exp, "setting": setting, "family": fam, "seed": seed, "extra": " ".join(extra),
        "best_threshold": thr, "train_miou": train_res["miou"], "val_miou": val_res["miou"],
        # the premise (E0) is judged on train at the threshold chosen there: no val label is used
        "train_recall_lt_precision": sum(train_res["per_class"][c]["recall"] < train_res["per_class"][c]["precision"]
                                         for c in fg_train) / max(len(fg_train), 1),
        "val_precision": {c: round(val_res["per_class"][c]["precision"], 4) for c in fg_classes},
        "val_recall": {c: round(val_res["per_class"][c]["recall"], 4) for c in fg_classes},
        "val_fg_fraction": foreground_fraction(run_dir / "val"),
        "alpha_entropy": alpha_entropy(run_dir, data_root, "val"),
        "protocol": val_res.get("protocol"), "seconds": round(time.perf_counter() - t0, 1),
    }
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "rows.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return row


def table(work: Path) -> str:
    path = work / "rows.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["exp"], r["setting"], r["family"], r["extra"]), []).append(r)
    out = ["| exp | setting | family | overrides | val mIoU mean +- sd (seeds) | best thr (train) | "
           "classes recall<precision (train) | val fg fraction | H(alpha)/log N |",
           "|---|---|---|---|---|---|---:|---:|---:|"]
    for (exp, setting, fam, extra), rs in groups.items():
        m = [r["val_miou"] for r in rs]
        sd = statistics.stdev(m) if len(m) > 1 else float("nan")
        out.append(f"| {exp} | {setting} | {fam} | {extra or '-'} | {statistics.fmean(m):.3f} +- {sd:.3f} ({len(m)}) | "
                   f"{', '.join(str(r['best_threshold']) for r in rs)} | "
                   f"{statistics.fmean(r['train_recall_lt_precision'] for r in rs):.2f} | "
                   f"{statistics.fmean(r['val_fg_fraction'] for r in rs):.3f} | "
                   f"{statistics.fmean(r['alpha_entropy'] for r in rs):.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exp", choices=["e0", "e1", "e2", "table"])
    ap.add_argument("--work", type=Path, default=Path("runs/usage_cnn"))
    ap.add_argument("--setting", default="small_os8", choices=sorted(SETTINGS))
    ap.add_argument("--settings", nargs="*", default=sorted(SETTINGS), help="e0: the candidates to try")
    ap.add_argument("--family", default="tuning", choices=sorted(FAMILIES))
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--taus", type=float, nargs="*", default=TAUS)
    ap.add_argument("--modes", nargs="*", default=["plain", "scaled"])
    ap.add_argument("--tau", type=float, default=-4.0, help="e2: the E1 tau to add L_REG to")
    ap.add_argument("--mode", default="scaled", help="e2: its temperature form")
    ap.add_argument("--tiny", action="store_true", help="96 px, 12 train images: checks the script runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.exp == "table":
        print(table(args.work))
        return
    for seed in args.seeds:
        if args.exp == "e0":
            for s in args.settings:
                fam = SETTING_FAMILY.get(s, args.family)
                print(json.dumps(run_row("e0", s, fam, seed, [], args.work, args.epochs, args.tiny)))
        elif args.exp == "e1":
            for tau in args.taus:
                for mode in (["plain"] if math.isinf(tau) else args.modes):
                    extra = [f"method.tau={tau}", f"method.tau_mode={mode}"]
                    print(json.dumps(run_row("e1", args.setting, args.family, seed, extra, args.work, args.epochs, args.tiny)))
        else:  # E2: L_REG on the best E1 setting; reg.tau 1 (never the negative generation tau); the EMA by
            # its half-life: 0.9 per step = a half-life of ~6.6 steps, so the teacher tracks a run of a
            # few hundred steps instead of staying near the initial head (0.999: ~700 steps)
            extra = [f"method.tau={args.tau}", f"method.tau_mode={args.mode}", "method.reg.weight=1.0",
                     "method.reg.tau=1.0", "method.reg.ema=0.9", "method.reg.student_drop=0.2",
                     "method.reg.teacher_drop=0.1"]
            print(json.dumps(run_row("e2", args.setting, args.family, seed, extra, args.work, args.epochs, args.tiny)))


if __name__ == "__main__":
    main()
