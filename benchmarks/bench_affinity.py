"""Cost of seed refinement by learned affinity (`wsss refine`, `wsss.postprocess.affinity`):

1. the sparse random walk for one 500 x 375 image (VOC's typical size): transition matrix on the feature
   grid (radius 5), 2^logt steps, upsampling and the background threshold (`walk_maps` + `walk_to_mask`),
   per feature stride: ms (median of --repeat) and memory: the sparse matrix's bytes (indices + weights)
   against a dense N x N float32 matrix, and the process's peak RSS growth during the calls;
2. memory flat in the number of images: the walk of --images images in a row, as `refine` streams them,
   peak RSS growth after the first image and after the last;
3. AffinityNet training throughput: forward_losses + backward + SGD step on random images and random
   confident-label masks, img/s (median over --steps), for the demo preset and, with --psa, the VOC preset
   (ResNet-38d at 448; slow on a CPU: small batch).

    python benchmarks/bench_affinity.py                          # CPU, 1 thread
    python benchmarks/bench_affinity.py --psa --psa-batch 2 --write
    python benchmarks/bench_affinity.py --device cuda --psa --write   # on a GPU (peak: max_memory_allocated)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import CPUShare, RSSPeak, machine, table, timings, write_section

from wsss.config import load_config
from wsss.methods import create_method
from wsss.methods.affinity import AffinityConfig
from wsss.postprocess.affinity import disk_offsets, walk_maps, walk_to_mask

H, W = 375, 500


def walk_case(stride: int, classes: int, dim: int, device: str, repeat: int, logt: int, radius: int) -> dict:
    gh, gw = -(-H // stride), -(-W // stride)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(dim, gh, gw, generator=g).to(device)
    probs = torch.rand(classes + 1, H, W, generator=g)
    cfg = AffinityConfig(radius=radius, logt=logt)
    keep = list(range(classes + 1))
    n, m = gh * gw, 1 + len(disk_offsets(radius))

    def once():
        return walk_to_mask(walk_maps(feats, probs, cfg), keep, cfg, (H, W))

    once()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with RSSPeak() as rss:
        times = timings(device, once, repeat)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else rss.main_mb - rss.start_mb)
    return {"stride": stride, "grid": f"{gh}x{gw}", "nodes": n, "neighbours": m, "ms": statistics.median(times) * 1000,
            "sparse_mib": n * m * (8 + 4) / 2**20, "dense_mib": n * n * 4 / 2**20, "peak_mib": peak}


def stream_case(images: int, stride: int, dim: int, classes: int, device: str) -> dict:
    """Peak RSS growth after one image and after `images` images, walked one after the other."""
    cfg = AffinityConfig()
    keep = list(range(classes + 1))
    gh, gw = -(-H // stride), -(-W // stride)
    out = {}
    with RSSPeak() as rss:
        for k in range(images):
            g = torch.Generator().manual_seed(k)
            feats = torch.randn(dim, gh, gw, generator=g).to(device)
            probs = torch.rand(classes + 1, H, W, generator=g)
            walk_to_mask(walk_maps(feats, probs, cfg), keep, cfg, (H, W))
            if k == 0:
                time.sleep(0.05)
                out["after_1_mib"] = rss.main_mb - rss.start_mb
    time.sleep(0.05)
    out[f"after_{images}_mib"] = rss.main_mb - rss.start_mb
    return out


def train_case(preset: str, size: int, batch: int, steps: int, device: str) -> dict:
    cfg = load_config(preset, ["model.backbone.pretrained=false"])
    net = create_method(cfg, 21).to(device).train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    masks = torch.randint(0, 3, (batch, size, size), generator=g)
    masks[:, : size // 4] = 255  # some ignored pixels, as confident labels have
    masks = masks.to(device)

    def step():
        loss = net.forward_losses(x, masks, epoch=0)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    step()  # warm-up
    times = timings(device, step, steps)
    ms = statistics.median(times) * 1000
    return {"preset": preset, "size": size, "batch": batch, "ms_step": ms, "img_s": batch / ms * 1000,
            "backbone": cfg.model.backbone.name, "stride": cfg.model.backbone.output_stride}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stride", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--classes", type=int, default=2, help="foreground classes in the image")
    ap.add_argument("--dim", type=int, default=448, help="affinity feature channels (PSA: 448)")
    ap.add_argument("--radius", type=int, default=5)
    ap.add_argument("--logt", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--images", type=int, default=20, help="images walked in a row for the memory-flatness row")
    ap.add_argument("--steps", type=int, default=5, help="timed AffinityNet training steps")
    ap.add_argument("--psa", action="store_true", help="also time voc/psa_resnet38 training")
    ap.add_argument("--psa-batch", type=int, default=8)
    ap.add_argument("--psa-size", type=int, default=448)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="update the bench:affinity block of benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with CPUShare() as share:
        walks = [walk_case(s, args.classes, args.dim, args.device, args.repeat, args.logt, args.radius) for s in args.stride]
        stream = stream_case(args.images, 8, args.dim, args.classes, args.device)
        trains = [train_case("demo/affinity", 224, 8, args.steps, args.device)]
        if args.psa:
            trains.append(train_case("voc/psa_resnet38", args.psa_size, args.psa_batch, max(2, args.steps // 2), args.device))
    t1 = table(["stride", "grid", "nodes N", "neighbours M", "ms / image", "sparse T (MiB)", "dense N x N (MiB)",
                "peak growth (MiB)"],
               [[w["stride"], w["grid"], w["nodes"], w["neighbours"], f"{w['ms']:.1f}", f"{w['sparse_mib']:.2f}",
                 f"{w['dense_mib']:.0f}", f"{w['peak_mib']:.1f}"] for w in walks])
    k = args.images
    t2 = table(["images walked in a row (stride 8)", "peak RSS growth (MiB)"],
               [["1", f"{stream['after_1_mib']:.1f}"], [str(k), f"{stream[f'after_{k}_mib']:.1f}"]])
    t3 = table(["preset", "backbone (stride)", "input", "batch", "ms / step", "img/s"],
               [[t["preset"], f"{t['backbone']} ({t['stride']})", f"{t['size']} px", t["batch"], f"{t['ms_step']:.0f}",
                 f"{t['img_s']:.2f}"] for t in trains])
    other = share.other_cores
    head = (f"Command: `python benchmarks/bench_affinity.py{' --psa --psa-batch ' + str(args.psa_batch) if args.psa else ''}"
            f"{' --device ' + args.device if args.device != 'cpu' else ''}`  \nMachine: {machine(args.device)}"
            + (f"; other processes kept {other:.1f} cores busy meanwhile" if other is not None else "") + ".\n\n"
            f"Random walk of one {W} x {H} image, {args.classes} classes + background, D = {args.dim}, radius "
            f"{args.radius}, 2^{args.logt} steps (median of {args.repeat}):\n\n")
    body = head + t1 + "\n\nMemory while walking image after image (as `wsss refine` does):\n\n" + t2 + \
        "\n\nAffinityNet training step (forward_losses + backward + SGD; random inputs and labels):\n\n" + t3
    print(body)
    if args.write:
        write_section("affinity", "Affinity refinement", body)


if __name__ == "__main__":
    main()
