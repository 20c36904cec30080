"""MM-Rec in PyTorch: the reference the CUDA trainer is timed against (DESIGN §1).

The same model as `model/` in Rust, layer for layer: RMSNorm, the fused D→4D projection,
the MDI decay from two GELU MLPs, the gated input, the linear scan (accelerated-scan's
Triton kernel, forward and backward), HDS memory attention over persistent slots and
causal chunk summaries, the output projection, the FFN and the tied head. Timed in eager
mode and under torch.compile with bf16 autocast and fused AdamW, as a PyTorch user would
train it.

    python3 bench/torch_mmrec.py --preset medium --batch 32 --seq-len 1024 --vocab 8192 \
        --modes eager,compile --out result.json
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {"tiny": (64, 2, 2), "small": (256, 12, 4), "medium": (512, 12, 8), "large": (1024, 8, 16)}


def triton_scan(gamma, u):
    """h_t = γ_t h_{t-1} + u_t over [B, T, D] with h_0 = 0, through accelerated-scan."""
    from accelerated_scan.scalar import scan

    # accelerated-scan wants contiguous [B, D, T]; its autograd function breaks Dynamo, so
    # the graph breaks around it (CUDA.md).
    h = scan(gamma.transpose(1, 2).contiguous(), u.transpose(1, 2).contiguous())
    return h.transpose(1, 2)


triton_scan_eager_only = torch.compiler.disable(triton_scan)


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight


class Mlp(nn.Module):
    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d, heads, slots=16, chunks=(32, 256), window=64):
        super().__init__()
        self.d, self.heads, self.chunks, self.window = d, heads, chunks, window
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.in_proj = nn.Linear(d, 4 * d)
        self.mdi_z, self.mdi_k = Mlp(d, d // 4, d), Mlp(d, d // 4, d)
        nn.init.constant_(self.mdi_k.fc2.bias, 6.0)
        frac = torch.linspace(0, 1, d)
        p = 1 - 0.1 * 0.01**frac
        with torch.no_grad():
            self.mdi_z.fc2.bias.copy_(torch.log(p / (1 - p)))
        self.slots = nn.Parameter(torch.randn(slots, d) * 0.02)
        self.kv, self.mem_out, self.out_proj = nn.Linear(d, 2 * d), nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def memory(self, q, h):
        b, t, d = h.shape
        entries, visible = [self.slots.expand(b, -1, -1).to(h.dtype)], [torch.ones(t, self.slots.shape[0], dtype=torch.bool, device=h.device)]
        pos = torch.arange(t, device=h.device)
        for c in self.chunks:
            n = t // c
            entries.append(h[:, : n * c].reshape(b, n, c, d).mean(2))
            own, j = (pos // c)[:, None], torch.arange(n, device=h.device)[None, :]
            visible.append((j < own) & (j + self.window >= own))
        mem, mask = torch.cat(entries, 1), torch.cat(visible, 1)
        k, v = self.kv(mem).chunk(2, -1)
        split = lambda x: x.reshape(b, x.shape[1], self.heads, d // self.heads).transpose(1, 2)
        ctx = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        return self.mem_out(ctx.transpose(1, 2).reshape(b, t, d))

    def forward(self, x, scan):
        q, k, z, g = self.in_proj(self.norm1(x)).chunk(4, -1)
        gamma = (torch.sigmoid(self.mdi_z(z)) * torch.sigmoid(self.mdi_k(k))).float().clamp(1e-6, 1 - 1e-6)
        u = (1 - gamma) * torch.sigmoid(g.float()) * z.float()
        h = scan(gamma, u).to(x.dtype)
        r = x + self.out_proj(h + self.memory(q, h))
        return r + self.down(F.gelu(self.up(self.norm2(r))))


class MMRec(nn.Module):
    def __init__(self, preset, vocab):
        super().__init__()
        d, layers, heads = PRESETS[preset]
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = RMSNorm(d)

    def forward(self, tokens, targets, scan):
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, scan)
        logits = self.norm(x) @ self.embed.weight.t()
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def flops_per_token(preset, vocab, seq_len):
    """Matmul FLOPs of a training step per token (forward ×3), the MFU convention."""
    d, layers, _ = PRESETS[preset]
    per_block = 2 * (d * 4 * d + 2 * (d * d // 4 + d // 4 * d) + 2 * d * d + 2 * d * 4 * d)
    memory = 2 * 2 * (16 + sum(seq_len // c for c in (32, 256))) * d  # scores and context
    return 3 * (layers * (per_block + memory) + 2 * d * vocab)


def time_mode(mode, args):
    torch.manual_seed(0)
    dev = "cuda"
    model = MMRec(args.preset, args.vocab).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    scan = triton_scan if mode == "eager" else triton_scan_eager_only
    step_fn = model if mode == "eager" else torch.compile(model)
    # Distinct batches per step (random tokens: the speed does not depend on their values).
    data = torch.randint(0, args.vocab, (args.steps + args.warmup, args.batch, args.seq_len + 1), device=dev)

    def train_step(i):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(data[i, :, :-1], data[i, :, 1:], scan)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def forward_only(i):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return step_fn(data[i, :, :-1], data[i, :, 1:], scan)

    out = {}
    for name, fn in (("train_step", train_step), ("forward", forward_only)):
        for i in range(args.warmup):
            fn(i)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            fn(args.warmup + i)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        times.sort()
        med = times[len(times) // 2]
        out[name] = {
            "median_ms": med * 1e3,
            "min_ms": times[0] * 1e3,
            "max_ms": times[-1] * 1e3,
            "tokens_per_s": args.batch * args.seq_len / med,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium", choices=PRESETS)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--out")
    args = ap.parse_args()
    report = {
        "impl": "pytorch",
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "vocab": args.vocab,
        "precision": "bf16 autocast",
        "flops_per_token": flops_per_token(args.preset, args.vocab, args.seq_len),
        "modes": {m: time_mode(m, args) for m in args.modes.split(",")},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
