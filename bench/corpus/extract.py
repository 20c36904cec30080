#!/usr/bin/env python3
"""Turn unpacked packages into one JSONL corpus of documents (`{"path", "source", "text"}`),
one per file, without repeats (sha256 of the whitespace-normalised text), and write the
sources' manifest (package, version, licence, documents, bytes).

    extract.py prose ROOT OUT.jsonl MANIFEST.json   # ROOT/<package>/ from dpkg-deb -x
    extract.py code  ROOT OUT.jsonl MANIFEST.json   # ROOT/<crate-or-package>/ source trees

Prose: Sphinx and AsciiDoc sources (.txt, .rst), POD with its markup removed, and HTML as
text (scripts, styles and navigation dropped) where a package ships no sources; only
documents of 500+ characters that are mostly letters (not tables or code listings).
Code: .py, .rs, .c, .h files of 200 B to 100 KB.
"""
import gzip
import hashlib
import html.parser
import json
import re
import sys
from pathlib import Path

PROSE_SUFFIXES = {".txt", ".rst", ".pod", ".html", ".htm"}
CODE_SUFFIXES = {".py": "python", ".rs": "rust", ".c": "c", ".h": "c"}


class Text(html.parser.HTMLParser):
    SKIP = {"script", "style", "nav", "header", "footer", "head"}
    BLOCK = {"p", "div", "li", "br", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "dt", "dd", "section"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def html_text(raw):
    p = Text()
    p.feed(raw)
    text = "".join(p.out)
    return re.sub(r"\n\s*\n\s*(\n\s*)+", "\n\n", re.sub(r"[ \t]+", " ", text)).strip()


def pod_text(raw):
    lines = [l for l in raw.splitlines() if not l.startswith("=")]
    return re.sub(r"[BICLFSXEZ]<+([^<>]*)>+", r"\1", "\n".join(lines)).strip()


def read(path):
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except OSError:
            return None
    return data.decode("utf-8", errors="replace")


def base_suffix(path):
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def mostly_prose(text):
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / max(len(text), 1) >= 0.75


def package_meta(pkg_root):
    """(version, licence) from a package's copyright file and the .deb's name."""
    licences = []
    for copyright in pkg_root.glob("usr/share/doc/*/copyright"):
        text = copyright.read_text(errors="replace")
        if not text.startswith("Format:"):
            continue  # not machine-readable (DEP-5): pointed at below
        for line in text.splitlines():
            if line.startswith("License:") and line[8:].strip() not in licences:
                licences.append(line[8:].strip())
    for cargo in [pkg_root / "Cargo.toml"]:
        if cargo.exists():
            m = re.search(r'^license\s*=\s*"([^"]+)"', cargo.read_text(errors="replace"), re.M)
            if m:
                licences.append(m.group(1))
    if not licences:
        licences = dist_info_licences(pkg_root)
    if not licences:
        # Not a machine-readable copyright file: point at it.
        licences = [str(p.relative_to(pkg_root)) for p in pkg_root.glob("usr/share/doc/*/copyright")][:1]
    return ", ".join(licences) or "see the package"


def dist_info_licences(pkg_root):
    """A Python package's licence from the `*.dist-info/METADATA` beside it in site-packages
    (the distribution whose RECORD lists files under the package's directory)."""
    real = pkg_root.resolve()
    for info in sorted(real.parent.glob("*.dist-info")):
        record = info / "RECORD"
        if not record.exists() or not any(l.startswith(real.name + "/") for l in record.read_text(errors="replace").splitlines()):
            continue
        meta = (info / "METADATA").read_text(errors="replace") if (info / "METADATA").exists() else ""
        found = re.findall(r"^License-Expression:\s*(.+)$", meta, re.M) or re.findall(r"^Classifier: License :: (.+)$", meta, re.M)
        short = [l.strip() for l in re.findall(r"^License:\s*(.+)$", meta, re.M) if len(l) < 80]
        return found or short or [str(info.name) + "/METADATA"]
    return []


def documents(kind, pkg_root):
    files = sorted(p for p in pkg_root.rglob("*") if p.is_file())
    if kind == "code":
        for p in files:
            # A standard library's own site-packages is a source of its own.
            if {"site-packages", "dist-packages"} & set(p.relative_to(pkg_root).parts):
                continue
            if p.suffix in CODE_SUFFIXES and 200 <= p.stat().st_size <= 100_000:
                yield p, CODE_SUFFIXES[p.suffix], read(p)
        return
    # Sphinx builds ship their sources (`_sources/`): take those, not the rendered HTML.
    sphinx = any("/_sources/" in str(p) for p in files)
    stems = {str(p.with_suffix("")) for p in files if base_suffix(p) in {".txt", ".rst", ".pod"}}
    for p in files:
        suffix = base_suffix(p)
        if suffix not in PROSE_SUFFIXES:
            continue
        if suffix in {".html", ".htm"} and (sphinx or str(p.with_suffix("")) in stems):
            continue  # the rendered copy of sources already taken
        raw = read(p)
        if raw is None:
            continue
        text = html_text(raw) if suffix in {".html", ".htm"} else pod_text(raw) if suffix == ".pod" else raw.strip()
        if len(text) >= 500 and mostly_prose(text):
            yield p, "prose", text


def main(kind, root, out, manifest):
    root, seen, sources = Path(root), set(), []
    with open(out, "w") as f:
        for pkg_root in sorted(d for d in root.iterdir() if d.is_dir()):
            docs = nbytes = 0
            for path, lang, text in documents(kind, pkg_root):
                digest = hashlib.sha256(" ".join(text.split()).encode()).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                rel = str(path.relative_to(root))
                f.write(json.dumps({"path": rel, "lang": lang, "text": text}) + "\n")
                docs, nbytes = docs + 1, nbytes + len(text.encode())
            if docs:
                sources.append({"source": pkg_root.name, "licence": package_meta(pkg_root), "documents": docs, "bytes": nbytes})
    Path(manifest).write_text(json.dumps(sources, indent=1) + "\n")
    print(f"{kind}: {sum(s['documents'] for s in sources)} documents, {sum(s['bytes'] for s in sources) / 1e6:.1f} MB from {len(sources)} sources")


if __name__ == "__main__":
    main(*sys.argv[1:5])
