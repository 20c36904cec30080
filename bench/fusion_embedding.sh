#!/usr/bin/env bash
# Does freezing the shared embedding in the experts (the recipe's default, [model] freeze)
# bring the fused model to its experts? The recipe twice on one work directory, `tiny` on
# CPU, on 20 MB slices of the real corpus: experts that train their embedding (freeze = [])
# and experts that keep the base's (the default). Split and pretraining are shared (same keys).
#
# Usage: bench/fusion_embedding.sh CORPUS_WORK OUT BIN_DIR
#   CORPUS_WORK  bench/corpus/build.sh's work directory (prose.jsonl, code.jsonl)
#   BIN_DIR      the release binaries (target/release)
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=$1 out=$2 bin=$3
mkdir -p "$out/corpus"
head -c 20000000 "$corpus/prose.jsonl" | head -n -1 >"$out/corpus/prose.jsonl"
head -c 20000000 "$corpus/code.jsonl" | head -n -1 >"$out/corpus/code.jsonl"
for variant in trained frozen; do
  freeze=$([[ $variant == frozen ]] && echo '["embed.*"]' || echo '[]')
  cat >"$out/$variant.toml" <<TOML
[pipeline]
work = "$out/work"
runs = "$out/runs-$variant"
[corpora]
text = ["$out/corpus/prose.jsonl"]
code = ["$out/corpus/code.jsonl"]
[tokenizer]
path = "bench/results/scale/tokenizer.json"
[model]
preset = "tiny"
freeze = $freeze
[train]
device = "cpu"
set = ["data.seq_len=128", "data.batch_size=16", "run.eval_every=250", "run.eval_batches=8", "run.ckpt_every=250"]
[pretrain]
set = ["run.steps=600", "data.weights=\"text=0.5,code=0.5\"", "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=50"]
[finetune]
set = ["run.steps=250", "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=20"]
[fusion]
set = ["run.steps=100", "data.weights=\"text=0.5,code=0.5\"", "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=10"]
[eval]
seq_len = 128
batch_size = 16
max_batches = 64
TOML
  "$bin/mmrec-recipe" run "$out/$variant.toml" --bin-dir "$bin"
done
