#!/usr/bin/env bash
# The main job on the bundled fixtures, end to end, in about a minute on 2 cores:
# tokenizer → shards (validated) → base → text and code experts → fused model → evaluation.
# Usage: scripts/demo.sh [OUT_DIR]   (default: demo-out/; re-running skips finished steps)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mmrec-target}"
out="${1:-demo-out}"
OUT="$out" CORPORA=fixtures/corpora PRESET=tiny VOCAB=2048 SEQ=64 BATCH=8 \
  PRETRAIN_STEPS="${PRETRAIN_STEPS:-60}" FINETUNE_STEPS="${FINETUNE_STEPS:-20}" FUSION_STEPS="${FUSION_STEPS:-10}" EVAL_BATCHES=4 \
  scripts/recipe.sh
bin="$CARGO_TARGET_DIR/debug"
echo "== the shards, checked and summarised"
"$bin/mmrec-data" validate "$out/shards"
# Full listings go to files (a `| head` would end the tools early, which pipefail reports).
"$bin/mmrec-data" inspect "$out/shards" --samples 1 > "$out/shards-inspect.txt"
head -30 "$out/shards-inspect.txt"
echo "== the fused model's header"
"$bin/mmrec-transfer" inspect "$out/fused/final.safetensors" > "$out/fused-inspect.txt"
head -12 "$out/fused-inspect.txt"
