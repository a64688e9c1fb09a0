"""The `wsss` command line: parses arguments, loads the config, calls the library. Nothing else.

Library errors that are the user's to fix (ConfigError, DataError, TrainingError) are printed as one
line naming the file or key and exit with code 1; a traceback means a bug in wsss.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from wsss.config import ConfigError, list_presets, load_config
from wsss.errors import WsssError, user_message
from wsss.io import atomic_write_json

app = typer.Typer(
    help="Weakly supervised semantic segmentation: image-level tags in, pixel masks out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Build, inspect, check and prepare datasets.", no_args_is_help=True)
prepare_app = typer.Typer(help="Prepare a downloaded public dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")
data_app.add_typer(prepare_app, name="prepare")

Overrides = Annotated[
    list[str], typer.Option("-o", "--override", help="key=value for any config key, e.g. train.epochs=3")
]




def _print_json_or_write(result: dict, json_file: Path | None) -> None:
    if json_file is not None:
        atomic_write_json(json_file, result)


# -------------------------------------------------------------------------------------------------- demo


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo data and runs.")] = Path("wsss-demo"),
    preset: Annotated[str, typer.Option(help="Method preset to train.")] = "demo/tkp_pcl",
    overrides: Overrides = [],  # noqa: B006 (typer reads the default)
    crf: Annotated[bool, typer.Option(help="Refine the pseudo masks with a dense CRF.")] = True,
    segment: Annotated[bool, typer.Option(help="Train the stage-2 segmentation network.")] = True,
) -> None:
    """The whole pipeline on the embedded benchmark, offline: data, training, pseudo masks, evaluation,
    stage-2 segmentation, report."""
    from wsss.pipeline import run_demo

    run_demo(out, preset=preset, overrides=overrides, crf=crf, segment=segment)


@app.command("run")
def run_all(
    config: Annotated[str, typer.Argument(help="A YAML file or a preset name (see `wsss presets`).")],
    data: Annotated[Path, typer.Option(help="Dataset root (sets data.root).")],
    out: Annotated[Path, typer.Option(help="Folder for every stage's output (a rerun resumes it).")],
    overrides: Overrides = [],  # noqa: B006
    seeds: Annotated[int, typer.Option(help="Train with this many seeds (train.seed, +1, ...): mean +- sd.")] = 1,
    crf: Annotated[bool, typer.Option(help="Dense CRF on the pseudo masks and predictions.")] = True,
    segment: Annotated[bool, typer.Option(help="Train the stage-2 segmentation network.")] = True,
    segment_config: Annotated[
        str | None, typer.Option(help="Stage-2 config or preset (default: the config's pipeline.segment).")
    ] = None,
    refine: Annotated[
        bool, typer.Option(help="Refine the train seeds with AffinityNet + random walk (PSA) before stage 2.")
    ] = False,
    refine_config: Annotated[
        str | None,
        typer.Option(help="AffinityNet config or preset (default: the config's pipeline.refine, else demo/affinity)."),
    ] = None,
) -> None:
    """Tags to a trained segmenter in one command: train, pseudo masks (+ CRF), [--refine: seeds refined by
    a learned affinity], stage 2, predictions and evaluation on val, the report; resumable stage by stage,
    every number with its protocol."""
    from wsss.pipeline import run_pipeline

    run_pipeline(config, data, out, overrides, seeds=seeds, crf=crf, segment=segment,
                 segment_config=segment_config, refine=refine, refine_config=refine_config)


# -------------------------------------------------------------------------------------------------- data


@data_app.command("make-demo")
def data_make_demo(
    out: Annotated[Path, typer.Option(help="Output folder (VOC layout).")],
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same bytes.")] = 0,
    num_train: Annotated[int | None, typer.Option(help="Training images (default: the demo's).")] = None,
    num_val: Annotated[int | None, typer.Option(help="Validation images (default: the demo's).")] = None,
    size: Annotated[str | None, typer.Option(
        help="Image side in px, N or MIN-MAX drawn per image, 96-1024 (default: 200-256).")] = None,
    variant: Annotated[str, typer.Option(
        help="demo: the embedded benchmark (what `wsss demo` uses); hard: ten MNIST digit classes of many "
             "instances, each in its own stroke / fill / shear, 1-3 objects of 0.25-0.6 of the side, "
             "4 distractors. The options below override the variant's values.")] = "demo",
    source: Annotated[str | None, typer.Option(
        help="Objects: demo (digits 3 / 7, coins, horse, cup, retina) or mnist (ten digits, ~500 "
             "instances a class, split by instance between train and val).")] = None,
    object_scale: Annotated[str | None, typer.Option(
        help="An object's longest side as a fraction of the image's short side, F or MIN-MAX, within "
             "0.05-0.9 (default: the demo's fixed 60-180 px).")] = None,
    objects: Annotated[str | None, typer.Option(
        help="Objects an image, N or MIN-MAX, within 1-8 (default: 1 / 2 / 3 at 40 / 35 / 25%).")] = None,
    overlap: Annotated[bool | None, typer.Option(
        "--overlap/--no-overlap", help="Let objects cover up to 40% of earlier ones (default) or keep them apart.")] = None,
    clutter: Annotated[int | None, typer.Option(
        help="Distractor shapes and strokes an image, coloured like the objects, labelled background (0-20).")] = None,
) -> None:
    """Build the embedded benchmark, or another member of its family: real objects pasted on real photos,
    with exact masks. With no option it is the demo's data, byte for byte."""
    from wsss.data.demo import make_demo

    kwargs: dict = {k: v for k, v in (("num_train", num_train), ("num_val", num_val)) if v is not None}
    family = {"source": source, "object_scale": object_scale, "objects": objects, "overlap": overlap,
              "clutter": clutter}
    try:
        if size is not None:
            sides = [int(v) for v in size.replace(",", "-").split("-") if v.strip()]
            if len(sides) not in (1, 2):
                raise ValueError
            kwargs["size"] = sides[0] if len(sides) == 1 else (sides[0], sides[1])
    except ValueError:
        raise ConfigError(f"make-demo --size: expected N or MIN-MAX in px, got {size!r}") from None
    try:
        summary = make_demo(out, seed=seed, variant=variant, **kwargs,
                            **{k: v for k, v in family.items() if v is not None})
    except ValueError as e:
        raise ConfigError(f"make-demo: {e}") from None
    typer.echo(json.dumps(summary, indent=2, default=str))


