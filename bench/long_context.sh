#!/usr/bin/env bash
# Issue 17: does training in segments with the state carried help on long documents, and
# does memory stay flat in the context length? Two models of one preset on the same data,
# seeds and token budget: one trained on independent windows (context_len = seq_len) and
# one in segments with the state carried for CONTEXT tokens; both evaluated with the state
# carried over held-out documents of at least 8 192 tokens (up to 16 384 tokens read),
# loss per position bucket. A third short run at context 16 384 gives the memory figure.
#
# Usage: bench/long_context.sh CORPUS.jsonl OUT BIN_DIR
#   CORPUS.jsonl  prose with long documents (bench/corpus/build.sh's work/prose.jsonl)
# Env: PRESET (tiny), SEQ (256), CONTEXT (4096), ROWS (8), STEPS (400), DEVICE (cpu),
# PRECISION (f32). Memory: the process's peak RSS, and on a GPU the allocator's peak.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/nccl-path.sh   # a CUDA mmrec-train links libnccl.so.2
corpus=$1 out=$2 bin=$3
PRESET=${PRESET:-tiny} SEQ=${SEQ:-256} CONTEXT=${CONTEXT:-4096} ROWS=${ROWS:-8} STEPS=${STEPS:-400}
DEVICE=${DEVICE:-cpu} PRECISION=${PRECISION:-f32}
mkdir -p "$out"
[[ -f $out/shards/manifest.json ]] || "$bin/mmrec-data" split --text "$corpus" \
  --tokenizer bench/results/scale/tokenizer.json --out "$out/shards" >"$out/split.log" 2>&1
train() { # NAME CONTEXT STEPS
  rm -rf "$out/$1"
  "$bin/mmrec-train" pretrain --device "$DEVICE" --precision "$PRECISION" --data "$out/shards" --out "$out/$1" --json \
    --set "model.preset=\"$PRESET\"" --set 'data.weights="text=1"' --set "data.seq_len=$SEQ" \
    --set "data.batch_size=$ROWS" --set "data.context_len=$2" --set "run.steps=$3" \
    --set optim.lr=3e-3 --set optim.min_lr=3e-4 --set optim.warmup_steps=30 \
    --set run.eval_every=0 --set run.log_every=10 >"$out/$1.log" 2>&1
}
train windows "$SEQ" "$STEPS"
train segments "$CONTEXT" "$STEPS"
train memory-16k 16384 40
for m in windows segments; do
  "$bin/mmrec-train" eval --device "$DEVICE" --model "$out/$m/final.safetensors" --data "$out/shards" \
    --domains text=1 --seq-len "$SEQ" --context-len 16384 --min-doc-tokens 8192 \
    --plot "$out/$m-by-position.png" --json >"$out/$m-by-position.json"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def peak(run, field):
    return max(r.get(field, 0) for r in map(json.loads, open(f"{out}/{run}/metrics.jsonl")))
runs = ("windows", "segments", "memory-16k")
summary = {"by_position": {}, "peak_rss_mb": {r: peak(r, "rss_mb") for r in runs},
           "gpu_peak_mb": {r: peak(r, "gpu_peak_mb") for r in runs}}
for m in ("windows", "segments"):
    e = json.load(open(f"{out}/{m}-by-position.json"))
    summary["documents"] = e["documents"]
    summary["by_position"][m] = {f'{b["from"]}-{b["to"]}': b["loss"] for b in e["by_position"]["all"] if b["tokens"]}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
