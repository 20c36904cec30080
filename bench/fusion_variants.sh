#!/usr/bin/env bash
# The recipe with its fusion set up in different ways, on one work directory so that the
# stages the variants share (split, pretraining, experts, control) run once:
#   trained  experts that train their embedding ([model] freeze = []), gated fusion
#   frozen   experts that keep the base's embedding (the default), gated fusion
#   mixture  the default freeze, the `mixture` fusion (the experts' distributions mixed)
# Does the fused model come within 2% of each expert on its domain (issue 15)?
#
# Usage: bench/fusion_variants.sh PROSE CODE OUT BIN_DIR
#   PROSE, CODE  inputs of mmrec-data (the measured runs: the first 20 MB of
#                bench/corpus/build.sh's prose and code, `head -c 20000000 F | head -n -1`)
#   BIN_DIR      mmrec-{data,train,transfer,recipe}
# Env: VARIANTS (trained frozen), SCALE (cpu: `tiny`, 128-token rows, 16 a batch; gpu:
# `small`, bf16, 1024-token rows, 32 a batch). Reports: OUT/runs-VARIANT/*/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/nccl-path.sh   # a CUDA mmrec-train links libnccl.so.2
prose=$1 code=$2 out=$3 bin=$4
case ${SCALE:-cpu} in
  cpu) model='preset = "tiny"' device=cpu rows='"data.seq_len=128", "data.batch_size=16"'
    steps=(600 250 100) eval='seq_len = 128' ;;
  gpu) model='preset = "small"' device=cuda rows='"data.seq_len=1024", "data.batch_size=32", "run.precision=\"bf16\""'
    steps=(600 300 150) eval='seq_len = 1024' ;;
  *) echo "SCALE is cpu or gpu" >&2; exit 2 ;;
esac
mkdir -p "$out"
for variant in ${VARIANTS:-trained frozen}; do
  case $variant in
    trained) settings=$'freeze = []\nfusion = "gated"' ;;
    frozen) settings='fusion = "gated"' ;;
    mixture) settings='fusion = "mixture"' ;;
    *) echo "unknown variant $variant (trained, frozen, mixture)" >&2; exit 2 ;;
  esac
  cat >"$out/$variant.toml" <<TOML
[pipeline]
work = "$out/work"
runs = "$out/runs-$variant"
[corpora]
text = ["$(realpath "$prose")"]
code = ["$(realpath "$code")"]
[tokenizer]
path = "bench/results/scale/tokenizer.json"
[model]
$model
$settings
[train]
device = "$device"
set = [$rows, "run.eval_every=250", "run.eval_batches=8", "run.ckpt_every=250"]
[pretrain]
set = ["run.steps=${steps[0]}", "data.weights=\"text=0.5,code=0.5\"", "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=50"]
[finetune]
set = ["run.steps=${steps[1]}", "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=20"]
[fusion]
set = ["run.steps=${steps[2]}", "data.weights=\"text=0.5,code=0.5\"", "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=10"]
[eval]
$eval
batch_size = 16
max_batches = 64
TOML
  "$bin/mmrec-recipe" run "$out/$variant.toml" --bin-dir "$bin"
done
