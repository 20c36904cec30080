#!/usr/bin/env bash
# The whole recipe, one command: tokenizer → split → pretrain a base → transfer it into a
# text and a code expert → fine-tune each → fuse → train the fusion layer → merge the
# experts in weight space (a small sweep of methods) → evaluate every model on the
# held-out text, code and mixed documents.
#
# Re-running after a crash skips finished steps (a `.done-STEP` marker each) and resumes
# an interrupted training step from its latest checkpoint.
#
# Settings come from the environment (defaults: a quick run on the bundled fixtures):
#   CORPORA=fixtures/corpora OUT=recipe-out PRESET=tiny VOCAB=4096 SEQ=128 BATCH=8
#   PRETRAIN_STEPS=40 FINETUNE_STEPS=20 FUSION_STEPS=10 EVAL_BATCHES=8
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mmrec-target}"
CORPORA="${CORPORA:-fixtures/corpora}"
OUT="${OUT:-recipe-out}"
PRESET="${PRESET:-tiny}"; VOCAB="${VOCAB:-4096}"; SEQ="${SEQ:-128}"; BATCH="${BATCH:-8}"
PRETRAIN_STEPS="${PRETRAIN_STEPS:-40}"; FINETUNE_STEPS="${FINETUNE_STEPS:-20}"; FUSION_STEPS="${FUSION_STEPS:-10}"
EVAL_BATCHES="${EVAL_BATCHES:-8}"
cargo build --workspace --bins --quiet
bin="$CARGO_TARGET_DIR/debug"
mkdir -p "$OUT"

step() {
  local name=$1; shift
  if [ -e "$OUT/.done-$name" ]; then echo "== $name: finished in an earlier run, skipped"; return; fi
  echo "== $name"
  "$@"
  touch "$OUT/.done-$name"
}

common=(--data "$OUT/shards" --set "data.seq_len=$SEQ" --set "data.batch_size=$BATCH" --set "run.eval_batches=$EVAL_BATCHES" --resume)

step tokenizer "$bin/mmrec-data" tokenizer train --vocab-size "$VOCAB" --out "$OUT/tokenizer.json" \
  "$CORPORA/wikitext.jsonl" "$CORPORA/python_stdlib.jsonl" "$CORPORA/chat.jsonl"
step split "$bin/mmrec-data" split --text "$CORPORA/wikitext.jsonl" --code "$CORPORA/python_stdlib.jsonl" \
  --mixed "$CORPORA/chat.jsonl" --tokenizer "$OUT/tokenizer.json" --out "$OUT/shards" --near-dup
step pretrain "$bin/mmrec-train" pretrain "${common[@]}" --out "$OUT/base" --set "model.preset=\"$PRESET\"" \
  --set "run.steps=$PRETRAIN_STEPS" --set "run.eval_every=$(( (PRETRAIN_STEPS + 3) / 4 ))" --set "run.ckpt_every=$(( (PRETRAIN_STEPS + 3) / 4 ))"
for d in text code; do
  step "transfer-$d" "$bin/mmrec-transfer" "$OUT/base/final.safetensors" --to expert --domain "$d" --sync --out "$OUT/$d-init.safetensors"
  step "finetune-$d" "$bin/mmrec-train" finetune --init "$OUT/$d-init.safetensors" "${common[@]}" --out "$OUT/$d" \
    --set "data.weights=\"$d=1\"" --set optim.lr=1e-4 --set optim.min_lr=1e-5 --set optim.warmup_steps=5 \
    --set "run.steps=$FINETUNE_STEPS" --set "run.eval_every=$(( (FINETUNE_STEPS + 1) / 2 ))" --set "run.ckpt_every=$(( (FINETUNE_STEPS + 1) / 2 ))"
done
step fuse "$bin/mmrec-transfer" fuse --text "$OUT/text/final.safetensors" --code "$OUT/code/final.safetensors" --method gated --sync --out "$OUT/fused-init.safetensors"
step fusion "$bin/mmrec-train" fusion --init "$OUT/fused-init.safetensors" "${common[@]}" --out "$OUT/fused" \
  --set optim.lr=1e-2 --set optim.min_lr=1e-3 --set optim.warmup_steps=2 \
  --set "run.steps=$FUSION_STEPS" --set "run.eval_every=$(( (FUSION_STEPS + 1) / 2 ))" --set "run.ckpt_every=$(( (FUSION_STEPS + 1) / 2 ))"
# One model of the base's size from both experts, beside the fused model (twice the
# compute): each method of a small sweep, name:arguments.
merges=("ties-d0.2:--method ties --density 0.2" "ties-d0.5:--method ties --density 0.5"
  "task-l0.5:--method task-arithmetic --lambda 0.5" "task-l1.0:--method task-arithmetic --lambda 1.0"
  "dare-d0.5:--method dare --density 0.5 --lambda 0.5" "linear:--method linear")
models=(base text code fused)
for spec in "${merges[@]}"; do
  name="merged-${spec%%:*}"
  mkdir -p "$OUT/$name"
  # shellcheck disable=SC2086 # the method's arguments are words
  step "$name" "$bin/mmrec-transfer" merge --base "$OUT/base/final.safetensors" \
    --experts "$OUT/text/final.safetensors" "$OUT/code/final.safetensors" ${spec#*:} --out "$OUT/$name/final.safetensors"
  models+=("$name")
done
for m in "${models[@]}"; do
  step "eval-$m" sh -c "'$bin/mmrec-train' eval --model '$OUT/$m/final.safetensors' --data '$OUT/shards' --seq-len $SEQ --batch-size $BATCH --json > '$OUT/eval-$m.json'"
done
python3 - "$OUT" "${models[@]}" <<'PY' 2>/dev/null || for m in "${models[@]}"; do cat "$OUT/eval-$m.json"; done
import json, sys
out, names = sys.argv[1], sys.argv[2:]
evals = {m: json.load(open(f"{out}/eval-{m}.json")) for m in names}
rows = {m: e["domains"] for m, e in evals.items()}
doms = ["text", "code", "mixed", "all"]
print("held-out perplexity (loss in nats)  " + "  ".join(f"{d:>16}" for d in doms) + "  tokens/s")
for m, r in rows.items():
    print(f"{m:<34} " + "  ".join(f"{r[d]['perplexity']:>8.1f} ({r[d]['loss']:.3f})" if d in r else f"{'-':>16}" for d in doms)
          + f"  {evals[m]['tokens_per_s']:>8.0f}")
r = rows["base"]
print(f"{'unigram entropy (nats)':<34} " + "  ".join(f"{r[d]['unigram_entropy']:>16.3f}" if d in r else f"{'-':>16}" for d in doms))
merged = [m for m in names if m.startswith("merged-")]
best = min(merged, key=lambda m: rows[m]["all"]["loss"])
print(f"best merge on the held-out split: {best} (all: {rows[best]['all']['loss']:.3f} nats; fused: {rows['fused']['all']['loss']:.3f})")
PY