@data_app.command("info")
def data_info(
    root: Path,
    json_file: Annotated[Path | None, typer.Option("--json", help="Also write the info as JSON here.")] = None,
    format: Annotated[str, typer.Option(help="auto | voc | coco | folder")] = "auto",
) -> None:
    """Images, classes, splits, tag statistics and each image's tags."""
    from wsss.data.info import dataset_info, format_info

    info = dataset_info(root, format=format)
    typer.echo(format_info(info))
    _print_json_or_write(info, json_file)


@data_app.command("check")
def data_check(
    root: Path,
    format: Annotated[str, typer.Option(help="auto | voc | coco | folder")] = "auto",
    split: Annotated[list[str], typer.Option(help="Only these splits (default: all).")] = [],  # noqa: B006
) -> None:
    """Decode every image and mask; exit 1 naming every bad file."""
    from wsss.data.check import check_dataset

    problems = check_dataset(root, format=format, splits=split or None)
    for p in problems:
        typer.echo(p, err=True)
    if problems:
        typer.echo(f"{len(problems)} problem(s) in {root}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{root}: OK")


@prepare_app.command("voc")
def data_prepare_voc(
    root: Annotated[Path, typer.Option(help="VOCdevkit/VOC2012 folder.")],
    sbd: Annotated[Path | None, typer.Option(help="SBD benchmark_RELEASE/dataset folder (for train_aug).")] = None,
) -> None:
    """Tags, SegmentationClassAug and train_aug from an extracted VOC 2012 (+ SBD)."""
    from wsss.data.prepare import prepare_voc

    typer.echo(json.dumps(prepare_voc(root, sbd_root=sbd), indent=2, default=str))


@prepare_app.command("coco")
def data_prepare_coco(root: Annotated[Path, typer.Option(help="COCO 2014 root folder.")]) -> None:
    """Check a COCO 2014 layout (masks are rendered from instances on the fly)."""
    from wsss.data.prepare import prepare_coco

    typer.echo(json.dumps(prepare_coco(root), indent=2, default=str))


