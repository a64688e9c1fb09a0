"""`wsss run` and `wsss demo`: the whole chain, tags to a trained segmenter, stage by stage, resumable.

It only chains the public stages (the same functions the CLI commands call) and records what each
cost, so the demo is also the integration test a user can watch.

Layout of one chain (`wsss run CONFIG --data ROOT --out DIR`; with `--seeds N` one under DIR/seed<S> per
seed): run/ (stage 1, `wsss train`), pseudo/train_sweep (CAM-style methods: background threshold swept
on the train split when it has masks), pseudo/val, pseudo/val_crf (when val has masks), pseudo/train_crf
(or pseudo/train without CRF; stage 2 trains on it), segment/ (stage 2), predict/val, predict/val_crf,
run/report.html, summary.json. Each stage folder holds `.wsss_stage.json`, written last (atomically) when
the stage finished: a rerun skips finished stages and redoes a missing one, and every stage downstream of
a redone one (its folder is cleared first). Every number comes with its protocol (wsss.provenance).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from wsss.config import load_config
from wsss.io import atomic_write_json

STAGE_MARKER = ".wsss_stage.json"
SWEEP = [round(0.05 * k, 2) for k in range(2, 19)]  # 0.1 .. 0.9: background thresholds tried on train
STAGE2_KEYS = ("data", "train", "infer")  # the -o overrides stage 2 shares with stage 1
# summary key -> (label, folder under the chain's folder); the demo's report labels
OUTPUTS = {
    "pseudo_val": ("pseudo", "pseudo/val"),
    "pseudo_val_crf": ("pseudo + CRF", "pseudo/val_crf"),
    "pseudo_train": ("pseudo train", "pseudo/train"),
    "pseudo_train_crf": ("pseudo train + CRF", "pseudo/train_crf"),
    "pseudo_train_refined": ("pseudo train refined", "refine/train"),  # --refine: AffinityNet + random walk
    "segment_val": ("stage 2", "predict/val"),
    "segment_val_crf": ("stage 2 + CRF", "predict/val_crf"),
}


class _Stages:
    """Runs a chain's stages: skips those whose folder holds a marker (unless a dependency was redone in
    this call), clears and redoes the others, writes the marker last."""

    def __init__(self, console: Console):
        self.console = console
        self.timings: dict[str, float] = {}
        self.ran: set[str] = set()

    def __call__(self, name: str, folder: Path, message: str, fn: Callable[[], dict], deps=()) -> dict:
        marker = folder / STAGE_MARKER
        stale = any(d in self.ran for d in deps)
        self.console.rule(f"[bold]{len(self.timings) + 1}. {message}")
        if marker.is_file() and not stale:
            try:
                done = json.loads(marker.read_text(encoding="utf-8"))
                self.timings[name] = done.get("seconds", 0.0)
                self.console.print(f"done earlier ({marker}): skipped")
                return done.get("result") or {}
            except (OSError, ValueError):
                pass  # a damaged marker: redo the stage
        if stale and folder.exists():
            shutil.rmtree(folder)
        t0 = time.perf_counter()
        result = fn() or {}
        seconds = round(time.perf_counter() - t0, 1)
        result = {k: v for k, v in result.items() if k not in ("per_class", "confusion")}
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"stage": name, "seconds": seconds, "result": result})
        self.timings[name] = seconds
        self.ran.add(name)
        return result


def _has_masks(root, cfg, split: str) -> bool | None:
    """True / False: the split exists with / without masks; None: no such split."""
    from wsss.data import open_dataset
    from wsss.errors import DataError

    if not split:
        return None
    try:
        return bool(open_dataset(root, split, cfg.data.format, cfg.data.tags_file).has_masks)
    except DataError:
        return None


def run_chain(
    config: str | Path,
    data_root: str | Path,
    out: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    crf: bool = True,
    segment: bool = True,
    segment_config: str | Path | None = None,
    demo_dir: str | Path | None = None,
    console: Console | None = None,
    progress: bool = True,
    refine: bool = False,
    refine_config: str | Path | None = None,
) -> dict:
    """One chain (module doc) in OUT; returns the flat summary: `<output>_miou` numbers, `protocols`
    {output: protocol}, `seconds` per stage, `report`, and what ran. `refine`: the train seeds (maps saved,
    pseudo/train_maps) refined by PSA's AffinityNet + random walk (`wsss.engine.refine.refine`,
    `refine_config` or the config's `pipeline.refine`, else demo/affinity; its run in refine/affinity, the
    masks in refine/train, the walk's background threshold swept on train when it has masks, then the dense
    CRF when `crf`); stage 2 then trains on the refined masks."""
    from wsss.diagnostics import run_alarm
    from wsss.engine.pseudo_masks import pseudo_label
    from wsss.engine.trainer import train
    from wsss.evaluation.metrics import per_class_table
    from wsss.methods import METHODS
    from wsss.provenance import write_env

    console = console or Console()
    out, data_root = Path(out), Path(data_root)
    out.mkdir(parents=True, exist_ok=True)
    write_env(out)
    cfg = load_config(config, [f"data.root={data_root}", *overrides])
    run_dir = out / "run"
    stages = _Stages(console)
    summary: dict = {"config": str(config), "data": str(data_root), "out": str(out), "seed": cfg.train.seed}
    protocols: dict[str, dict] = {}

    def record(key: str, result: dict) -> None:
        if (result.get("diagnostics") or {}).get("alarm"):  # the collapse alarm (wsss.diagnostics)
            summary.setdefault("alarms", {})[key] = result["diagnostics"]["alarm"]
        if isinstance(result.get("miou"), (int, float)):
            summary[f"{key}_miou"] = result["miou"]
            protocols[key] = result.get("protocol") or {}

    stages("train", run_dir, f"train {config} -> {run_dir}",
           lambda: train(cfg, run_dir, resume=(run_dir / "last.pt").is_file(), progress=progress))
    class_names = json.loads((run_dir / "classes.json").read_text(encoding="utf-8"))
    if run_alarm(run_dir):
        summary.setdefault("alarms", {})["train"] = run_alarm(run_dir)
    train_split, val_split = cfg.data.train_split, cfg.data.val_split
    train_masks, val_masks = _has_masks(data_root, cfg, train_split), _has_masks(data_root, cfg, val_split)

    threshold, source = None, ""
    if not METHODS[cfg.method.name].has_background and cfg.infer.bg_alpha <= 0 and train_masks:
        folder = out / "pseudo" / "train_sweep"
        res = stages("sweep", folder, f"background threshold swept on {train_split}",
                     lambda: pseudo_label(run_dir, data_root, train_split, folder, sweep_thresholds=SWEEP,
                                          progress=progress), deps=("train",))
        threshold, source = float(res["best_threshold"]), f"swept on {train_split}"
        summary["bg_threshold"] = threshold
        console.print(f"background threshold {threshold:g} (mIoU {res['best_miou']:.4f} on {train_split})")

    def label(key: str, split: str, with_crf: bool, message: str) -> dict:
        folder = out / OUTPUTS[key][1]

        def fn():
            res = pseudo_label(run_dir, data_root, split, folder, crf=with_crf, bg_threshold=threshold,
                               threshold_source=source, progress=progress)
            if res.get("per_class"):
                console.print(per_class_table(res, class_names))
            return res

        res = stages(key, folder, message, fn, deps=("train", "sweep"))
        record(key, res)
        return res

    if val_masks:
        label("pseudo_val", val_split, False, f"pseudo masks on {val_split} (ground-truth tags), evaluated")
        if crf:
            label("pseudo_val_crf", val_split, True, "the same with a dense CRF over the present classes")
    train_key = "pseudo_train_crf" if crf else "pseudo_train"
    label(train_key, train_split, crf, f"pseudo masks on {train_split}{' + CRF' if crf else ''}"
          + ("" if refine else ": stage 2's targets"))
    if refine:
        train_key = _refine_stage(stages, record, cfg, out, run_dir, data_root, train_split, bool(train_masks),
                                  threshold, source, overrides, refine_config, progress, crf)

    if segment:
        summary["stage2_masks"] = OUTPUTS[train_key][1]
        predict_split = val_split if val_masks is not None else None  # a val split without masks: predictions only
        _segment_stage(stages, record, segment_config or cfg.pipeline.segment, out, data_root, train_key,
                       predict_split, overrides, crf, progress)

    from wsss.report.html import write_report

    console.rule(f"[bold]{len(stages.timings) + 1}. report")
    t0 = time.perf_counter()
    if demo_dir is not None:
        summary["report"] = str(write_report(run_dir, demo_dir=demo_dir))
    else:
        found = {lab: out / rel for key, (lab, rel) in OUTPUTS.items() if (out / rel / "summary.json").is_file()}
        summary["report"] = str(write_report(run_dir, outputs=found))
    stages.timings["report"] = round(time.perf_counter() - t0, 1)
    summary["protocols"] = protocols
    summary["reference"] = dict(cfg.reference or {})
    summary["seconds"] = dict(stages.timings)
    summary["redone"] = sorted(stages.ran)
    summary["total_seconds"] = round(sum(stages.timings.values()), 1)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _segment_stage(stages, record, seg_config, out, data_root, train_key, val_split, overrides, crf,
                   progress) -> None:
    """`run_chain`'s stage 2: the segmenter trained on OUTPUTS[train_key]'s masks, then its val
    predictions (and with `crf` the same through a dense CRF) when `val_split` is given."""
    from wsss.segment.predict import predict_dataset
    from wsss.segment.train import train_segmenter

    seg_dir = out / "segment"
    shared = [o for o in overrides if o.split("=", 1)[0].split(".")[0].strip() in STAGE2_KEYS]
    seg_cfg = load_config(seg_config, [f"data.root={data_root}", *shared])
    pseudo_train = out / OUTPUTS[train_key][1]
    stages("segment", seg_dir, "stage 2: a segmentation network trained on the train pseudo masks",
           lambda: train_segmenter(seg_cfg, pseudo_train, seg_dir, resume=(seg_dir / "last.pt").is_file()),
           deps=(train_key,))
    if val_split is None:
        return
    for key, with_crf, message in (
        ("segment_val", False, f"stage-2 predictions on {val_split}"),
        ("segment_val_crf", True, "stage-2 predictions refined by a dense CRF over the predicted classes"),
    ):
        if with_crf and not crf:
            continue
        folder = out / OUTPUTS[key][1]
        res = stages(key, folder, message,
                     lambda folder=folder, with_crf=with_crf: predict_dataset(
                         seg_dir, data_root, val_split, folder, crf=with_crf, progress=progress),
                     deps=("segment",))
        record(key, res)


def _refine_stage(stages, record, cfg, out, run_dir, data_root, split, has_masks, threshold, source, overrides,
                  refine_config, progress, crf) -> str:
    """`run_chain(refine=True)`'s two stages: the seeds with their maps, then `refine` (module doc). Returns
    the OUTPUTS key stage 2 trains on."""
    from wsss.engine.pseudo_masks import pseudo_label
    from wsss.engine.refine import refine

    seeds = out / "pseudo" / "train_maps"
    stages("seeds_maps", seeds, f"seeds on {split} with their maps saved: what the random walk propagates",
           lambda: pseudo_label(run_dir, data_root, split, seeds, save_maps=True, bg_threshold=threshold,
                                threshold_source=source, progress=progress), deps=("train", "sweep"))
    folder = out / "refine"
    shared = [o for o in overrides if o.split("=", 1)[0].split(".")[0].strip() in ("data",)]
    aff_cfg = load_config(refine_config or cfg.pipeline.refine or "demo/affinity", [f"data.root={data_root}", *shared])
    # with --crf the train CRF masks exist: `merge` fill / relabel / auto may read them
    crf_masks = out / OUTPUTS["pseudo_train_crf"][1] if crf else None
    res = stages("pseudo_train_refined", folder, f"seeds on {split} refined by AffinityNet + random walk (PSA)",
                 lambda: refine(aff_cfg, folder / "affinity", seeds, data_root, split, folder / "train",
                                progress=progress, sweep_thresholds=SWEEP if has_masks else None, crf=crf,
                                crf_masks=crf_masks),
                 deps=("seeds_maps", "pseudo_train_crf"))  # without --crf that stage never runs
    record("pseudo_train_refined", res)
    return "pseudo_train_refined"


def run_pipeline(
    config: str | Path,
    data_root: str | Path,
    out: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    seeds: int = 1,
    crf: bool = True,
    segment: bool = True,
    segment_config: str | Path | None = None,
    console: Console | None = None,
    progress: bool = True,
    refine: bool = False,
    refine_config: str | Path | None = None,
) -> dict:
    """`wsss run`: `run_chain` once (in OUT) or for `seeds` training seeds (train.seed, +1, ...; in
    OUT/seed<S>), then the summary table (every seed, mean +- sd, the config's `reference` numbers and the
    gap). Writes OUT/summary.json (with `mean` / `sd` over seeds when seeds > 1)."""
    from wsss.errors import ConfigError
    from wsss.provenance import write_env

    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: expected at least 1")
    console = console or Console()
    out = Path(out)
    base = load_config(config, [f"data.root={data_root}", *overrides])
    seed_list = [base.train.seed + k for k in range(seeds)]
    runs = {}
    for s in seed_list:
        chain_out = out if seeds == 1 else out / f"seed{s}"
        runs[s] = run_chain(config, data_root, chain_out, [*overrides, f"train.seed={s}"], crf=crf,
                            segment=segment, segment_config=segment_config, console=console, progress=progress,
                            refine=refine, refine_config=refine_config)
    if seeds == 1:
        summary = runs[seed_list[0]]
    else:
        write_env(out)
        keys = [k for k in runs[seed_list[0]] if k.endswith("_miou")]
        values = {k: [runs[s][k] for s in seed_list if isinstance(runs[s].get(k), (int, float))] for k in keys}
        summary = {
            "config": str(config), "data": str(data_root), "out": str(out), "seeds": seed_list,
            "runs": {str(s): runs[s] for s in seed_list},
            "mean": {k: statistics.fmean(v) for k, v in values.items() if v},
            "sd": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items() if v},
            "protocols": runs[seed_list[0]]["protocols"], "reference": dict(base.reference or {}),
        }
        atomic_write_json(out / "summary.json", summary)
    console.print(summary_table(summary))
    print_alarms(console, summary)
    return summary


def print_alarms(console: Console, summary: dict) -> None:
    """The chains' collapse alarms (wsss.diagnostics), one line each, under the table."""
    from rich.markup import escape

    for s, run in (summary.get("runs") or {"": summary}).items():
        for key, line in (run.get("alarms") or {}).items():
            console.print(f"[bold yellow]warning[/]{f' seed {s}' if s else ''} {key}: {escape(line)}", highlight=False)


