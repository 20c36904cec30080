#!/usr/bin/env bash
# The recipe at scale on a GPU machine (issue 15): pipelines/scale.toml (medium, bf16).
#
# Usage: scripts/gpu-recipe.sh CARRY RESULTS [SECONDS]
#   CARRY    bin/mmrec-{data,train,transfer,recipe}.xz (scripts/build-cuda.sh) and
#            prose.jsonl.zst (bench/corpus/build.sh)
#   RESULTS  receives the run's report, stage logs, training metrics, evaluations, the
#            split's manifest and the code corpus's sources (with their licences)
#   SECONDS  stop the pipeline after this long (SIGTERM: the trainer checkpoints); the next
#            call on the same machine resumes it (default: no limit)
# The code corpus is gathered on the machine itself: the Python sources of its own
# installation (standard library and site-packages) through bench/corpus/extract.py. All
# work lives in scale/ (ignored by git), so a call that finds it carries on from there.
# Exit status: the pipeline's (0 done, 124 stopped at SECONDS, otherwise failed).
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/nccl-path.sh   # mmrec-train links libnccl.so.2
carry=$1 results=$2 seconds=${3:-0}
mkdir -p scale/bin scale/corpus "$results"
for tool in mmrec-data mmrec-train mmrec-transfer mmrec-recipe; do
  [[ -x scale/bin/$tool ]] && continue
  python3 -c 'import lzma,sys; open(sys.argv[2],"wb").write(lzma.open(sys.argv[1]).read())' \
    "$carry/bin/$tool.xz" "scale/bin/$tool.tmp" && chmod +x "scale/bin/$tool.tmp" &&
    mv "scale/bin/$tool.tmp" "scale/bin/$tool" || exit 1
done
[[ -f scale/corpus/prose.jsonl.zst ]] || cp "$carry/prose.jsonl.zst" scale/corpus/ || exit 1
if [[ ! -f scale/corpus/code.jsonl ]]; then
  echo "== gathering the code corpus: this machine's Python sources"
  root=scale/corpus/code-root
  rm -rf "$root" && mkdir -p "$root"
  ln -s "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" "$root/python-stdlib"
  site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for pkg in "$site"/*/; do
    case $(basename "$pkg") in *.dist-info | *.egg-info | __pycache__) continue ;; esac
    ln -s "$pkg" "$root/$(basename "$pkg")"
  done
  python3 bench/corpus/extract.py code "$root" scale/corpus/code.jsonl.tmp scale/corpus/code-sources.json &&
    mv scale/corpus/code.jsonl.tmp scale/corpus/code.jsonl || exit 1
fi
cmd=(scale/bin/mmrec-recipe run pipelines/scale.toml --bin-dir scale/bin)
if ((seconds > 0)); then timeout -s TERM -k 120 "$seconds" "${cmd[@]}"; else "${cmd[@]}"; fi
status=$?
echo "== pipeline exit status $status"
run=$(ls -d scale/runs/*/ | sort | tail -1)
cp -r "$run"/. "$results/run" 2>/dev/null
rm -rf "$results/run/outputs"
for out in "$run"/outputs/*; do
  stage=$(basename "$out")
  for f in metrics.jsonl eval.json shards/manifest.json; do
    [[ -f $out/$f ]] && mkdir -p "$results/stages/$stage" && cp "$out/$f" "$results/stages/$stage/"
  done
done
cp scale/corpus/code-sources.json "$results/" 2>/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$results/gpu.csv" 2>&1
exit $status
