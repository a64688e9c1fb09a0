"""Pseudo-label throughput (images/s) and peak memory of `wsss.engine.pseudo_masks.pseudo_label` on the demo
data, without and with the dense CRF, and the streaming claim: peak RSS does not grow with the number of
images (the same run over subsets of val of increasing size).

The run folder comes from a one-step training (epochs=1, max_steps_per_epoch=1, random backbone
weights): throughput does not depend on the weights. Each pseudo-labelling runs in a fresh process, so
its peak RSS is its own; loader / CRF worker processes are reported separately (largest one).
Memory: the peak of the current RSS while `pseudo_label` runs, sampled every 20 ms, of the main process
and of the process tree (loader / CRF workers summed; pages shared after fork counted per process).
Throughput counts everything `pseudo_label` does (loading the run, decoding, class maps at the preset's
scales/flips, CRF, PNG writing, mIoU); "marginal" is (n2 - n1) / (t2 - t1) between two sizes, which
leaves out the fixed start-up.

    python benchmarks/bench_infer.py                      # demo/tkp_pcl, val subsets of 50 and 200 images
    python benchmarks/bench_infer.py --preset demo/usage_cnn --sizes 50,100,200
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import CPUShare, RSSPeak, machine, run_isolated, table, write_section


def label(run_dir: str, data_root: str, split: str, out_dir: str, crf: bool, threads: int = 0) -> dict:
    """One pseudo-labelling pass (run isolated for its peak RSS)."""
    import torch

    from wsss.engine.pseudo_masks import pseudo_label

    if threads:
        torch.set_num_threads(threads)
    with RSSPeak() as rss:
        t0 = time.perf_counter()
        res = pseudo_label(run_dir, data_root, split, out_dir, crf=crf, device="cpu", progress=False)
        secs = time.perf_counter() - t0
    return {"split": split, "crf": crf, "images": res["num_images"], "seconds": secs, "miou": res.get("miou"),
            "rss_at_start_mb": rss.start_mb, "peak_rss_mb": rss.main_mb, "tree_peak_rss_mb": rss.tree_mb}


def prepare(work: Path, data: Path, preset: str, num_train: int, num_val: int, sizes: list[int],
            image_size: int | None) -> Path:
    """Demo data with val subsets `val_<n>`, and a one-step run folder; returns the run folder."""
    from wsss.config import load_config
    from wsss.data.demo import ensure_demo
    from wsss.engine.trainer import train

    kw = {"size": image_size} if image_size else {}
    ensure_demo(data, seed=0, num_train=num_train, num_val=num_val, **kw)
    ids = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    for n in sizes:
        (data / "ImageSets" / "Segmentation" / f"val_{n}.txt").write_text("".join(f"{i}\n" for i in ids[:n]))
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(preset, [f"data.root={data}", "data.val_split=", "train.epochs=1", "train.max_steps_per_epoch=1",
                               "train.batch_size=4", "model.backbone.pretrained=false"])
    train(cfg, run, progress=False)
    return run


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo/tkp_pcl")
    ap.add_argument("--sizes", default="50,200", help="val subset sizes (the largest is --num-val)")
    ap.add_argument("--num-train", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=0, help="demo image side (default: the demo's 200-256 px)")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--data", type=Path, help="demo data folder (default: under --work)")
    ap.add_argument("--no-crf", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-isolate", action="store_true", help="run in this process (peak RSS not per run)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--write", action="store_true", help="update the section of benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    command = "python benchmarks/bench_infer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if args.threads:  # here too, so the machine line tells the threads the runs used
        import torch

        torch.set_num_threads(args.threads)
    tmp = None if args.work else tempfile.mkdtemp(prefix="wsss-bench-infer-")
    work = args.work or Path(tmp)
    try:
        data = args.data or work / "data"
        with CPUShare() as share:
            run = prepare(work, data, args.preset, args.num_train, max(sizes), sizes, args.image_size or None)
            rows = []
            for crf in (False,) if args.no_crf else (False, True):
                for n in sizes:
                    out = work / f"masks_{n}_{'crf' if crf else 'plain'}"
                    shutil.rmtree(out, ignore_errors=True)
                    kw = dict(run_dir=str(run), data_root=str(data), split=f"val_{n}", out_dir=str(out), crf=crf,
                              threads=args.threads)
                    r = label(**kw) if args.no_isolate else run_isolated(Path(__file__).resolve(), "label", kw)
                    r["img_s"] = r["images"] / r["seconds"]
                    rows.append(r)
                    print(f"crf={crf} n={n}: {r['img_s']:.1f} img/s, peak RSS {r['peak_rss_mb']:.0f} MiB",
                          file=sys.stderr, flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    from wsss.config import load_config

    icfg = load_config(args.preset).infer
    for crf in {r["crf"] for r in rows}:
        sub = [r for r in rows if r["crf"] == crf]
        if len(sub) > 1:
            a, b = sub[0], sub[-1]
            for r in sub:
                r["marginal_img_s"] = (b["images"] - a["images"]) / max(b["seconds"] - a["seconds"], 1e-9)
                r["rss_growth_mb"] = b["peak_rss_mb"] - a["peak_rss_mb"]
    result = {"command": command, "machine": machine(), "cpu_share": share.note(), "shared": share.shared,
              "preset": args.preset, "scales": icfg.scales, "flip": icfg.flip, "rows": rows}
    body = table(
        ["CRF", "images", "seconds", "img/s (all in)", "img/s (marginal)", "peak RSS MiB", "RSS at start MiB",
         "with workers MiB"],
        [["yes" if r["crf"] else "no", r["images"], f"{r['seconds']:.1f}", f"{r['img_s']:.1f}",
          f"{r['marginal_img_s']:.1f}" if "marginal_img_s" in r else "-", f"{r['peak_rss_mb']:.0f}",
          f"{r['rss_at_start_mb']:.0f}", f"{r['tree_peak_rss_mb']:.0f}"] for r in rows])
    growth = "; ".join(f"{'with' if c else 'without'} CRF: peak RSS {sub[0]['peak_rss_mb']:.0f} -> "
                       f"{sub[-1]['peak_rss_mb']:.0f} MiB from {sub[0]['images']} to {sub[-1]['images']} images"
                       for c in (False, True) if len(sub := [r for r in rows if r["crf"] == c]) > 1)
    result["markdown"] = (
        f"Command: `{command}`  \nMachine: {result['machine']}.  \n{share.note()}.  \n"
        f"`{args.preset}` run (random weights, one training step), demo val images "
        f"({f'{args.image_size} px' if args.image_size else '200-256 px'}), inference at "
        f"scales {icfg.scales}, flip {icfg.flip}, CPU; each row a fresh process. RSS: peak of the current "
        f"RSS during the call (sampled), main process and main + workers (shared pages counted per process).\n\n{body}\n\n"
        + (f"Streaming: {growth}.\n" if growth else ""))
    print(result["markdown"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.write:
        write_section("infer", "Pseudo-label throughput", result["markdown"])
    return result


if __name__ == "__main__":
    main()
