#!/usr/bin/env bash
# Builds the CUDA binaries and the GPU test executables, on any x86-64 Linux machine (no
# GPU needed), and packs them for a GPU machine that has no Rust toolchain.
#
# Usage: scripts/build-cuda.sh [DEST]            (default .carry/cuda)
# Uses nvcc from PATH when there is one, else installs CUDA 13.0 from PyPI wheels with
# scripts/cuda-toolchain.sh (with link-time stubs of libcuda and libnccl; a system CUDA
# needs NCCL installed). mmrec-train is built with the `nccl` feature (data parallelism
# on GPUs), so on the GPU machine it needs libnccl.so.2 on the loader's path:
# `. scripts/nccl-path.sh` finds PyTorch's. Writes DEST/bin/*.xz (stripped,
# xz-compressed): mmrec-train, mmrec-data, mmrec-transfer, mmrec-recipe, mmrec-bench and
# the GPU test executables; scripts/gpu-check.sh, gpu-experiment.sh and gpu-recipe.sh
# unpack and run them.
# The first build takes about 20 minutes on 2 cores (candle's own kernels); keep the
# target directory (CARGO_TARGET_DIR, default ~/.cache/mmrec-target-cuda) between builds.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.carry/cuda}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mmrec-target-cuda}"
if ! command -v nvcc >/dev/null; then
  cargo fetch --locked
  eval "$(scripts/cuda-toolchain.sh)"
fi
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# The commit the binaries were built from, for `mmrec-train bench`'s machine record (the
# GPU machine has no git).
MMREC_GIT_COMMIT="$(git rev-parse HEAD 2>/dev/null || true)"
export MMREC_GIT_COMMIT
features=(--release --workspace --locked --features mmrec-trainer/cuda,mmrec-trainer/nccl,mmrec-bench/cuda)
cargo build "${features[@]}" --bins
tests=$(cargo test "${features[@]}" --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"].startswith("cuda_"):
        print(m["executable"])')
rm -rf "$dest/bin" && mkdir -p "$dest/bin"
for exe in "$CARGO_TARGET_DIR"/release/{mmrec-train,mmrec-data,mmrec-transfer,mmrec-recipe,mmrec-bench} $tests; do
  name=$(basename "$exe" | sed 's/-[0-9a-f]\{16\}$//')
  strip -o "$dest/bin/$name" "$exe"
  # xz: half gzip's size (candle's embedded PTX compresses well); a carry is 64 MiB at most.
  xz -9 -T0 -f "$dest/bin/$name"
done
ls -la "$dest/bin"
