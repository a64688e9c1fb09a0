"""What the extra schedule (`train.extend_unrecognised`) did, run by run (issue 21).

A run that extends writes RUN/first_schedule.pt, the weights at the end of its first schedule. For every
such run under WORK (family_table.py's layout, WORK/<family>/<preset>_s<seed>) this scores the val pseudo
masks of those weights (GT tags, no CRF, into RUN/pseudo_first) beside the run's own (RUN/pseudo, the
weights after the extension) and prints one row a run with the check that decided: how often the top
class was a tag on the trainer's fixed train images, chance, and the gain (hit - chance) / (1 - chance)
that `diagnostics.EXTEND_GAIN` is compared with.

    python benchmarks/extension_pairs.py --work /work/runs/fam --data /work/fam
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from family_table import _wsss  # `python -m wsss ...`, one thread, output to the cell's log


def check_at_extension(run: Path) -> dict | None:
    """The check's figures on the epoch that decided to extend, from log.jsonl (None: never extended)."""
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("extended"):
            return record["masks"]
    return None


def score_first_schedule(run: Path, data: Path) -> Path:
    out = run / "pseudo_first"
    if not (out / "summary.json").exists():
        _wsss("pseudo-label", str(run), "--data", str(data), "--split", "val", "--out", str(out),
              "--checkpoint", str(run / "first_schedule.pt"), log=run / "cell.log")
    return out / "summary.json"


def figures(summary: Path) -> tuple[float, float | None]:
    s = json.loads(summary.read_text())
    return s["miou"], (s.get("diagnostics") or {}).get("foreground_fraction")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="family_table.py's --work")
    ap.add_argument("--data", type=Path, required=True, help="family_table.py's --data")
    args = ap.parse_args()
    print("| run | check: top class a tag (chance) | gain | first schedule mIoU (fg) | after extension mIoU (fg) | change |")
    print("|---|---|---:|---|---|---:|")
    for first in sorted(args.work.glob("*/*/first_schedule.pt")):
        run = first.parent
        family = run.parent.name
        check = check_at_extension(run)
        if check is None or not (run / "pseudo" / "summary.json").exists():
            continue
        hit, chance = check["top_hit_rate"], check["top_hit_chance"]
        gain = (hit - chance) / (1 - chance)
        m0, fg0 = figures(score_first_schedule(run, args.data / family))
        m1, fg1 = figures(run / "pseudo" / "summary.json")
        print(f"| {family}/{run.name} | {hit:.0%} ({chance:.0%}) | {gain:.2f} | {m0:.3f} ({fg0:.0%}) | "
              f"{m1:.3f} ({fg1:.0%}) | {100 * (m1 - m0):+.1f} |")


if __name__ == "__main__":
    main()