def summary_table(summary: dict):
    """A rich Table: one row per measured output: its protocol, mIoU (%) per seed, mean +- sd, the
    reference and the gap."""
    from rich.table import Table

    from wsss.provenance import protocol_text

    runs = summary.get("runs") or {str(summary.get("seed", "")): summary}
    first = next(iter(runs.values()))
    ref = summary.get("reference") or {}
    table = Table(title=f"wsss run: {summary.get('out', '')}", caption=f"reference: {ref['source']}"
                  if ref.get("source") else None)
    table.add_column("output")
    table.add_column("protocol")
    multi = len(runs) > 1
    for s in runs:
        table.add_column(f"seed {s}" if s != "" else "mIoU (%)", justify="right")
    if multi:
        table.add_column("mean +- sd", justify="right")
    if ref:
        table.add_column("reference", justify="right")
        table.add_column("gap", justify="right")
    for key in [k for k in first if k.endswith("_miou")]:
        name = key.removesuffix("_miou")
        vals = [r.get(key) for r in runs.values()]
        row = [name, protocol_text((summary.get("protocols") or {}).get(name))]
        row += [f"{100 * v:.2f}" if isinstance(v, (int, float)) else "-" for v in vals]
        nums = [100 * v for v in vals if isinstance(v, (int, float))]
        mean = statistics.fmean(nums) if nums else None
        if multi:
            sd = statistics.stdev(nums) if len(nums) > 1 else 0.0
            row.append(f"{mean:.2f} +- {sd:.2f}" if mean is not None else "-")
        if ref:
            r = ref.get(name)
            row.append(f"{r:.2f}" if isinstance(r, (int, float)) else "-")
            row.append(f"{mean - r:+.2f}" if isinstance(r, (int, float)) and mean is not None else "-")
        table.add_row(*row)
    return table


def run_demo(
    out: str | Path,
    preset: str = "demo/tkp_pcl",
    overrides: list[str] | tuple[str, ...] = (),
    crf: bool = True,
    segment: bool = True,
) -> dict:
    """`wsss demo`: the embedded benchmark built in OUT/data, then `run_chain` on it in OUT (resumable
    like `wsss run`)."""
    from wsss.data.demo import ensure_demo

    console = Console()
    out = Path(out)
    data_root = out / "data"
    console.rule(f"[bold]embedded benchmark -> {data_root}")
    t0 = time.perf_counter()
    ensure_demo(data_root)
    data_seconds = round(time.perf_counter() - t0, 1)
    summary = run_chain(preset, data_root, out, overrides, crf=crf, segment=segment, demo_dir=out, console=console)
    summary["preset"] = preset
    summary["seconds"] = {"data": data_seconds, **summary["seconds"]}
    summary["total_seconds"] = round(sum(summary["seconds"].values()), 1)
    atomic_write_json(out / "summary.json", summary)
    console.rule("[bold]done")
    console.print(summary_table(summary))
    print_alarms(console, summary)
    console.print(f"{'total':>24}: {summary['total_seconds']:.0f} s   ({out / 'summary.json'})")
    return summary
