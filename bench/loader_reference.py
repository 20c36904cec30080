#!/usr/bin/env python3
"""Python reference for `mmrec-bench loader`: PyTorch DataLoader with worker processes
over pyarrow row groups, packing documents + <|endoftext|> into [B, T+1] rows the way the
Rust loader does (shuffled row groups, no cross-worker ordering guarantees).

usage: loader_reference.py SHARD_DIR SEQ_LEN BATCH WORKERS TOKENS ; prints one JSON line.
"""
import glob, json, os, random, sys, time

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

shard_dir, T, B, workers, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
manifest = json.load(open(os.path.join(shard_dir, "manifest.json")))
eot = manifest["tokenizer"]["special_tokens"]["<|endoftext|>"]
files = sorted(glob.glob(os.path.join(shard_dir, "*", "*.parquet")))
groups = [(f, i) for f in files for i in range(pq.ParquetFile(f).num_row_groups)]


class Packed(IterableDataset):
    def __iter__(self):
        info = get_worker_info()
        mine = groups[info.id :: info.num_workers] if info else groups
        rng = random.Random(info.id if info else 0)
        row, buf = (T + 1) * B, np.empty(0, dtype=np.int64)
        while True:
            rng.shuffle(mine)
            for f, g in mine:
                col = pq.ParquetFile(f).read_row_group(g, columns=["tokens"]).column("tokens").combine_chunks()
                values = col.values.to_numpy().astype(np.int64)
                offsets = col.offsets.to_numpy()
                # Insert EOT after every document.
                stream = np.insert(values, offsets[1:], eot)
                buf = np.concatenate([buf, stream])
                while len(buf) >= row:
                    yield torch.from_numpy(buf[:row].reshape(B, T + 1).copy())
                    buf = buf[row:]


loader = DataLoader(Packed(), batch_size=None, num_workers=workers, prefetch_factor=8 if workers else None)
got, started = 0, time.perf_counter()
for batch in loader:
    got += batch.numel()
    if got >= budget:
        break
seconds = time.perf_counter() - started
print(json.dumps({"workers": workers, "tokens": got, "seconds": seconds, "tokens_per_s": got / seconds, "torch": torch.__version__}))
