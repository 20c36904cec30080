"""Summarise a GPU benchmark run (scripts/gpu-check.sh): ours against PyTorch, as ratios.

    python3 bench/gpu_report.py bench/results/gpu      # prints a table, writes summary.json
"""

import json
import sys
from pathlib import Path

PEAK_BF16 = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (the MFU convention)


def main(results):
    results = Path(results)
    ours = {p: json.loads((results / f"bench-{p}.json").read_text()) for p in ("f32", "bf16") if (results / f"bench-{p}.json").exists()}
    torch = {}  # preset -> the PyTorch report, its modes merged from one file per mode
    for f in sorted(results.glob("torch-*.json")):
        r = json.loads(f.read_text())
        torch.setdefault(r["preset"], {**r, "modes": {}})["modes"].update(r["modes"])
    any_run = next(iter(ours.values()))
    print(f"GPU: {any_run['gpu']}; device copy {any_run['copy_gb_per_s']:.0f} GB/s (read + write)")
    print("\nscan (f32)                   ms     GB/s   of 1 GiB copy   of same-size copy")
    for s in any_run["scan"]:
        print(f"  {str(s['shape']):<16} {s['direction']:<17} {s['ms']:7.3f} {s['gb_per_s']:8.0f} {s['of_memcpy']:8.1%}   {s.get('of_copy_same_size') or 0:8.1%}")
    rows = []
    print("\ntraining step (fwd + bwd + AdamW), tokens/s      ms    peak GiB   MFU   vs eager  vs compile")
    for preset, ref in torch.items():
        eager = ref["modes"].get("eager", {}).get("train_step", {})
        comp = ref["modes"].get("compile", {}).get("train_step", {})
        for name, mode in (("pytorch eager", eager), ("pytorch compile", comp)):
            if mode:
                mfu = ref["flops_per_token"] * mode["tokens_per_s"] / PEAK_BF16
                print(f"  {preset:<7} {name:<22} {mode['tokens_per_s']:>11,.0f} {mode['median_ms']:7.1f} {mode['peak_gib']:8.2f} {mfu:6.1%}")
        for precision, run in ours.items():
            fig = next((m for m in run["model"] if m["preset"] == preset), None)
            if not fig:
                continue
            r_eager = fig["train_step_tokens_per_s"] / eager["tokens_per_s"] if eager else None
            r_comp = fig["train_step_tokens_per_s"] / comp["tokens_per_s"] if comp else None
            fmt = lambda r: f"{r:8.2f}x" if r else "       -"
            print(f"  {preset:<7} {'mmrec ' + precision:<22} {fig['train_step_tokens_per_s']:>11,.0f} {fig['train_step_ms']:7.1f} "
                  f"{fig['peak_memory_gib']:8.2f} {fig['mfu']:6.1%} {fmt(r_eager)} {fmt(r_comp)}")
            rows.append({"preset": preset, "precision": precision, "tokens_per_s": fig["train_step_tokens_per_s"],
                         "vs_pytorch_eager": r_eager, "vs_pytorch_compile": r_comp, "mfu": fig["mfu"],
                         "peak_memory_gib": fig["peak_memory_gib"]})
    (results / "summary.json").write_text(json.dumps({"gpu": any_run["gpu"], "train_step": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu")
