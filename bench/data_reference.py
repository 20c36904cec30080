#!/usr/bin/env python3
"""Python reference for `mmrec-bench data`: the same job with HF datasets + tokenizers +
to_parquet (read JSONL, tokenize every document, write Parquet with text and tokens).
It does less than mmrec-data (no validation, dedup, classification or manifest).

usage: data_reference.py TOKENIZER OUT_DIR INPUT.jsonl... ; prints one JSON line.
"""
import json, os, sys, tempfile, time

tok_path, out_dir, inputs = sys.argv[1], sys.argv[2], sys.argv[3:]
started = time.perf_counter()
from datasets import load_dataset, disable_progress_bars  # noqa: E402 (import time counts)
from tokenizers import Tokenizer  # noqa: E402

disable_progress_bars()
tok = Tokenizer.from_file(tok_path)
with tempfile.TemporaryDirectory() as cache:
    ds = load_dataset("json", data_files=inputs, split="train", cache_dir=cache)

    def encode(batch):
        ids = [e.ids for e in tok.encode_batch(batch["text"], add_special_tokens=False)]
        return {"tokens": ids, "n_tokens": [len(i) for i in ids]}

    ds = ds.map(encode, batched=True, batch_size=1000)
    os.makedirs(out_dir, exist_ok=True)
    ds.to_parquet(os.path.join(out_dir, "data.parquet"))
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "docs": len(ds), "tokens": int(sum(ds["n_tokens"])),
                      "input_bytes": sum(os.path.getsize(p) for p in inputs)}))
