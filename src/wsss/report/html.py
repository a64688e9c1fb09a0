"""`wsss report RUN`: one self-contained HTML page a person can read (RUN/report.html).

Sections: at the top one line per collapse alarm (wsss.diagnostics), the resolved config (RUN/config.yaml),
training curves (RUN/log.jsonl: loss terms and val mIoU per epoch), per-class IoU of the evaluated outputs,
a gallery of val images, timings. Images and plots
are embedded as base64 PNG data URIs and the styles are inline: the file references nothing outside
itself, so it can be mailed or archived as it is. Every text from files is escaped.

Outputs (folders of `<id>.png` masks with a `summary.json` from `wsss pseudo-label` / `predict_dataset`)
are discovered by one rule:
- with `demo_dir` (the `wsss demo` layout): DEMO/pseudo/val "pseudo", DEMO/pseudo/val_crf "pseudo + CRF",
  DEMO/predict/val "stage 2", DEMO/predict/val_crf "stage 2 + CRF", each when present; the data is DEMO/data. When not given, `demo_dir` is
  RUN's parent if that is a demo folder (it holds data/.wsss_demo.json), so `wsss report wsss-demo/run`
  shows what `wsss demo` showed;
- always: every folder under RUN (3 levels deep at most) holding a summary.json with a `per_class` entry,
  labelled by its path relative to RUN (so `wsss pseudo-label RUN --out RUN/pseudo_val` is found);
- `outputs={label: folder}` adds folders anywhere (library use).
The gallery shows up to 8 images of the run's val split (data from the run's `data.root` unless
`demo_dir`), one column per output holding that image's mask; ground truth when the split has masks.
When an output holds refined masks (`wsss refine` / `wsss run --refine`, made on train), a second gallery
shows the train split with every output of it (CRF pseudo masks next to the refined ones).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.io import atomic_write_text, read_mask

GALLERY_ROWS = 8
THUMB = 224  # longest side of a gallery cell, px
DEMO_OUTPUTS = (("pseudo", "pseudo/val"), ("pseudo + CRF", "pseudo/val_crf"), ("stage 2", "predict/val"),
                ("stage 2 + CRF", "predict/val_crf"))
LOG_NON_LOSS = {"epoch", "lr", "step", "seconds", "img_s", "miou", "val_seconds"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;
color:#1d1d1f;padding:0 16px;background:#fff}
h1{font-size:26px}h2{font-size:20px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
pre{background:#f5f5f7;padding:12px;overflow:auto;font-size:12px;max-height:420px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f5f5f7}td.l,th.l{text-align:left}.gallery td{padding:2px;text-align:center;vertical-align:top}
.alarm{background:#fff3cd;border-left:4px solid #d9822b;padding:6px 10px;margin:6px 0}
.gallery{width:100%;table-layout:fixed}.gallery th{text-align:center}.gallery img{display:block;width:100%;max-width:224px;height:auto}.muted{color:#888}img.plot{max-width:100%}
"""


