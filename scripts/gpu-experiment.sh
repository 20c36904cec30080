#!/usr/bin/env bash
# Training experiments on a GPU machine, two seeds of two settings on the same data and
# token budget, with validation curves against tokens and time and a summary
# (bench/compare_runs.py: loss at a common token count, time to a target loss, the
# seed-to-seed spread a difference must exceed).
#   batch  issue 18: the micro-batch search, then fixed against noise-scale global batches
#          (micro-batch 32 × 512, base accumulation 2, up to 16 batches; 10 M tokens).
#   uboo   issue 14: the auxiliary next-state loss off and at 0.1 (model.uboo_weight),
#          256 × 512 tokens a step (the throughput the micro-batch search found), 50 M tokens.
# Both: `small` (PRESET), bf16, the code domain of SHARDS, a constant rate after warm-up.
#
# Usage: scripts/gpu-experiment.sh batch|uboo MMREC_TRAIN_XZ SHARDS RESULTS
#   MMREC_TRAIN_XZ  mmrec-train built by scripts/build-cuda.sh (xz-compressed)
# Settings (environment): BUDGET tokens per run, PRESET.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/nccl-path.sh   # mmrec-train links libnccl.so.2
experiment=$1 shards=$3 results=$4
bin=/tmp/mmrec-bin
mkdir -p "$bin" "$results"
python3 -c 'import lzma,sys; open(sys.argv[2],"wb").write(lzma.open(sys.argv[1]).read())' "$2" "$bin/mmrec-train"
chmod +x "$bin/mmrec-train"
train() { "$bin/mmrec-train" pretrain --device cuda --precision bf16 --data "$shards" --json "${@:2}" >"$1" 2>"${1%.jsonl}.err"; }
PRESET="${PRESET:-small}"
common=(--set "model.preset=\"$PRESET\"" --set data.seq_len=512 --set 'data.weights="code=1"'
  --set data.batch_size=32 --set optim.lr=2e-3 --set optim.min_lr=2e-3 --set optim.warmup_steps=20
  --set run.steps=1000000 --set run.eval_batches=16 --set run.ckpt_every=1000000)
status=0
case $experiment in
  batch)
    BUDGET="${BUDGET:-10000000}"
    variants=(fixed noise-scale)
    echo "== the micro-batch search on the GPU"
    train "$results/auto.jsonl" --out /tmp/ev/auto --set "model.preset=\"$PRESET\"" --set data.seq_len=512 \
      --set 'data.weights="code=1"' --set 'data.batch_size="auto"' --set run.steps=3 --set run.eval_every=0 || status=1
    # An evaluation every 300 k tokens or so for both (noise-scale steps grow to 8× longer).
    settings() { case $1 in
      fixed) echo --set optim.grad_accum=2 --set run.eval_every=10 ;;
      noise-scale) echo --set optim.grad_accum=2 --set optim.batch_schedule=\"noise-scale\" \
        --set optim.max_batch_tokens=262144 --set run.eval_every=3 ;;
    esac; } ;;
  uboo)
    BUDGET="${BUDGET:-50000000}"
    variants=(uboo-0 uboo-0.1)
    settings() { echo --set "model.uboo_weight=${1#uboo-}" --set data.batch_size=256 --set run.eval_every=20; } ;;
  *) echo "unknown experiment $experiment (batch or uboo)" >&2; exit 2 ;;
esac
runs=()
for seed in 1 2; do
  for v in "${variants[@]}"; do
    echo "== $v, seed $seed"
    # shellcheck disable=SC2046 # the settings are words
    train "$results/$v-seed$seed.jsonl" --out "/tmp/ev/$v-seed$seed" "${common[@]}" $(settings "$v") \
      --set "model.seed=$seed" --set "data.seed=$seed" --set "run.token_budget=$BUDGET" || status=1
    cp "/tmp/ev/$v-seed$seed/metrics.jsonl" "$results/$v-seed$seed.metrics.jsonl"
    runs+=("$results/$v-seed$seed.metrics.jsonl")
  done
done
for axis in tokens time; do
  "$bin/mmrec-train" plot --x $axis --out "$results/loss-vs-$axis.png" "${runs[@]}" || status=1
done
python3 bench/compare_runs.py "$results" >"$results/summary.txt" || status=1
cat "$results/summary.txt"
exit $status
