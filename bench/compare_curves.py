"""How closely two training runs' loss curves agree (f32 against bf16 mixed precision).

usage: compare_curves.py RUN_A.jsonl RUN_B.jsonl > curves.json

Reads `mmrec-train --json` output: per-step training loss and per-evaluation validation
losses. Reports, per window of 50 steps, the mean training loss of each run and the
difference, and each evaluation's validation loss side by side.
"""
import json
import sys


def read(path):
    steps, vals = {}, {}
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if "val" in r:
            vals[r["step"]] = r["val"]["all"]
        elif "loss" in r:
            steps[r["step"]] = r["loss"]
    return steps, vals


def main():
    (sa, va), (sb, vb) = read(sys.argv[1]), read(sys.argv[2])
    common = sorted(set(sa) & set(sb))
    windows = []
    for start in range(0, len(common), 50):
        ks = common[start:start + 50]
        ma = sum(sa[k] for k in ks) / len(ks)
        mb = sum(sb[k] for k in ks) / len(ks)
        windows.append({"steps": [ks[0], ks[-1]], "a": ma, "b": mb, "diff": mb - ma, "rel": (mb - ma) / ma})
    evals = [{"step": k, "a": va[k], "b": vb[k], "diff": vb[k] - va[k]} for k in sorted(set(va) & set(vb))]
    out = {
        "a": sys.argv[1],
        "b": sys.argv[2],
        "windows_of_50_steps": windows,
        "validation": evals,
        "max_abs_window_rel_diff": max((abs(w["rel"]) for w in windows), default=None),
        "final_validation_diff": evals[-1]["diff"] if evals else None,
    }
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
