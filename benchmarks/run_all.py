"""Run every speed benchmark at its default settings and update benchmarks/RESULTS.md (`make bench`).

Sections written: "Training step" (bench_train, CPU suite), "Pseudo-label throughput" (bench_infer),
"Evaluator" (bench_eval) and "GPU" (bench_train --suite gpu when CUDA is available; otherwise a note that
no GPU was used, written only when the section is missing, so figures measured on a GPU are kept). The quality
ablations (benchmarks/ablation.py) are separate: they train for minutes per row.

    python benchmarks/run_all.py                 # everything, writes RESULTS.md
    python benchmarks/run_all.py --threads 1     # the same, one torch thread (steadier on a shared machine)
    python benchmarks/run_all.py --only eval,infer --no-write
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_eval  # noqa: E402
import bench_infer  # noqa: E402
import bench_train  # noqa: E402
from common import RESULTS, write_section  # noqa: E402

GPU_COMMAND = "python benchmarks/bench_train.py --device cuda --amp bf16 --suite gpu"
NO_GPU = (
    "No GPU was lent to the session that wrote this section: the GPU figures (ViT-B/16 at 384 px with the "
    "TKP-PCL recipe, DeiT-S and ResNet-50 with the USAGE recipes, bf16, batch as in each recipe, with MFU "
    f"against the measured bf16 matmul peak) are not measured yet. On a GPU machine run\n\n"
    f"    {GPU_COMMAND} --write\n\n(or `make bench`, which runs it when CUDA is available).\n"
)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="train,infer,eval,gpu", help="comma-separated subset")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    ap.add_argument("--json", type=Path, help="all results in one JSON file")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for the training and pseudo-label benchmarks (0: torch's default; 1 is "
                         "steadier on a machine shared with another job). The evaluator runs both 1 and the default")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    write = [] if args.no_write else ["--write"]
    threads = ["--threads", str(args.threads)] if args.threads else []
    results = {}
    if "train" in only:
        results["train"] = bench_train.main([*threads, *write])
    if "infer" in only:
        results["infer"] = bench_infer.main([*threads, *write])
    if "eval" in only:
        results["eval"] = bench_eval.main(write)
    if "gpu" in only:
        if torch.cuda.is_available():
            results["gpu"] = bench_train.main(["--device", "cuda", "--amp", "bf16", "--suite", "gpu", *write])
        elif write:
            doc = RESULTS.read_text() if RESULTS.exists() else ""
            if "<!-- bench:gpu -->" not in doc:  # never replace GPU figures measured elsewhere
                write_section("gpu", "GPU", NO_GPU)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
