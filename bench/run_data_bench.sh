#!/usr/bin/env bash
# Reproduces bench/results/data-split.json: mmrec-data split vs the tokenizer alone vs a
# Python reference (HF datasets + tokenizers + to_parquet), same machine, same run.
# Needs ../shared/corpora and a venv with the reference's deps:
#   python3 -m venv bench/.venv && bench/.venv/bin/pip install datasets tokenizers pyarrow
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mmrec-target}"
S="${CORPORA:-../shared/corpora}"
cargo build --release -p mmrec-pipeline -p mmrec-bench
B="$CARGO_TARGET_DIR/release/mmrec-data"
BENCH="$CARGO_TARGET_DIR/release/mmrec-bench"
mkdir -p bench/out bench/results
"$B" tokenizer train --vocab-size 8192 --out bench/out/tokenizer-8k.json "$S/wikitext.jsonl" "$S/python_stdlib.jsonl" "$S/chat.jsonl"
"$BENCH" data --text "$S/wikitext.jsonl" --code "$S/python_stdlib.jsonl" --mixed "$S/chat.jsonl" \
  --tokenizer bench/out/tokenizer-8k.json --min-mb 100 --threads 1,2 \
  --repeats 2 --python bench/.venv/bin/python --out bench/results/data-split.json
