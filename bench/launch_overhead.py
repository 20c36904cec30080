#!/usr/bin/env python3
"""The share of a training step during which the GPU runs no kernel: 1 - (kernel time of
one step, from bench/gpu_profile.sh's profile.json) / (the step's wall time, from a
`mmrec-train bench` benchmark_results.json or a `mmrec-bench model` JSON of the same preset,
batch and length, measured on the same GPU).

    python3 bench/launch_overhead.py PROFILE.json BENCH.json PRESET [SEQ_LEN]
"""
import json
import sys


def step_ms(bench, preset, seq_len):
    if "runs" in bench:  # mmrec-train bench
        runs = [r for r in bench["runs"] if r["preset"] == preset and (seq_len is None or r["seq_len"] == seq_len)]
        return runs[0]["train_step"]["median_ms"], runs[0]["batch"], runs[0]["seq_len"]
    runs = [r for r in bench["model"] if r["preset"] == preset]  # mmrec-bench model
    return runs[0]["train_step_ms"], runs[0]["batch"], runs[0]["seq_len"]


def main(profile, bench, preset, seq_len=None):
    kernels = json.load(open(profile))
    wall, batch, seq = step_ms(json.load(open(bench)), preset, int(seq_len) if seq_len else None)
    busy = kernels["step_kernel_ms"]
    print(json.dumps({
        "preset": preset, "batch": batch, "seq_len": seq,
        "step_ms": wall, "kernel_ms": busy, "launches": kernels["launches"],
        "idle_share": max(0.0, 1 - busy / wall),
    }, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
