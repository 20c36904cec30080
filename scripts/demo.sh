#!/usr/bin/env bash
# The main job on the bundled fixtures: corpora -> tokenizer -> validated shards.
# Usage: scripts/demo.sh [OUT_DIR]   (default: demo-out/)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mmrec-target}"
out="${1:-demo-out}"
cargo build --workspace --bins
bin="$CARGO_TARGET_DIR/debug"
mkdir -p "$out"
c=fixtures/corpora

echo "== 1. train a byte-level BPE on the fixture corpora"
"$bin/mmrec-data" tokenizer train --vocab-size 4096 --out "$out/tokenizer.json" \
  $c/wikitext.jsonl $c/python_stdlib.jsonl $c/chat.jsonl $c/code_synthetic.jsonl

echo "== 2. split: declared text/code/mixed inputs, a source tree and bad records classified per document"
"$bin/mmrec-data" split --text $c/wikitext.jsonl --code $c/python_stdlib.jsonl $c/code_synthetic.jsonl \
  --mixed $c/chat.jsonl --auto fixtures/tree $c/bad.jsonl \
  --tokenizer "$out/tokenizer.json" --out "$out/shards" --near-dup

echo "== 3. validate and inspect"
"$bin/mmrec-data" validate "$out/shards"
"$bin/mmrec-data" inspect "$out/shards" --samples 1
echo "quarantined records (file, line, reason):"
cat "$out/shards/quarantine.jsonl"
