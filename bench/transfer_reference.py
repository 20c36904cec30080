#!/usr/bin/env python3
"""Python reference for the transfer benchmark: the same base → expert copy with
safetensors + torch (load every tensor, check it is finite, rename by the identity map,
save with the expert's metadata).

usage: transfer_reference.py BASE OUT ; prints seconds as JSON."""
import json, sys, time

started = time.perf_counter()
import torch  # noqa: E402 (import time counts: it is part of the job)
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

src, out = sys.argv[1], sys.argv[2]
with safe_open(src, "pt") as f:
    meta = dict(f.metadata())
tensors = load_file(src)
for name, t in tensors.items():
    if not torch.isfinite(t).all():
        raise SystemExit(f"{name} has non-finite values")
meta.update(role="expert", domain="code")
save_file(tensors, out, metadata=meta)
print(json.dumps({"seconds": time.perf_counter() - started, "tensors": len(tensors), "params": sum(t.numel() for t in tensors.values()), "torch": torch.__version__}))
