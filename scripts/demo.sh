#!/usr/bin/env bash
# The main job on the bundled fixtures, end to end, in about a minute on 2 cores: the
# nightly pipeline of pipelines/nightly.toml (tokenizer → shards → base → text and code
# experts and a control → fused model → evaluation → report), then a look at its shards
# and fused model. Re-running skips every stage whose inputs did not change.
# Usage: scripts/demo.sh [CONFIG]   (default pipelines/nightly.toml; outputs under nightly/)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mmrec-target}"
cargo build --workspace --bins --quiet
bin="$CARGO_TARGET_DIR/debug"
report=$("$bin/mmrec-recipe" run "${1:-pipelines/nightly.toml}")
run=$(dirname "$report")
cat "$report"
echo "== the shards, checked and summarised"
"$bin/mmrec-data" validate "$run/outputs/split/shards"
# Full listings go to files (a `| head` would end the tools early, which pipefail reports).
"$bin/mmrec-data" inspect "$run/outputs/split/shards" --samples 1 > "$run/shards-inspect.txt"
head -30 "$run/shards-inspect.txt"
echo "== the fused model's header"
"$bin/mmrec-transfer" inspect "$run/outputs/fusion/final.safetensors" > "$run/fused-inspect.txt"
head -12 "$run/fused-inspect.txt"