# ------------------------------------------------------------------------------------------------ pieces


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _png_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fig_uri(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # no pyplot: no global backend state, no display needed
    buf = io.BytesIO()
    canvas.print_png(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str, cls: str = "") -> str:
    return f'<img src="{uri}" alt="{_e(alt)}"{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>'


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_log(path: Path) -> list[dict]:
    """The epoch records of RUN/log.jsonl (a torn last line, from a kill, is ignored)."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return [r for r in records if isinstance(r, dict) and "epoch" in r]


def discover_outputs(run_dir: Path, demo_dir: Path | None = None, extra: dict | None = None) -> dict[str, Path]:
    """{label: folder} of evaluated mask folders, by the rule in the module doc."""
    found: dict[str, Path] = {}
    if demo_dir is not None:
        for label, rel in DEMO_OUTPUTS:
            if (demo_dir / rel).is_dir():
                found[label] = demo_dir / rel
    taken = {p.resolve() for p in found.values()}
    for summary in sorted(run_dir.glob("*/summary.json")) + sorted(run_dir.glob("*/*/summary.json")) + sorted(
        run_dir.glob("*/*/*/summary.json")
    ):
        data = _read_json(summary)
        if isinstance(data, dict) and "per_class" in data and summary.parent.resolve() not in taken:
            found[str(summary.parent.relative_to(run_dir))] = summary.parent
            taken.add(summary.parent.resolve())
    for label, folder in (extra or {}).items():
        found[str(label)] = Path(folder)
    return found


# ---------------------------------------------------------------------------------------------- sections


def _alarms(run_dir: Path, records: list[dict], found: dict[str, Path], demo_dir: Path | None) -> str:
    """One line per collapse alarm (wsss.diagnostics): the last training check's (log.jsonl "masks"), and
    each mask folder's (summary.json "diagnostics"): the outputs, every folder under RUN (or the demo
    folder) with a summary.json, masks or not."""
    lines = []
    last = next((r for r in reversed(records) if isinstance(r.get("masks"), dict)), None)
    if last is not None and last["masks"].get("alarm"):
        lines.append(f"training, epoch {last['epoch']}: {last['masks']['alarm']}")
    folders = dict(found)
    for base in [run_dir, *([demo_dir] if demo_dir is not None else [])]:
        for summary in sorted(base.glob("*/summary.json")) + sorted(base.glob("*/*/summary.json")):
            folders.setdefault(str(summary.parent.relative_to(base)), summary.parent)
    seen = set()
    for label, folder in folders.items():
        s = _read_json(Path(folder) / "summary.json")
        text = ((s.get("diagnostics") or {}).get("alarm") if isinstance(s, dict) else None)
        if text and Path(folder).resolve() not in seen:
            seen.add(Path(folder).resolve())
            lines.append(f"{label}: {text}")
    return "".join(f'<p class="alarm">&#9888; {_e(line)}</p>' for line in lines)


def _curves(records: list[dict]) -> str:
    if not records:
        return '<p class="muted">No training log (log.jsonl) in this run.</p>'
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    terms = [k for k in records[0] if k not in LOG_NON_LOSS and isinstance(records[0][k], (int, float))]
    val = [(r["epoch"], r["miou"]) for r in records if isinstance(r.get("miou"), (int, float))]
    fig = Figure(figsize=(11, 3.6), dpi=100)
    ax = fig.add_subplot(1, 2, 1)
    for k in terms:
        ax.plot(epochs, [r.get(k, np.nan) for r in records], marker="o", label=k)
    ax.set(xlabel="epoch", ylabel="mean per step", title="training losses")
    ax.grid(alpha=0.3)
    if terms:
        ax.legend(fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    if val:
        ax2.plot(*zip(*val, strict=True), marker="o", color="tab:green")
        ax2.set_ylim(0, max(1e-3, max(v for _, v in val)) * 1.15)
    else:
        ax2.text(0.5, 0.5, "no validation masks", ha="center", va="center", transform=ax2.transAxes)
    ax2.set(xlabel="epoch", ylabel="mIoU", title="val mIoU")
    ax2.grid(alpha=0.3)
    ax2.set_xlim(ax.get_xlim())
    for a in (ax, ax2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _img(_fig_uri(fig), "training curves", "plot")


def _per_class(summaries: dict[str, dict]) -> str:
    if not summaries:
        return '<p class="muted">No evaluated outputs found (see the discovery rule in wsss.report.html).</p>'
    from matplotlib.figure import Figure

    names = list(next(iter(summaries.values()))["per_class"])
    n = len(summaries)
    width = 0.8 / n
    fig = Figure(figsize=(11, 3.8), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    for j, (label, s) in enumerate(summaries.items()):
        ious = [(s["per_class"].get(c) or {}).get("iou") for c in names]
        miou = s.get("miou")
        shown = f"{label} (mIoU {100 * miou:.1f})" if isinstance(miou, (int, float)) else label
        ax.bar(x + (j - (n - 1) / 2) * width, [100 * v if v is not None else 0 for v in ious], width, label=shown)
    ax.set_xticks(x, names, rotation=30 if len(names) > 8 else 0, ha="right" if len(names) > 8 else "center",
                  fontsize=8)
    ax.set(ylabel="IoU (%)", ylim=(0, 100), title="per-class IoU")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))  # outside: bars reach 100
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    rows = "".join(
        f"<tr><td class=l>{_e(label)}</td><td>{_e(s.get('split', ''))}</td>"
        f"<td>{_e(s.get('crf', ''))}</td><td>{_e(s.get('predicted_tags', ''))}</td>"
        f"<td>{100 * s['miou']:.2f}</td>{_foreground_cells(s)}<td class=l>{_e(_protocol_line(s))}</td></tr>"
        for label, s in summaries.items()
        if isinstance(s.get("miou"), (int, float))
    )
    table = (
        "<table><tr><th class=l>output</th><th>split</th><th>CRF</th><th>predicted tags</th><th>mIoU (%)</th>"
        "<th title='all classes as one: the masks&#39; extent'>foreground IoU (%)</th>"
        "<th title='of the pixels both call foreground, those with the right class'>right class (%)</th>"
        "<th class=l>protocol</th></tr>"
        f"{rows}</table>"
    )
    return _img(_fig_uri(fig), "per-class IoU", "plot") + table


def _foreground_cells(summary: dict) -> str:
    """The extent / class-assignment split of the mIoU (ConfusionMatrix._foreground); blank in summaries
    written before wsss recorded it."""
    fg = summary.get("foreground") or {}
    return "".join(f"<td>{100 * v:.1f}</td>" if isinstance(v, (int, float)) else "<td></td>"
                   for v in (fg.get("iou"), fg.get("class_accuracy")))


def _protocol_line(summary: dict) -> str:
    from wsss.provenance import protocol_text

    return protocol_text(summary.get("protocol"))


def _provenance(run_dir: Path) -> str:
    """RUN/env.json (wsss.provenance): what made this run."""
    env = _read_json(run_dir / "env.json")
    if not isinstance(env, dict):
        return '<p class="muted">No env.json in this run (made before wsss recorded provenance).</p>'
    git = env.get("git") or {}
    commit = f"{git.get('commit', '')}{' (dirty)' if git.get('dirty') else ''}" if git else "not a git checkout"
    rows = [("wsss", env.get("wsss")), ("git commit", commit), ("command", " ".join(map(str, env.get("argv") or []))),
            ("python", env.get("python")), ("torch", env.get("torch")), ("timm", env.get("timm")),
            ("CUDA", env.get("cuda")), ("cuDNN", env.get("cudnn")), ("devices", ", ".join(map(str, env.get("devices") or []))),
            ("CPU", env.get("cpu")), ("threads", env.get("threads")),
            ("world size", env.get("world_size")), ("host", env.get("host"))]
    body = "".join(f"<tr><td class=l>{_e(k)}</td><td class=l>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table class=provenance>{body}</table>"


def _thumb(image: Image.Image) -> Image.Image:
    im = image.copy()
    im.thumbnail((THUMB, THUMB))
    return im


def _gallery(data_root: Path | None, split: str, outputs: dict[str, Path]) -> tuple[str, int]:
    """(html, number of rows)."""
    from wsss.segment.predict import overlay_mask

    if data_root is None or not Path(data_root).is_dir():
        return f'<p class="muted">Dataset not found ({_e(data_root)}): no gallery.</p>', 0
    from wsss.data import open_dataset
    from wsss.errors import DataError

    try:
        ds = open_dataset(data_root, split)
    except DataError as e:
        return f'<p class="muted">No gallery: {_e(e)}</p>', 0
    ids = ds.ids[:GALLERY_ROWS]
    cols = [label for label, d in outputs.items() if any((d / f"{i}.png").is_file() for i in ids)]
    head = "<tr><th>image</th>" + ("<th>ground truth</th>" if ds.has_masks else "")
    head += "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>"
    rows = []
    for k, id_ in enumerate(ids):
        try:
            image = ds.load_image(k)
            gt = ds.load_mask(k) if ds.has_masks else None
        except DataError as e:
            rows.append(f"<tr><td colspan={2 + len(cols)} class=l>{_e(e)}</td></tr>")
            continue
        thumb = _thumb(image)
        cells = [f"<td>{_img(_png_uri(thumb), f'{id_}')}<div class=muted>{_e(id_)}</div></td>"]
        masks = ([gt] if ds.has_masks else []) + [
            read_mask(outputs[c] / f"{id_}.png") if (outputs[c] / f"{id_}.png").is_file() else None for c in cols
        ]
        for label, m in zip((["ground truth"] if ds.has_masks else []) + cols, masks, strict=True):
            if m is None or m.shape != (image.height, image.width):
                cells.append('<td class="muted">-</td>')
            else:
                cells.append(f"<td>{_img(_png_uri(_thumb(overlay_mask(image, m))), f'{id_} {label}')}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = f"<p class=muted>{len(ids)} of {len(ds)} images of split {_e(split)} ({_e(data_root)}); " \
           "masks blended over the image in the VOC palette colours.</p>"
    return note + f'<table class="gallery">{head}{"".join(rows)}</table>', len(ids)


def _refined_gallery(data_root: Path | None, split: str, outputs: dict[str, Path]) -> str:
    """When an output holds refined masks (`wsss refine`, protocol stage "refined"; they are made on the
    train split): a second gallery of that split, one column per output of it (e.g. CRF vs refined)."""
    on_split, refined = {}, False
    for label, folder in outputs.items():
        s = _read_json(folder / "summary.json")
        if isinstance(s, dict) and s.get("split") == split:
            on_split[label] = folder
            refined = refined or (s.get("protocol") or {}).get("stage") == "refined"
    if not refined:
        return ""
    html_, _ = _gallery(data_root, split, on_split)
    return f"<h3>Refined masks (split {_e(split)})</h3>" + html_


def _timings(records: list[dict], demo_summary: dict | None) -> str:
    parts = []
    if demo_summary and isinstance(demo_summary.get("seconds"), dict):
        rows = "".join(f"<tr><td class=l>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in demo_summary["seconds"].items())
        total = demo_summary.get("total_seconds")
        rows += f"<tr><th class=l>total</th><th>{_e(total)}</th></tr>" if total is not None else ""
        parts.append(f"<h3>Pipeline steps (s)</h3><table><tr><th class=l>step</th><th>seconds</th></tr>{rows}</table>")
    if records:
        keys = [k for k in ("seconds", "val_seconds", "img_s", "lr") if any(k in r for r in records)]
        head = "<tr><th>epoch</th>" + "".join(f"<th>{_e(k)}</th>" for k in keys) + "</tr>"
        body = "".join(
            f"<tr><td>{_e(r['epoch'])}</td>" + "".join(f"<td>{_e(_fmt(r.get(k, '')))}</td>" for k in keys) + "</tr>"
            for r in records
        )
        parts.append(f"<h3>Per epoch</h3><table>{head}{body}</table>")
    return "".join(parts) or '<p class="muted">No timings recorded.</p>'


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------- the page


def write_report(run_dir: str | Path, demo_dir: str | Path | None = None, outputs: dict | None = None) -> Path:
    """Write RUN/report.html (atomically) and return its path; see the module doc for what it shows."""
    from wsss.errors import DataError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run folder not found")
    from wsss.data.demo import MARKER  # written last into DEMO/data by the demo builder

    if demo_dir is None and (run_dir.resolve().parent / "data" / MARKER).is_file():
        demo_dir = run_dir.resolve().parent
    demo_dir = Path(demo_dir) if demo_dir is not None else None
    config_text = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").is_file() else ""
    records = read_log(run_dir / "log.jsonl")
    found = discover_outputs(run_dir, demo_dir, outputs)
    summaries = {}
    for label, folder in found.items():
        s = _read_json(folder / "summary.json")
        if isinstance(s, dict) and isinstance(s.get("per_class"), dict):
            summaries[label] = s

    import yaml

    cfg = (yaml.safe_load(config_text) if config_text else None) or {}
    data_cfg = cfg.get("data", {}) if isinstance(cfg, dict) else {}
    data_root = demo_dir / "data" if demo_dir is not None else (Path(data_cfg["root"]) if data_cfg.get("root") else None)
    split = data_cfg.get("val_split") or "val"
    gallery, _ = _gallery(data_root, split, found)
    gallery += _refined_gallery(data_root, data_cfg.get("train_split") or "train", found)
    demo_summary = _read_json(demo_dir / "summary.json") if demo_dir is not None else None
    method = (cfg.get("method") or {}).get("name", "?") if isinstance(cfg, dict) else "?"
    backbone = ((cfg.get("model") or {}).get("backbone") or {}).get("name", "?") if isinstance(cfg, dict) else "?"
    best = [r["miou"] for r in records if isinstance(r.get("miou"), (int, float))]
    headline = f"method <b>{_e(method)}</b>, backbone <b>{_e(backbone)}</b>, {len(records)} epochs logged"
    if best:
        headline += f", best val mIoU {100 * max(best):.2f}%"

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>wsss report: {_e(run_dir.name)}</title>
<style>{CSS}</style></head><body>
<h1>wsss report: {_e(run_dir.name)}</h1>
<p>{headline}.<br><span class="muted">{_e(run_dir.resolve())}</span></p>
{_alarms(run_dir, records, found, demo_dir)}
<h2 id="curves">Training curves</h2>
{_curves(records)}
<h2 id="per-class">Per-class IoU</h2>
{_per_class(summaries)}
<h2 id="gallery">Gallery</h2>
{gallery}
<h2 id="timings">Timings</h2>
{_timings(records, demo_summary)}
<h2 id="provenance">Provenance</h2>
{_provenance(run_dir)}
<h2 id="config">Config</h2>
<pre>{_e(config_text) or '<span class="muted">no config.yaml</span>'}</pre>
</body></html>
"""
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path
