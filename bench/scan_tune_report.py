#!/usr/bin/env python3
"""Summarise a scan tuning sweep (bench/scan_tune.cu's JSON lines, one file per tile shape):
per dtype, pass and shape the fastest (warps, steps, width) with its share of the 1 GiB
copy and of a copy of the same bytes, and per regime the shape closest to the best on
every shape of the regime (what kernels/src/cuda.rs picks from).

    python3 bench/scan_tune_report.py bench/results/gpu/scan-tune/2-packed-words
"""
import glob
import json
import sys
from collections import defaultdict

REGIMES = {"many channels": [(32, 1024, 512), (16, 4096, 1024)], "few channels, long T": [(1, 65536, 256), (2, 65536, 512)]}


def main(folder):
    rows = []
    for path in sorted(glob.glob(f"{folder}/scan_tune_*.jsonl")):
        for line in open(path):
            r = json.loads(line)
            if "dtype" in r and not r["memset"]:
                rows.append(r)
    by = defaultdict(list)
    for r in rows:
        by[(r["dtype"], r["pass"], tuple(r["shape"]))].append(r)
    print("fastest tile shapes (warps W, steps S, channels per lane v): ms (of 1 GiB copy / of same-bytes copy)")
    for key in sorted(by):
        best = sorted(by[key], key=lambda r: r["ms"])[:3]
        cells = " ".join(
            f"W{r['warps']}S{r['steps']}v{r['vec']} {r['ms']:.3f} ({r['of_copy_1gib']:.0%}/{r['of_copy_same_bytes']:.0%})"
            for r in best
        )
        print(f"  {key[0]:5} {key[1]:8} {str(list(key[2])):18} {cells}")
    ms = {(r["dtype"], r["pass"], tuple(r["shape"]), r["warps"], r["steps"], r["vec"]): r["ms"] for r in rows}
    print("per regime, worst ratio to the best over its shapes (1.00 = fastest on every shape)")
    for dtype in ("f32", "bf16"):
        for pas in ("forward", "backward"):
            for name, shapes in REGIMES.items():
                fastest = {s: min(v for k, v in ms.items() if k[:3] == (dtype, pas, s)) for s in shapes}
                shapes_of = {k[3:] for k in ms if k[0] == dtype}
                scored = sorted(
                    (max(ms[(dtype, pas, s) + c] / fastest[s] for s in shapes), c)
                    for c in shapes_of
                    if all((dtype, pas, s) + c in ms for s in shapes)
                )
                top = " ".join(f"W{c[0]}S{c[1]}v{c[2]} {x:.2f}" for x, c in scored[:3])
                print(f"  {dtype:5} {pas:8} {name:22} {top}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu/scan-tune/2-packed-words")
