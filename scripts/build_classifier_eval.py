#!/usr/bin/env python3
"""Build fixtures/classifier_eval.jsonl.zst: real code and prose the project did not write,
labelled by where it came from, for the text/code classifier's accuracy test.

Sources (all on a Debian 12 machine with Rust, the JDK and Node installed; see
fixtures/README.md for licences). Deterministic: sorted file lists and a fixed seed.
Usage: python3 scripts/build_classifier_eval.py [../shared/corpora]
"""
import glob, io, json, os, random, re, subprocess, sys, zipfile

random.seed(20261123)
MIN, MAX = 300, 16_000
corpora = sys.argv[1] if len(sys.argv) > 1 else "../shared/corpora"
home = os.path.expanduser("~")
out = []

def read(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data.decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None

def take_files(paths, n, label, lang, source):
    paths = sorted(set(paths))
    random.shuffle(paths)
    got = 0
    for p in paths:
        t = read(p)
        if t is None or not (MIN <= len(t) <= MAX):
            continue
        out.append({"label": label, "lang": lang, "source": source, "origin": os.path.relpath(p, "/") if p.startswith("/") else p, "text": t})
        got += 1
        if got == n:
            break
    return got

def paragraphs(text):
    # Fenced blocks and interactive-session lines are code even inside prose files.
    text = re.sub(r"```.*?(```|$)", "\n\n", text, flags=re.S)
    text = re.sub(r"(?m)^\s*(>>>|\.\.\.|\$ ).*$", "", text)
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]

def take_prose(texts, n, source, keep=lambda p: True):
    """Group consecutive kept paragraphs into documents of MIN..~2000 characters."""
    docs, cur = [], []
    for origin, t in texts:
        for p in paragraphs(t):
            if not keep(p):
                cur = []
                continue
            cur.append(p)
            if sum(len(x) for x in cur) >= MIN:
                docs.append((origin, "\n\n".join(cur)))
                cur = []
        cur = []
    random.shuffle(docs)
    for origin, d in docs[:n]:
        out.append({"label": "text", "lang": "en", "source": source, "origin": origin, "text": d})

# --- code ---
reg = glob.glob(f"{home}/.cargo/registry/src/*/*/src/**/*.rs", recursive=True)
take_files(reg, 40, "code", "rust", "crates.io sources (MIT/Apache-2.0)")
take_files(glob.glob("/usr/include/**/*.h", recursive=True), 40, "code", "c", "Debian /usr/include C headers (glibc LGPL-2.1 and others)")
take_files(glob.glob("/usr/include/c++/**/*", recursive=True), 25, "code", "cpp", "GNU libstdc++ headers (GPL-3 with runtime exception)")
take_files(glob.glob("/usr/lib/node_modules/npm/**/*.js", recursive=True), 40, "code", "javascript", "npm's node_modules (Artistic-2.0, ISC, MIT)")
take_files(glob.glob("/usr/share/perl/5.36/**/*.pm", recursive=True), 30, "code", "perl", "Perl 5.36 core modules (Artistic/GPL)")
take_files(glob.glob("/usr/share/doc/git/contrib/**/*.go", recursive=True), 10, "code", "go", "git contrib Go sources (GPL-2)")
sh = [p for p in glob.glob("/usr/bin/*") + glob.glob("/etc/init.d/*") + glob.glob("/usr/share/doc/git/contrib/**/*.sh", recursive=True)
      if os.path.isfile(p) and (read(p) or "").startswith(("#!/bin/sh", "#!/bin/bash", "#! /bin/sh", "#!/usr/bin/env bash"))]
take_files(sh, 30, "code", "shell", "Debian shell scripts (various free licences)")
pip_dir = glob.glob(f"{home}/.pyenv/versions/*/lib/python3*/site-packages/pip/_internal/**/*.py", recursive=True)
take_files(pip_dir, 35, "code", "python", "pip's sources (MIT)")
jdk = [p for p in sorted(glob.glob("/usr/lib/jvm/*/lib/src.zip")) if os.path.exists(p)]
if jdk:
    with zipfile.ZipFile(jdk[0]) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".java") and n.startswith("java.base/java/util/"))
        random.shuffle(names)
        got = 0
        for n in names:
            t = z.read(n).decode("utf-8", "replace")
            if MIN <= len(t) <= MAX:
                out.append({"label": "code", "lang": "java", "source": "OpenJDK java.util sources (GPL-2 with Classpath exception)", "origin": n, "text": t})
                got += 1
                if got == 35:
                    break

# --- prose ---
wiki = [("wikitext.jsonl", json.loads(l)) for l in open(os.path.join(corpora, "wikitext.jsonl"))]
take_prose(wiki, 80, "WikiText-103 (CC BY-SA 3.0)")
lic = [(p, read(p) or "") for p in sorted(glob.glob("/usr/share/common-licenses/*")) if os.path.isfile(p)]
take_prose(lic, 60, "licence texts in /usr/share/common-licenses", keep=lambda p: len(p) > 80)
pods = [(p, read(p) or "") for p in sorted(glob.glob("/usr/share/perl/5.36/pod/*.pod") + glob.glob("/usr/share/perl/5.36/pod/perlfaq*.pod"))]
take_prose(pods, 60, "Perl documentation (Artistic/GPL)", keep=lambda p: not p.startswith(("=", " ", "\t")) and "\n " not in p)
docs = [(p, read(p) or "") for p in sorted(glob.glob("/usr/share/doc/dpkg/spec/*.txt") + glob.glob("/usr/share/doc/git/**/*.txt", recursive=True))
        if not os.path.basename(p).startswith("CMakeLists")]
take_prose(docs, 50, "dpkg and git documentation (GPL-2)", keep=lambda p: not p.startswith((" ", "\t", "-", "$", "[", "*")) and "\n " not in p and "--" not in p[:3])
meta = [(p, read(p) or "") for p in sorted(glob.glob(f"{home}/.pyenv/versions/*/lib/python3*/site-packages/*.dist-info/METADATA"))]
readmes = [(p, read(p) or "") for p in sorted(glob.glob(f"{home}/.cargo/registry/src/*/*/README.md"))]
take_prose(meta + readmes, 50, "Python package descriptions and crate READMEs (MIT/Apache-2.0)",
           keep=lambda p: not p.startswith(("#", " ", "\t", "```", "[", "|", "-", "*", "<", "!", ":", ".", "=")) and "```" not in p and ":" not in p.split("\n")[0][:30])

by = {}
for r in out:
    by[(r["label"], r["lang"])] = by.get((r["label"], r["lang"]), 0) + 1
for k, v in sorted(by.items()):
    print(k, v, file=sys.stderr)
data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out).encode()
dest = os.path.join(os.path.dirname(__file__), "..", "fixtures", "classifier_eval.jsonl.zst")
subprocess.run(["zstd", "-19", "-q", "-f", "-o", dest], input=data, check=True)
print(f"wrote {len(out)} documents to {dest}", file=sys.stderr)
