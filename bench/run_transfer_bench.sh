#!/usr/bin/env bash
# Reproduces bench/results/transfer.json: mmrec-transfer base → expert on a ~150M-parameter
# f32 model against `cp` (with and without fsync) and bench/transfer_reference.py
# (safetensors + torch), best of 3 each, same machine, same run; and `inspect` on a
# multi-GB file. Needs bench/.venv with torch and safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mmrec-target}"
cargo build --workspace --bins --quiet
bin="$CARGO_TARGET_DIR/debug"
w="${WORK:-/tmp/mmrec-transfer-bench}"
mkdir -p "$w" bench/results
[ -f "$w/base.safetensors" ] || "$bin/mmrec-train" init --preset large --vocab 8192 --out "$w/base.safetensors"
cat "$w/base.safetensors" > /dev/null   # same page-cache state for everyone
best() { # best wall seconds of 3 runs of "$@"
  local b=999999
  for _ in 1 2 3; do
    local s=$(date +%s%N); "$@" > /dev/null 2>&1; local e=$(date +%s%N)
    b=$(python3 -c "print(min($b, ($e - $s) / 1e9))")
  done
  echo "$b"
}
cp_s=$(best cp "$w/base.safetensors" "$w/cp.safetensors")
cp_sync_s=$(best sh -c "cp '$w/base.safetensors' '$w/cp.safetensors' && sync '$w/cp.safetensors'")
ours_s=$(best "$bin/mmrec-transfer" "$w/base.safetensors" --to expert --domain code --out "$w/expert.safetensors")
py_s=$(best bench/.venv/bin/python bench/transfer_reference.py "$w/base.safetensors" "$w/py.safetensors")
# A multi-GB file: the large model with its 8 blocks repeated four times.
[ -f "$w/big.safetensors" ] || "$bin/mmrec-transfer" "$w/base.safetensors" --to expert --domain code --layers 0-7,0-7,0-7,0-7 --out "$w/big.safetensors" > /dev/null
inspect_s=$(best "$bin/mmrec-transfer" inspect "$w/big.safetensors")
python3 - "$w" "$cp_s" "$cp_sync_s" "$ours_s" "$py_s" "$inspect_s" <<'PY' | tee bench/results/transfer.json
import json, os, sys, platform
w, cp_s, cp_sync_s, ours, py, insp = sys.argv[1], *map(float, sys.argv[2:])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
params = json.loads(os.popen(f"{os.environ.get('CARGO_TARGET_DIR')}/debug/mmrec-transfer inspect --json {w}/base.safetensors").read())["total_params"]
print(json.dumps({
  "machine": {"cpu": cpu, "cores": os.cpu_count()}, "build": "dev profile, mmrec-transfer/sha2/half at opt-level 2",
  "params": params, "bytes": os.path.getsize(f"{w}/base.safetensors"),
  "seconds": {"cp": cp_s, "cp_fsync": cp_sync_s, "mmrec_transfer": ours, "python_safetensors_torch": py},
  "mmrec_transfer_vs_cp": ours / cp_s, "mmrec_transfer_vs_cp_fsync": ours / cp_sync_s, "python_vs_mmrec_transfer": py / ours,
  "inspect": {"bytes": os.path.getsize(f"{w}/big.safetensors"), "seconds": insp},
}, indent=1))
PY