# ------------------------------------------------------------------------------------------ train / infer


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="A YAML file or a preset name (see `wsss presets`).")],
    overrides: Overrides = [],  # noqa: B006
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<config name>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from RUN/last.pt.")] = False,
    skip_bad: Annotated[
        bool, typer.Option(help="Skip unreadable samples, listed in RUN/skipped.txt (data.skip_bad=true).")
    ] = False,
) -> None:
    """Train a weakly supervised method (under torchrun: distributed)."""
    from wsss.engine.trainer import train as run_training

    cfg = load_config(config, [*overrides, "data.skip_bad=true"] if skip_bad else overrides)
    out = out or Path("runs") / Path(config).stem
    summary = run_training(cfg, out, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        typer.echo(json.dumps(summary, indent=2, default=str))


@app.command("pseudo-label")
def pseudo_label(
    run: Path,
    data: Annotated[Path, typer.Option(help="Dataset root.")],
    out: Annotated[Path, typer.Option(help="Folder for <id>.png masks.")],
    split: Annotated[str, typer.Option(help="Split to label.")] = "train",
    checkpoint: Annotated[Path | None, typer.Option(help="Default: RUN/best.pt, else RUN/last.pt.")] = None,
    crf: Annotated[bool, typer.Option(help="Refine with a dense CRF over the present classes.")] = False,
    predicted_tags: Annotated[bool, typer.Option(help="Use the model's tags instead of the dataset's.")] = False,
    scales: Annotated[str | None, typer.Option(help="Comma-separated test scales, e.g. 0.5,1,1.5.")] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", help="Average with h-flipped maps.")] = None,
    bg_threshold: Annotated[
        float | None, typer.Option(help="Background score for methods without a background class (CAM).")
    ] = None,
    absent: Annotated[str | None, typer.Option(
        help="drop | background | won: where a background-channel method's ruled-out classes' probability goes "
             "(infer.absent; default: the run's config).")] = None,
    extent_guard: Annotated[bool | None, typer.Option(
        "--extent-guard/--no-extent-guard",
        help="Check the masks' extent against the run's own classifier: grow masks that are far too small, "
             "shrink masks over infer.extent_max_area of the pixels to infer.extent_target_area "
             "(infer.extent_guard; default: the run's config; not with --bg-threshold).")] = None,
    save_maps: Annotated[bool, typer.Option(help="Also save float16 class maps (maps/<id>.npz).")] = False,
    sweep_threshold: Annotated[
        str | None, typer.Option(help="start:stop:step of background thresholds to sweep (no PNGs written).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    skip_bad: Annotated[
        bool, typer.Option(help="Skip unreadable images and masks, listed in the summary, instead of stopping.")
    ] = False,
) -> None:
    """Pseudo masks from a trained run (resumable: finished files are skipped)."""
    from wsss.engine.pseudo_masks import pseudo_label as run_pseudo_label

    sweep = _parse_range(sweep_threshold) if sweep_threshold else None
    summary = run_pseudo_label(
        run,
        data,
        split,
        out,
        checkpoint=checkpoint,
        crf=crf,
        predicted_tags=predicted_tags,
        scales=[float(s) for s in scales.split(",")] if scales else None,
        flip=flip,
        bg_threshold=bg_threshold,
        absent=absent,
        extent_guard=extent_guard,
        save_maps=save_maps,
        sweep_thresholds=sweep,
        device=device,
        skip_bad=skip_bad,
    )
    typer.echo(json.dumps(_brief(summary), indent=2, default=str))


@app.command()
def refine(
    run: Path,
    seeds: Annotated[Path, typer.Option(help="A pseudo-label folder made with --save-maps (maps/<id>.npz).")],
    data: Annotated[Path, typer.Option(help="Dataset root.")],
    out: Annotated[Path, typer.Option(help="Folder for the refined <id>.png masks.")],
    split: Annotated[str, typer.Option(help="Split to refine (AffinityNet trains on its images).")] = "train",
    config: Annotated[
        str | None, typer.Option(help="AffinityNet preset or YAML (default: RUN/config.yaml, else demo/affinity).")
    ] = None,
    overrides: Overrides = [],  # noqa: B006
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    skip_bad: Annotated[
        bool, typer.Option(help="Skip unreadable images and seed maps, listed in the summary, instead of stopping.")
    ] = False,
    sweep_threshold: Annotated[
        str | None,
        typer.Option(help="start:stop:step: choose the background threshold on SPLIT's masks (PSA: on train) "
                     "instead of method.bg_threshold; OUT/sweep.json lists them."),
    ] = None,
    crf: Annotated[bool, typer.Option(help="Dense CRF (infer.crf) on the walked scores, after the threshold.")] = False,
    crf_masks: Annotated[
        Path | None,
        typer.Option(help="The seeds' CRF masks (`wsss pseudo-label RUN --crf`): with method.merge fill (auto: "
                     "seeds cut at a threshold) they keep their foreground and the walk labels their background; "
                     "with relabel (auto: seeds with a background channel) they give the class where both say "
                     "foreground."),
    ] = None,
) -> None:
    """Refine seeds with a learned affinity (PSA): confident labels, AffinityNet in RUN, random walk
    (resumable: finished files are skipped)."""
    from wsss.engine.refine import refine as run_refine

    if config is None:
        config = str(run / "config.yaml") if (run / "config.yaml").is_file() else "demo/affinity"
    cfg = load_config(config, overrides)
    sweep = _parse_range(sweep_threshold) if sweep_threshold else None
    summary = run_refine(cfg, run, seeds, data, split, out, device=device, skip_bad=skip_bad, sweep_thresholds=sweep,
                         crf=crf, crf_masks=crf_masks)
    typer.echo(json.dumps(_brief(summary), indent=2, default=str))


def _parse_range(text: str) -> list[float]:
    try:
        start, stop, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--sweep-threshold {text!r}: expected start:stop:step, e.g. 0.1:0.6:0.05") from None
    n = int(round((stop - start) / step)) + 1
    return [round(start + i * step, 6) for i in range(max(n, 1))]


def _brief(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("per_class", "confusion")}


@app.command()
def evaluate(
    pred_dir: Path,
    data: Annotated[Path, typer.Option(help="Dataset root with ground-truth masks.")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "val",
    json_file: Annotated[Path | None, typer.Option("--json", help="Write the result as JSON here.")] = None,
) -> None:
    """mIoU of a folder of <id>.png class-id masks against the ground truth."""
    from wsss.evaluation.evaluate import evaluate_dir
    from wsss.evaluation.metrics import per_class_table

    result = evaluate_dir(pred_dir, data, split=split)
    typer.echo(per_class_table(result, list(result["per_class"])))
    _print_json_or_write(result, json_file)


@app.command()
def segment(
    config: Annotated[str, typer.Argument(help="A YAML file or preset, e.g. demo/segment.")],
    pseudo: Annotated[Path, typer.Option(help="Folder of pseudo masks for the training split.")],
    out: Annotated[Path, typer.Option(help="Run folder.")],
    overrides: Overrides = [],  # noqa: B006
    resume: Annotated[bool, typer.Option(help="Continue from RUN/last.pt.")] = False,
) -> None:
    """Train the stage-2 segmentation network on pseudo masks."""
    from wsss.segment.train import train_segmenter

    cfg = load_config(config, overrides)
    summary = train_segmenter(cfg, pseudo, out, resume=resume)
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def predict(
    run: Path,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    out: Annotated[Path, typer.Option(help="Folder for the masks.")],
    overlay: Annotated[bool, typer.Option(help="Also write <name>_overlay.jpg.")] = False,
    crf: Annotated[bool, typer.Option(help="Refine with a dense CRF over the predicted classes.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Masks for new images (no tags needed), from a stage-2 or stage-1 run (resumable)."""
    from wsss.segment.predict import predict as run_predict

    summary = run_predict(run, images, out, overlay=overlay, crf=crf, device=device)
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def report(run: Path) -> None:
    """Write RUN/report.html: config, curves, per-class IoU, a gallery, timings."""
    from wsss.report.html import write_report

    typer.echo(str(write_report(run)))


@app.command()
def presets() -> None:
    """List the packaged config presets."""
    for name in list_presets():
        typer.echo(name)


def main() -> None:
    try:
        app()
    except WsssError as e:
        typer.echo(f"error: {user_message(e)}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
