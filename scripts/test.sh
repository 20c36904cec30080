#!/usr/bin/env bash
# The test command: the binaries first (the end-to-end tests run them), then every test of
# the workspace. Same profile, so the binaries cost no second compile.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mmrec-target}"
cargo build --workspace --bins --locked
exec cargo test --workspace --locked "$@"
