#!/usr/bin/env bash
# Reproduces bench/results/loader.json: the prefetching loader's tokens/s with 1 and 2
# workers against bench/loader_reference.py (PyTorch DataLoader, 2 worker processes,
# pyarrow row groups), on >100M tokens of shards built from ../shared/corpora (each
# document repeated with a copy-number prefix so nothing deduplicates).
# Needs bench/.venv with torch and pyarrow.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mmrec-target}"
S="${CORPORA:-../shared/corpora}"
w="${WORK:-/tmp/loaderbench}"
cargo build --release -p mmrec-pipeline -p mmrec-bench
B="$CARGO_TARGET_DIR/release/mmrec-data"
BENCH="$CARGO_TARGET_DIR/release/mmrec-bench"
mkdir -p "$w" bench/out bench/results
[ -f bench/out/tokenizer-8k.json ] || "$B" tokenizer train --vocab-size 8192 --out bench/out/tokenizer-8k.json "$S/wikitext.jsonl" "$S/python_stdlib.jsonl" "$S/chat.jsonl"
if [ ! -f "$w/shards/manifest.json" ]; then
  python3 - "$S" "$w" <<'PY'
import json, sys
S, w = sys.argv[1], sys.argv[2]
def texts(name):
    for l in open(f"{S}/{name}"):
        v = json.loads(l)
        if isinstance(v, str): yield v
        elif "messages" in v: yield "\n\n".join(f"<|{m['role']}|>\n{m['content']}" for m in v["messages"])
        else: yield v["text"]
docs = {d: list(texts(f)) for d, f in [("text", "wikitext.jsonl"), ("code", "python_stdlib.jsonl"), ("mixed", "chat.jsonl")]}
passes = -(-420_000_000 // sum(len(t.encode()) + 8 for v in docs.values() for t in v))
for d, v in docs.items():
    with open(f"{w}/{d}.jsonl", "w") as f:
        for k in range(passes):
            for t in v:
                f.write(json.dumps({"text": f"[{k}] {t}"}) + "\n")
PY
  "$B" split --text "$w/text.jsonl" --code "$w/code.jsonl" --mixed "$w/mixed.jsonl" --tokenizer bench/out/tokenizer-8k.json --out "$w/shards"
fi
"$BENCH" loader --shards "$w/shards" --seq-len 512 --batch 8 --workers 1,2 --tokens 200000000 \
  --python bench/.venv/bin/python --out bench/results/loader.json
