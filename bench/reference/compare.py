"""Compare the Rust model's logits with the PyTorch reference on the same weights.

usage: compare.py DUMP_DIR   (written by `cargo run --example reference_dump -- DUMP_DIR`)
Prints a JSON line and exits 1 if the max relative error is 1e-4 or more.
"""
import json
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from mmrec_ref import load, logits  # noqa: E402

d = sys.argv[1]
params, cfg = load(f"{d}/model.safetensors")
dump = load_file(f"{d}/logits.safetensors")
tokens, rust = dump["tokens"].long(), dump["logits"]
with torch.no_grad():
    ref = logits(params, cfg, tokens)
err = ((ref - rust).abs().max() / ref.abs().max()).item()
print(json.dumps({"tokens": list(tokens.shape), "max_abs_logit": ref.abs().max().item(), "max_relative_error": err, "torch": torch.__version__}))
sys.exit(0 if err < 1e-4 else 1)
