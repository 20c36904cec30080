#!/usr/bin/env python3
"""The share of a training step during which the GPU runs no kernel: 1 - (kernel time of
one step, from bench/gpu_profile.sh's profile.json) / (the step's wall time, from a
`mmrec-train bench` benchmark_results.json, a `mmrec-bench model` JSON, or the
`metrics.jsonl` of a plain `mmrec-train pretrain` of the same preset, batch and length,
measured on the same GPU; from a metrics file, the median of its logged tokens/s after the
first two records, which hold the start-up).

    python3 bench/launch_overhead.py PROFILE.json BENCH.json|metrics.jsonl PRESET [SEQ_LEN [BATCH]]
"""
import json
import sys


def step_ms(bench, preset, seq_len):
    if "runs" in bench:  # mmrec-train bench
        runs = [r for r in bench["runs"] if r["preset"] == preset and (seq_len is None or r["seq_len"] == seq_len)]
        return runs[0]["train_step"]["median_ms"], runs[0]["batch"], runs[0]["seq_len"]
    runs = [r for r in bench["model"] if r["preset"] == preset]  # mmrec-bench model
    return runs[0]["train_step_ms"], runs[0]["batch"], runs[0]["seq_len"]


def metrics_step_ms(path, seq_len, batch):
    rates = sorted([r["tokens_per_s"] for r in map(json.loads, open(path)) if "tokens_per_s" in r][2:])
    if not rates or seq_len is None or batch is None:
        sys.exit(f"{path}: needs logged training records (3 or more) and SEQ_LEN and BATCH")
    return 1e3 * seq_len * batch / rates[len(rates) // 2], batch, seq_len


def main(profile, bench, preset, seq_len=None, batch=None):
    kernels = json.load(open(profile))
    seq_len, batch = (int(seq_len) if seq_len else None), (int(batch) if batch else None)
    if bench.endswith(".jsonl"):
        wall, batch, seq = metrics_step_ms(bench, seq_len, batch)
    else:
        wall, batch, seq = step_ms(json.load(open(bench)), preset, seq_len)
    busy = kernels["step_kernel_ms"]
    print(json.dumps({
        "preset": preset, "batch": batch, "seq_len": seq,
        "step_ms": wall, "kernel_ms": busy, "launches": kernels["launches"],
        "idle_share": max(0.0, 1 - busy / wall),
    }, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
