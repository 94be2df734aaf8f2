"""Ingest throughput on the embedded default corpus (the stdlib), per core, whole stage and per step.

Runs the per-shard work in one process (so seconds are CPU-seconds on one core), then the global
dedup and write, and compares against a baseline measured in the same run: the same documents
through a plain reference path (regex word split + datasketch ``MinHash.update_batch`` with its
default SHA-1 hashing), the way a first implementation would do it.

    .venv/bin/python -m bench.ingest_throughput [--limit N]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import re
import tempfile
import time
from pathlib import Path

from tasks.common.env import apply_offline_defaults
from tasks.ingest.config import DataConfig
from tasks.ingest.filters import first_failure
from tasks.ingest.normalize import DecodeError, decode, normalize_text
from tasks.ingest.stage import finalize, plan_shards, process_shard


def main() -> None:
    apply_offline_defaults()
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0, help="only the first N files (0: all)")
    args = ap.parse_args()
    cfg = DataConfig()
    shards = plan_shards(cfg)
    if args.limit:
        items = [i for s in shards for i in s][: args.limit]
        shards = [items[i : i + cfg.shard_docs] for i in range(0, len(items), cfg.shard_docs)]
    mb_in = sum(i.size for s in shards for i in s) / 1e6

    cpu0 = time.process_time()
    results = [process_shard(s, cfg) for s in shards]
    with tempfile.TemporaryDirectory() as tmp:
        cfg_tmp = cfg.model_copy(update={"metrics_file": f"{tmp}/m.json"})
        summary = finalize(results, cfg_tmp, out_dir=f"{tmp}/clean")
    cpu = time.process_time() - cpu0
    sec = summary.seconds
    core = sum(sec[k] for k in ("normalize", "filter", "tokenize", "hash_minhash", "dedup"))
    print(
        f"corpus: {mb_in:.1f} MB in, {summary.metrics['docs_in']} docs -> {summary.metrics['docs_out']} out"
    )
    print(f"whole stage (one core): {cpu:.2f} CPU-s = {mb_in / cpu:.2f} MB/s per core")
    print(
        f"normalise + filters + exact dedup + MinHash: {core:.2f} s = {mb_in / core:.2f} MB/s per core (target >= 5)"
    )
    for k, v in sec.items():
        print(f"  {k:<13} {v:6.2f} s  {mb_in / v if v else float('inf'):8.1f} MB/s")

    # Baseline, same run: the textbook path (regex tokens, python shingles, datasketch SHA-1 hashing).
    from datasketch import MinHash

    word = re.compile(r"\w+")
    texts = []
    for s in shards:
        for item in s:
            with contextlib.suppress(DecodeError, OSError):
                texts.append(normalize_text(decode(Path(item.location).read_bytes())[0]))
    t0 = time.process_time()
    for text in texts:
        if first_failure(text, cfg):
            continue
        hashlib.sha256(text.encode()).hexdigest()
        toks = word.findall(text.lower())
        shingles = {
            " ".join(toks[i : i + cfg.dedup_ngram]).encode()
            for i in range(max(1, len(toks) - cfg.dedup_ngram + 1))
        }
        m = MinHash(num_perm=cfg.minhash_perm, seed=cfg.seed)
        m.update_batch(list(shingles))
    base = time.process_time() - t0
    ours = sec["filter"] + sec["tokenize"] + sec["hash_minhash"]  # the steps the baseline does
    print(
        f"baseline filters + sha256 + MinHash (datasketch SHA-1 path): {base:.2f} s = {mb_in / base:.2f} MB/s per core"
    )
    print(
        f"ours, same steps: {ours:.2f} s = {mb_in / ours:.2f} MB/s per core; ratio {base / ours:.2f}x"
    )


if __name__ == "__main__":
    main()
