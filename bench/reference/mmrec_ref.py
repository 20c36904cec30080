"""Independent PyTorch implementation of MM-Rec from DESIGN.md §1, for cross-checking the
Rust model and, later, as the GPU speed reference. Written from the design text, not from
the Rust code: plain loops where the design states a loop.

    python bench/reference/mmrec_ref.py model.safetensors   # prints the config
"""
import json
import math
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file


def rms_norm(x, w):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def linear(p, name, x):
    return F.linear(x, p[name + ".weight"], p.get(name + ".bias"))


def mlp(p, name, x):
    return linear(p, name + ".fc2", F.gelu(linear(p, name + ".fc1", x)))


def scan(gamma, u, h0):
    """h_t = γ_t ⊙ h_{t-1} + u_t, sequentially."""
    h, out = h0, []
    for t in range(gamma.shape[1]):
        h = gamma[:, t] * h + u[:, t]
        out.append(h)
    return torch.stack(out, 1)


def memory(p, pre, cfg, q, h):
    """HDS: persistent slots + per-level chunk means of h; position t sees chunk j of level
    C iff j < t // C and j >= t // C - window (chunks that ended before t's chunk began)."""
    B, T, D = h.shape
    H, dh, W = cfg["n_heads"], D // cfg["n_heads"], cfg["memory_window"]
    slots = p[pre + "memory.slots"]
    entries = [slots.unsqueeze(0).expand(B, -1, -1)]
    visible = [torch.ones(T, slots.shape[0], dtype=torch.bool)]
    for C in cfg["chunk_sizes"]:
        n = T // C
        if n == 0:
            continue
        entries.append(h[:, : n * C].reshape(B, n, C, D).mean(2))
        own = torch.arange(T).unsqueeze(1) // C
        j = torch.arange(n).unsqueeze(0)
        visible.append((j < own) & (j >= own - W))
    mem = torch.cat(entries, 1)
    mask = torch.cat(visible, 1)
    kv = linear(p, pre + "memory.kv", mem)
    k, v = kv[..., :D], kv[..., D:]
    heads = lambda x: x.reshape(B, x.shape[1], H, dh).transpose(1, 2)
    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(dh)
    scores = scores.masked_fill(~mask, float("-inf"))
    ctx = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(B, T, D)
    return linear(p, pre + "memory.out", ctx)


def block(p, pre, cfg, x):
    D = x.shape[-1]
    xn = rms_norm(x, p[pre + "norm1.weight"])
    q, k, z, g = linear(p, pre + "in_proj", xn).split(D, -1)
    gamma = (torch.sigmoid(mlp(p, pre + "mdi.z", z)) * torch.sigmoid(mlp(p, pre + "mdi.k", k))).clamp(1e-6, 1 - 1e-6)
    u = (1 - gamma) * torch.sigmoid(g) * z
    h = scan(gamma, u, torch.zeros_like(x[:, 0]))
    c = memory(p, pre, cfg, q, h)
    r = x + linear(p, pre + "out_proj", h + c)
    return r + linear(p, pre + "ffn.down", F.gelu(linear(p, pre + "ffn.up", rms_norm(r, p[pre + "norm2.weight"]))))


def logits(p, cfg, tokens):
    x = p["embed.weight"][tokens]
    for i in range(cfg["n_layers"]):
        x = block(p, f"blocks.{i}.", cfg, x)
    y = rms_norm(x, p["norm.weight"])
    return y @ p["embed.weight"].T


def load(path, device="cpu"):
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "mmrec", "not an MM-Rec file"
    return load_file(path, device=device), json.loads(meta["config"])


if __name__ == "__main__":
    print(json.dumps(load(sys.argv[1])[1], indent=1))
