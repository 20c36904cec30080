#!/usr/bin/env bash
# Data parallelism on a GPU machine (issues 20 and 21), on the carried prose:
#   one     1 GPU, ROWS rows a step
#   many    every GPU (`mmrec-train launch --gpus N`, NCCL), ROWS rows a GPU
#   accum   1 GPU, ROWS rows, N micro-batches a step: the global batch of `many`
# and a summary: tokens/s of `many` over `one` (the scaling), the reduction's time a step
# (`comm_ms`), and how far the loss curves of `many` and `accum` lie apart. On a machine
# with one GPU, `many` is the NCCL path with one rank (MMREC_DIST_BACKEND=nccl) and is
# compared with `one`: the same losses, and what the path costs.
#
# Usage: scripts/gpu-data-parallel.sh CARRY RESULTS
#   CARRY    bin/mmrec-{train,data}.xz (scripts/build-cuda.sh), prose.jsonl.zst
# Env: PRESET (small), PRECISION (bf16), ROWS (32), SEQ (1024), STEPS (200), GPUS (all).
# Writes RESULTS/{one,many,accum}.metrics.jsonl, their logs, gpus.txt and summary.json.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/nccl-path.sh   # mmrec-train links libnccl.so.2
carry=$1 results=$2
PRESET=${PRESET:-small} PRECISION=${PRECISION:-bf16} ROWS=${ROWS:-32} SEQ=${SEQ:-1024} STEPS=${STEPS:-200}
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
work=/tmp/mmrec-dp bin=/tmp/mmrec-dp/bin
mkdir -p "$bin" "$results"
for tool in mmrec-train mmrec-data; do
  python3 -c 'import lzma,sys; open(sys.argv[2],"wb").write(lzma.open(sys.argv[1]).read())' \
    "$carry/bin/$tool.xz" "$bin/$tool" && chmod +x "$bin/$tool" || exit 1
done
{ nvidia-smi -L; nvidia-smi topo -m; } >"$results/gpus.txt" 2>&1
[[ -f $work/shards/manifest.json ]] || "$bin/mmrec-data" split --text "$carry/prose.jsonl.zst" \
  --tokenizer bench/results/scale/tokenizer.json --out "$work/shards" >"$results/split.log" 2>&1 || exit 1
train=(pretrain --device cuda --precision "$PRECISION" --data "$work/shards" --json
  --set "model.preset=\"$PRESET\"" --set 'data.weights="text=1"' --set "data.seq_len=$SEQ"
  --set "data.batch_size=$ROWS" --set "run.steps=$STEPS" --set run.eval_every=0 --set run.log_every=1
  --set run.ckpt_every=100000 --set optim.warmup_steps=20)
status=0
run() { # NAME ARGS...: one run, its metrics and log into RESULTS
  local name=$1
  shift
  rm -rf "$work/$name"
  echo "== $name: $*"
  "$@" --out "$work/$name" >"$results/$name.log" 2>&1 || { echo "$name failed" >&2; status=1; }
  cp "$work/$name/metrics.jsonl" "$results/$name.metrics.jsonl" 2>/dev/null
}
run one "$bin/mmrec-train" "${train[@]}"
if ((gpus > 1)); then
  run many "$bin/mmrec-train" launch --gpus "$gpus" -- "${train[@]}" --set run.check_sync_every=50
  run accum "$bin/mmrec-train" "${train[@]}" --set "optim.grad_accum=$gpus"
else
  MMREC_DIST_BACKEND=nccl run many "$bin/mmrec-train" launch --gpus 1 -- "${train[@]}"
fi
python3 - "$results" "$gpus" <<'PY' || status=1
import json, statistics, sys
out, gpus = sys.argv[1], int(sys.argv[2])
def load(name):
    try:
        rows = [json.loads(l) for l in open(f"{out}/{name}.metrics.jsonl")]
    except FileNotFoundError:
        return None
    return [r for r in rows if r.get("loss") is not None and "step" in r]
def steady(rows, key):  # the second half of the run: warm-up and JIT behind it
    vals = [r[key] for r in rows[len(rows) // 2:] if r.get(key) is not None]
    return statistics.median(vals) if vals else None
runs = {n: load(n) for n in ["one", "many", "accum"]}
summary = {"gpus": gpus, "runs": {}}
for name, rows in runs.items():
    if rows:
        summary["runs"][name] = {"steps": len(rows), "tokens_per_s": steady(rows, "tokens_per_s"),
                                 "comm_ms": steady(rows, "comm_ms"), "final_loss": rows[-1]["loss"]}
one, many = summary["runs"].get("one"), summary["runs"].get("many")
if one and many and one["tokens_per_s"] and many["tokens_per_s"]:
    summary["speedup"] = many["tokens_per_s"] / one["tokens_per_s"]
ref = runs["accum"] if gpus > 1 else runs["one"]
if runs["many"] and ref:
    a = {r["step"]: r["loss"] for r in runs["many"]}
    b = {r["step"]: r["loss"] for r in ref}
    common = sorted(set(a) & set(b))
    diffs = [abs(a[s] - b[s]) for s in common]
    # Means over windows of 10 steps: bf16 noise per step is larger than any drift.
    win = [abs(statistics.mean(a[s] for s in common[i:i + 10]) - statistics.mean(b[s] for s in common[i:i + 10]))
           for i in range(0, len(common), 10)]
    summary["loss_match"] = {"against": "accum" if gpus > 1 else "one", "steps": len(common),
                             "max_abs_diff": max(diffs), "mean_abs_diff": statistics.mean(diffs),
                             "max_abs_diff_of_10_step_means": max(win)}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
exit $status
