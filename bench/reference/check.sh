#!/usr/bin/env bash
# Cross-check the Rust model against the independent PyTorch reference (DESIGN.md §1).
# Needs a venv with torch and safetensors:  python3 -m venv bench/.venv && bench/.venv/bin/pip install torch safetensors
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mmrec-target}"
out="${1:-bench/out/reference-dump}"
cargo run --quiet --example reference_dump -p mmrec-model -- "$out"
"${PYTHON:-bench/.venv/bin/python}" bench/reference/compare.py "$out" | tee bench/results/reference-check.json
