#!/usr/bin/env bash
# Issue 18's evidence on a GPU machine: the micro-batch search on the GPU, then fixed
# against noise-scale global batches (two seeds each, same token budget, same data), and
# their validation curves against tokens and against time.
#
# Usage: scripts/batch-evidence.sh MMREC_TRAIN_XZ SHARDS RESULTS
#   MMREC_TRAIN_XZ  mmrec-train built by scripts/build-cuda.sh (xz-compressed)
#   SHARDS          mmrec-data shards (code only is used)
# Settings (environment): BUDGET tokens per run (default 10 000 000), PRESET (small).
set -uo pipefail
cd "$(dirname "$0")/.."
bin=/tmp/mmrec-bin
mkdir -p "$bin" "$3"
python3 -c 'import lzma,sys; open(sys.argv[2],"wb").write(lzma.open(sys.argv[1]).read())' "$1" "$bin/mmrec-train"
chmod +x "$bin/mmrec-train"
train() { "$bin/mmrec-train" pretrain --device cuda --precision bf16 --data "$2" --json "${@:3}" >"$1" 2>"${1%.jsonl}.err"; }
results=$3
BUDGET="${BUDGET:-10000000}"
PRESET="${PRESET:-small}"
common=(--set "model.preset=\"$PRESET\"" --set data.seq_len=512 --set 'data.weights="code=1"')
status=0
echo "== the micro-batch search on the GPU"
train "$results/auto.jsonl" "$2" --out /tmp/ev/auto "${common[@]}" --set 'data.batch_size="auto"' \
  --set run.steps=3 --set run.eval_every=0 || status=1
# Same micro-batch (32 rows × 512 tokens) and base accumulation (2) in every run; a
# constant rate after warm-up, so a run with fewer, larger steps is not penalised by a
# schedule measured in steps; the noise-scale runs may grow to 16 batches (262 144 tokens).
for seed in 1 2; do
  for schedule in fixed noise-scale; do
    echo "== $schedule, seed $seed"
    # An evaluation every 300 k tokens or so for both (noise-scale steps grow to 8× longer).
    every=10; [[ $schedule == noise-scale ]] && every=3
    train "$results/$schedule-seed$seed.jsonl" "$2" --out "/tmp/ev/$schedule-seed$seed" "${common[@]}" \
      --set data.batch_size=32 --set optim.grad_accum=2 --set "optim.batch_schedule=\"$schedule\"" \
      --set optim.max_batch_tokens=262144 --set optim.lr=2e-3 --set optim.min_lr=2e-3 \
      --set optim.warmup_steps=20 --set "model.seed=$seed" --set "data.seed=$seed" \
      --set run.steps=1000000 --set "run.token_budget=$BUDGET" --set run.eval_every=$every \
      --set run.eval_batches=16 --set run.ckpt_every=1000000 || status=1
    cp "/tmp/ev/$schedule-seed$seed/metrics.jsonl" "$results/$schedule-seed$seed.metrics.jsonl"
  done
done
runs=(/tmp/ev/fixed-seed1 /tmp/ev/noise-scale-seed1 /tmp/ev/fixed-seed2 /tmp/ev/noise-scale-seed2)
for axis in tokens time; do
  "$bin/mmrec-train" plot --x $axis --out "$results/loss-vs-$axis.png" "${runs[@]}" || status=1
done
python3 bench/batch_evidence.py "$results" >"$results/summary.txt" || status=1
cat "$results/summary.txt"
exit $status
