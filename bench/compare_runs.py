#!/usr/bin/env python3
"""Summarise scripts/gpu-experiment.sh: per run the final validation loss, the loss at a
common token count, and the training time to first reach a target loss (the worst of the
runs' best validation losses, so every run reaches it); the seed-to-seed spread of each
setting, which a difference between settings must exceed to count. Runs are
RESULTS/<setting>-seed<n>.metrics.jsonl.

    python3 bench/compare_runs.py RESULTS
"""
import json
import sys
from pathlib import Path


def curve(path):
    val, accum = [], []
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if "val" in r and "tokens_seen" in r:
            val.append((r["tokens_seen"], r["elapsed_s"], r["val"]["all"]))
        if "grad_accum" in r:
            accum.append(r["grad_accum"])
    return val, accum


def at_tokens(val, tokens):
    """Validation loss interpolated linearly at `tokens`."""
    for (t0, _, l0), (t1, _, l1) in zip(val, val[1:]):
        if t0 <= tokens <= t1:
            return l0 + (l1 - l0) * (tokens - t0) / max(t1 - t0, 1)
    return None


def main(folder):
    runs = {p.name.removesuffix(".metrics.jsonl"): curve(p) for p in sorted(Path(folder).glob("*.metrics.jsonl"))}
    common = min(v[-1][0] for v, _ in runs.values())
    target = max(min(l for _, _, l in v) for v, _ in runs.values())
    print(f"common token count {common:,}; target loss {target:.4f} (the worst run's best)")
    print(f"{'run':22} {'final val':>9} {'val @ common':>12} {'s to target':>11} {'tokens to target':>16} {'accum first→last':>17}")
    by_schedule = {}
    for name, (val, accum) in runs.items():
        reach = next(((t, s) for t, s, l in val if l <= target), (None, None))
        loss_at = at_tokens(val, common)
        by_schedule.setdefault(name.rsplit("-seed", 1)[0], []).append((loss_at, reach[1]))
        acc = f"{accum[0]}→{accum[-1]}" if accum else "-"
        print(f"{name:22} {val[-1][2]:9.4f} {loss_at:12.4f} {reach[1]:11.1f} {reach[0]:16,} {acc:>17}")
    print("per setting: mean val @ common (seed spread), mean seconds to target (spread)")
    for sched, xs in by_schedule.items():
        losses = [x[0] for x in xs]
        secs = [x[1] for x in xs]
        print(f"  {sched:12} {sum(losses)/len(losses):.4f} ({max(losses)-min(losses):.4f})   "
              f"{sum(secs)/len(secs):.1f} s ({max(secs)-min(secs):.1f})")


if __name__ == "__main__":
    main(sys.argv[1])
