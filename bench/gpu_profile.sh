#!/usr/bin/env bash
# Times every kernel of one steady-state training step with Nsight Compute (on the GPU
# machine; clocks left alone, as METHOD.md asks). Runs `pretrain` for one step and for two,
# each under ncu, and reports the difference: the kernels of the second step alone.
#
# Usage: bench/gpu_profile.sh SHARDS RESULTS
# Env: PRESET (medium), BATCH (32), SEQ (1024), PRECISION (bf16), WEIGHTS (the domains
# trained on, code=1).
# Writes RESULTS/ncu-{1,2}.csv (ncu's raw per-kernel table) and RESULTS/profile.json
# (per kernel name: time, launches, share of the step), summarised by gpu_profile.py.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/nccl-path.sh   # a CUDA mmrec-train links libnccl.so.2
shards=$1
results=$2
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[[ -x "$ncu" ]] || { echo "no ncu on this machine" >&2; exit 1; }
status=0
for steps in 1 2; do
  rm -rf "/tmp/mmrec-profile-$steps"
  "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    --log-file "$results/ncu-$steps.csv" \
    mmrec-train pretrain --device cuda --precision "${PRECISION:-bf16}" --data "$shards" \
    --out "/tmp/mmrec-profile-$steps" --json --set "model.preset=\"${PRESET:-medium}\"" \
    --set "run.steps=$steps" --set "data.seq_len=${SEQ:-1024}" --set "data.batch_size=${BATCH:-32}" \
    --set run.eval_every=0 --set "data.weights=\"${WEIGHTS:-code=1}\"" >/dev/null 2>"$results/ncu-$steps.log" || status=1
done
python3 bench/gpu_profile.py "$results/ncu-1.csv" "$results/ncu-2.csv" >"$results/profile.json" || status=1
exit $status
