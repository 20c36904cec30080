#!/usr/bin/env python3
"""Reads every shard of a `mmrec-data split` output with pyarrow, polars and DuckDB (those
installed) and checks each row's n_tokens against its token list.

usage: read_shards_check.py SHARDS_DIR   (prints one line per reader; exit 1 on a mismatch)"""
import glob, sys

files = sorted(glob.glob(f"{sys.argv[1]}/*/*.parquet"))
failed = False
try:
    import pyarrow, pyarrow.parquet as pq
    rows = 0
    for f in files:
        t = pq.read_table(f)
        lens = [len(x) for x in t.column("tokens").to_pylist()]
        failed |= lens != t.column("n_tokens").to_pylist()
        rows += t.num_rows
    enc = pq.ParquetFile(files[0]).metadata.row_group(0).column(5).encodings
    print(f"pyarrow {pyarrow.__version__}: {len(files)} shards, {rows} rows, tokens encoded {enc}; n_tokens {'MISMATCH' if failed else 'matches every token list'}")
except ImportError:
    print("pyarrow: not installed")
try:
    import polars as pl
    df = pl.read_parquet(files)
    bad = df.filter(pl.col("tokens").list.len() != pl.col("n_tokens")).height
    failed |= bad > 0
    print(f"polars {pl.__version__}: {df.height} rows; {bad} rows whose n_tokens differs")
except ImportError:
    print("polars: not installed")
try:
    import duckdb
    q = f"select count(*), sum(case when len(tokens) <> n_tokens then 1 else 0 end) from read_parquet({files!r})"
    n, bad = duckdb.sql(q).fetchall()[0]
    failed |= bad > 0
    print(f"duckdb {duckdb.__version__}: {n} rows; {bad} rows whose n_tokens differs")
except ImportError:
    print("duckdb: not installed")
sys.exit(1 if failed else 0)
