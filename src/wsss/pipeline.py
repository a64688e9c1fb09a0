"""`wsss demo`: the whole pipeline on the embedded benchmark, offline, in minutes on a laptop CPU.

It only chains the public stages (the same functions the CLI commands call) and records what each
cost, so the demo is also the integration test a user can watch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from wsss.config import load_config
from wsss.io import atomic_write_json


def run_demo(
    out: str | Path,
    preset: str = "demo/tkp_pcl",
    overrides: list[str] | tuple[str, ...] = (),
    crf: bool = True,
    segment: bool = True,
) -> dict:
    from wsss.data.demo import ensure_demo
    from wsss.engine.inference import pseudo_label
    from wsss.engine.trainer import train
    from wsss.evaluation.metrics import per_class_table

    console = Console()
    out = Path(out)
    data_root = out / "data"
    run_dir = out / "run"
    timings: dict[str, float] = {}
    summary: dict = {"preset": preset, "out": str(out)}

    def step(name: str, message: str):  # numbered in the order they run (CRF / stage 2 are optional)
        console.rule(f"[bold]{len(timings) + 1}. {message}")
        return name, time.perf_counter()

    def done(token) -> None:
        name, t0 = token
        timings[name] = round(time.perf_counter() - t0, 1)

    t = step("data", f"embedded benchmark -> {data_root}")
    ensure_demo(data_root)
    done(t)

    t = step("train", f"train {preset} -> {run_dir}")
    cfg = load_config(preset, [f"data.root={data_root}", *overrides])
    train(cfg, run_dir, resume=(run_dir / "last.pt").is_file())
    done(t)

    t = step("pseudo_label", "pseudo masks on val (ground-truth tags), evaluated")
    result = pseudo_label(run_dir, data_root, cfg.data.val_split, out / "pseudo" / "val")
    summary["pseudo_val_miou"] = result["miou"]
    class_names = json.loads((run_dir / "classes.json").read_text())
    console.print(per_class_table(result, class_names))
    done(t)

    if crf:
        t = step("crf", "the same with a dense CRF over the present classes")
        result = pseudo_label(run_dir, data_root, cfg.data.val_split, out / "pseudo" / "val_crf", crf=True)
        summary["pseudo_val_crf_miou"] = result["miou"]
        done(t)

    if segment:
        from wsss.segment.predict import predict_dataset
        from wsss.segment.train import train_segmenter

        t = step("segment", "stage 2: a segmentation network trained on the train pseudo masks")
        pseudo_train = out / "pseudo" / "train_crf" if crf else out / "pseudo" / "train"
        pseudo_label(run_dir, data_root, cfg.data.train_split, pseudo_train, crf=crf)
        seg_cfg = load_config("demo/segment", [f"data.root={data_root}", *overrides])
        seg_dir = out / "segment"
        train_segmenter(seg_cfg, pseudo_train, seg_dir, resume=(seg_dir / "last.pt").is_file())
        result = predict_dataset(seg_dir, data_root, cfg.data.val_split, out / "predict" / "val")
        summary["segment_val_miou"] = result["miou"]
        done(t)
        if crf:
            t = step("segment_crf", "stage-2 predictions refined by a dense CRF over the predicted classes")
            result = predict_dataset(seg_dir, data_root, cfg.data.val_split, out / "predict" / "val_crf", crf=True)
            summary["segment_val_crf_miou"] = result["miou"]
            done(t)

    t = step("report", "report")
    from wsss.report.html import write_report

    summary["report"] = str(write_report(run_dir, demo_dir=out))
    done(t)

    summary["seconds"] = timings
    summary["total_seconds"] = round(sum(timings.values()), 1)
    atomic_write_json(out / "summary.json", summary)
    console.rule("[bold]done")
    for key, value in summary.items():
        if key.endswith("miou"):
            console.print(f"{key:>24}: {value:.4f}")
    console.print(f"{'total':>24}: {summary['total_seconds']:.0f} s   ({out / 'summary.json'})")
    return summary
