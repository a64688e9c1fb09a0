"""Speed and memory of the sparse random walk (`wsss.postprocess.affinity.walk_mask`) for one 500x375
image (VOC's typical size): the transition matrix, 2^logt steps, upsampling and argmax.

    python benchmarks/bench_affinity.py                       # stride 8 and 16, 2 classes + background, CPU
    python benchmarks/bench_affinity.py --device cuda --stride 4 8 --classes 3 --repeat 20

Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the growth of the process's peak RSS
(ru_maxrss) over the run, which a first call dominates.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from wsss.methods.affinity import AffinityConfig
from wsss.postprocess.affinity import walk_mask


def bench(stride: int, classes: int, dim: int, device: str, repeat: int, logt: int, radius: int) -> dict:
    h, w = 375, 500
    gh, gw = -(-h // stride), -(-w // stride)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(dim, gh, gw, generator=g).to(device)
    probs = torch.rand(classes + 1, h, w, generator=g)
    cfg = AffinityConfig(radius=radius, logt=logt)
    keep = list(range(classes + 1))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    walk_mask(feats, keep, probs, cfg, (h, w))  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        walk_mask(feats, keep, probs, cfg, (h, w))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / repeat * 1000
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
    return {"stride": stride, "grid": [gh, gw], "nodes": gh * gw, "classes": classes, "dim": dim, "radius": radius,
            "steps": 2**logt, "device": device, "ms": round(ms, 2), "peak_mib": round(peak, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stride", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--classes", type=int, default=2, help="foreground classes in the image")
    ap.add_argument("--dim", type=int, default=448)
    ap.add_argument("--radius", type=int, default=5)
    ap.add_argument("--logt", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for s in args.stride:
        print(json.dumps(bench(s, args.classes, args.dim, args.device, args.repeat, args.logt, args.radius)))


if __name__ == "__main__":
    main()
