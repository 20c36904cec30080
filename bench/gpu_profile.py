"""Per-kernel time of one training step from two Nsight Compute tables (bench/gpu_profile.sh).

usage: gpu_profile.py NCU_ONE_STEP.csv NCU_TWO_STEPS.csv > profile.json

Each table has one row per kernel launch (metric gpu__time_duration.sum, in ns). The run
of two steps minus the run of one is the second step alone: start-up and the final
checkpoint appear in both and cancel.
"""
import collections
import csv
import json
import sys


def per_kernel(path):
    totals = collections.defaultdict(lambda: [0.0, 0])
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"]
        totals[name][0] += float(row["Metric Value"].replace(",", ""))
        totals[name][1] += 1
    return totals


def main():
    one, two = per_kernel(sys.argv[1]), per_kernel(sys.argv[2])
    rows = []
    for name in set(one) | set(two):
        ns = two[name][0] - one[name][0]
        launches = two[name][1] - one[name][1]
        if launches > 0:
            rows.append({"kernel": name, "ms": ns / 1e6, "launches": launches})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    for r in rows:
        r["share"] = r["ms"] / total if total else 0.0
    json.dump(
        {"step_kernel_ms": total, "launches": sum(r["launches"] for r in rows), "kernels": rows},
        sys.stdout,
        indent=1,
    )
    print()


if __name__ == "__main__":
    main()
