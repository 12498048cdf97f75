"""Issue 15: two settings of the sparse-slice benchmark compared run by run.

    python benchmarks/paired_runs.py --a bench/old_*/results.csv --b bench/new_*/results.csv \
        [--method tskd_nosyn+post] [--regions within other]

Each ``results.csv`` is what ``tskd benchmark --protocol sparse-slices --out DIR`` writes (one row
per method, training scans, seed, scored scan, region and class). Runs are paired by their
training scans and seed; a run present on one side only is listed but left out of the paired
figures. Per run and region: the mean Dice over the scored scans' classes (the benchmark's
"mean Dice") and the lowest organ; then, per region, the mean over the paired runs on each side,
the mean difference B - A with its standard error, and how many runs have no organ below 0.70
(the "other scans" target of issue 15). Results: benchmarks/RESULTS.md, section 6, ninth pass.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

#: issue 15's floor for every organ on new scans
ORGAN_FLOOR = 0.70


def load_runs(paths: list[Path], method: str) -> dict[tuple[str, str], dict[str, list[tuple[str, str, float]]]]:
    """``{(train, seed): {region: [(scan, class, Dice), ...]}}`` from ``results.csv`` files, rows of
    ``method`` only; NaN Dice (a class absent from reference and prediction) is left out."""
    runs: dict = defaultdict(lambda: defaultdict(list))
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                dice = float(row["dice"])
                if row["method"] == method and not math.isnan(dice):
                    runs[(row["train"], row["seed"])][row["region"]].append((row["case"], row["class"], dice))
    return runs


def summarise(scores: list[tuple[str, str, float]]) -> tuple[float, tuple[str, str, float]]:
    """Mean Dice and the lowest (scan, class, Dice) of one run's region."""
    return statistics.mean(d for _, _, d in scores), min(scores, key=lambda s: s[2])


def compare(a: dict, b: dict, regions: list[str]) -> list[str]:
    """The report's lines: each run side by side, then the paired figures per region."""
    lines = []
    for key in sorted(set(a) | set(b)):
        cells = [f"{key[0]} seed {key[1]}"]
        for name, runs in (("A", a), ("B", b)):
            if key not in runs:
                cells.append(f"{name}: -")
                continue
            parts = []
            for region in regions:
                if runs[key].get(region):
                    mean, low = summarise(runs[key][region])
                    parts.append(f"{region} {mean:.3f} (lowest {low[0]} {low[1]} {low[2]:.2f})")
            cells.append(f"{name}: " + ", ".join(parts))
        lines.append(" | ".join(cells))
    paired = sorted(set(a) & set(b))
    for region in regions:
        keys = [k for k in paired if a[k].get(region) and b[k].get(region)]
        if not keys:
            continue
        ma = [summarise(a[k][region])[0] for k in keys]
        mb = [summarise(b[k][region])[0] for k in keys]
        diff = [y - x for x, y in zip(ma, mb)]
        se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        floor_a = sum(summarise(a[k][region])[1][2] >= ORGAN_FLOOR for k in keys)
        floor_b = sum(summarise(b[k][region])[1][2] >= ORGAN_FLOOR for k in keys)
        lines.append(f"{region}: {len(keys)} paired runs, A {statistics.mean(ma):.3f}, B {statistics.mean(mb):.3f}, "
                     f"B - A {statistics.mean(diff):+.3f} +- {se:.3f} (SE); no organ < {ORGAN_FLOOR:.2f}: "
                     f"A {floor_a}, B {floor_b} of {len(keys)}")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", nargs="+", type=Path, required=True, help="results.csv files of setting A")
    ap.add_argument("--b", nargs="+", type=Path, required=True, help="results.csv files of setting B")
    ap.add_argument("--method", default="tskd_nosyn+post", help="the method's rows (default: after the clean-up)")
    ap.add_argument("--regions", nargs="+", default=["within", "other"])
    args = ap.parse_args(argv)
    print("\n".join(compare(load_runs(args.a, args.method), load_runs(args.b, args.method), args.regions)))


if __name__ == "__main__":
    main()
