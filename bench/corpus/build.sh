#!/usr/bin/env bash
# A real corpus for the recipe at scale (issue 15): prose from Debian's documentation
# packages and code from the sources of this workspace's crates (crates.io, as locked in
# Cargo.lock) and of Python's standard library, each document once, every source's
# licence recorded. Needs apt (Debian 12) and network access to its mirror and crates.io.
#
# Usage: bench/corpus/build.sh [OUT]   (default bench/corpus/out, ignored by git)
# Writes OUT/prose.jsonl.zst, OUT/code.jsonl.zst (mmrec-data's {"path","lang","text"}
# records) and OUT/sources.json (per source: licence, documents, bytes).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-bench/corpus/out}"
work="$out/work"
mkdir -p "$work/debs" "$work/prose" "$work/code"
# Prose: user guides, references and handbooks, not API listings alone.
packages=(linux-doc-6.1 python3.11-doc debian-handbook perl-doc postgresql-doc-15 sqlite3-doc
  git-doc debian-reference-en debian-policy developers-reference rust-doc python-pandas-doc
  python-django-doc python-scipy-doc sphinx-doc racket-doc erlang-doc ghc-doc sagemath-doc
  python-sympy-doc)
(cd "$work/debs" && apt-get download "${packages[@]}")
for deb in "$work"/debs/*.deb; do
  pkg=$(basename "$deb"); pkg=${pkg%%_*}
  [[ -d "$work/prose/$pkg" ]] || dpkg-deb -x "$deb" "$work/prose/$pkg"
done
python3 bench/corpus/extract.py prose "$work/prose" "$work/prose.jsonl" "$work/prose-sources.json"
# Code: the crates this workspace builds with, and Python's standard library.
cargo fetch --locked --quiet
registry=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/ | head -1)
for crate in "$registry"*/; do ln -sfn "$crate" "$work/code/$(basename "$crate")"; done
python=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
ln -sfn "$python" "$work/code/python-stdlib-$(basename "$python")"
python3 bench/corpus/extract.py code "$work/code" "$work/code.jsonl" "$work/code-sources.json"
for kind in prose code; do zstd -q -19 -T0 -f "$work/$kind.jsonl" -o "$out/$kind.jsonl.zst"; done
python3 - "$work" "$out" <<'PY'
import json, sys
work, out = sys.argv[1:]
sources = {k: json.load(open(f"{work}/{k}-sources.json")) for k in ("prose", "code")}
json.dump(sources, open(f"{out}/sources.json", "w"), indent=1)
for k, s in sources.items():
    mb = sum(x["bytes"] for x in s) / 1e6
    print(f"{k}: {sum(x['documents'] for x in s)} documents, {mb:.1f} MB from {len(s)} sources")
    assert mb >= 150, f"{k}: {mb:.1f} MB, under the 150 MB aim"
PY
ls -la "$out"
