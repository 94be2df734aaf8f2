"""Tokenizer training time and encode throughput on the embedded default corpus (data/clean).

One run, same machine: the reference (Hugging Face ``tokenizers`` ``encode_batch``, the usual path)
against the stage's whole encode-and-pack step (tiktoken built from our merges, EOS appended, split,
round-trip check, packed and written), in MB per CPU-second (all threads counted) and tokens/s,
and a check that both give identical ids.

    make run   # (or python -m flows.ingest) so that data/clean exists
    .venv/bin/python bench/tokenize_throughput.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.env import apply_offline_defaults  # noqa: E402

apply_offline_defaults()

import pyarrow.parquet as pq  # noqa: E402

from tasks.config import load_params  # noqa: E402
from tasks.tokenize import (  # noqa: E402
    EncoderSpec,
    encode_batch,
    encode_part,
    parquet_parts,
    save_tokenizer,
    train_tokenizer,
)


def cpu_wall(fn, repeat: int = 1):
    """Result, and the median CPU-seconds (all threads) and wall seconds over ``repeat`` runs:
    this VM's timings vary by tens of percent from run to run."""
    cpus, walls = [], []
    for _ in range(repeat):
        c, w = time.process_time(), time.perf_counter()
        out = fn()
        cpus.append(time.process_time() - c)
        walls.append(time.perf_counter() - w)
    return out, statistics.median(cpus), statistics.median(walls)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (median reported)")
    args = ap.parse_args()
    cfg = load_params("params.yaml").tokenize
    parts = parquet_parts(cfg.in_dir)
    texts = [t for p in parts for t in pq.read_table(p, columns=["text"]).column(0).to_pylist()]
    mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6
    print(f"corpus: {len(texts)} docs, {mb:.1f} MB from {cfg.in_dir}")

    tok, cpu, wall = cpu_wall(lambda: train_tokenizer(cfg))
    print(f"tokenizer training (vocab {cfg.vocab_size}): {wall:.1f} s wall, {cpu:.1f} CPU-s")
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(tok, cfg, tmp)
        path = str(Path(tmp) / "tokenizer.json")
        ref_spec, fast_spec = EncoderSpec("tokenizers", path), EncoderSpec("tiktoken", path)
        encode_batch(fast_spec, cfg, texts[:2])  # build both encoders outside the timings
        encode_batch(ref_spec, cfg, texts[:2])

        # The reference as users run it: tokenizers' default parallelism (Rayon threads).
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        ref_ids, ref_cpu, ref_wall = cpu_wall(
            lambda: encode_batch(ref_spec, cfg, texts), args.repeat
        )
        n_tok = sum(map(len, ref_ids))
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        _, ref1_cpu, ref1_wall = cpu_wall(lambda: encode_batch(ref_spec, cfg, texts), args.repeat)
        fast_ids, f_cpu, f_wall = cpu_wall(lambda: encode_batch(fast_spec, cfg, texts), args.repeat)
        identical = fast_ids == ref_ids
        del fast_ids, ref_ids
        eos = tok.token_to_id(cfg.eos_token)
        vocab = tok.get_vocab_size()
        _, s_cpu, s_wall = cpu_wall(
            lambda: [
                encode_part(str(p), tmp + "/tokens", fast_spec, cfg, vocab, eos) for p in parts
            ],
            args.repeat,
        )
        rows = [
            ("reference tokenizers.encode_batch (default threads)", ref_cpu, ref_wall),
            ("reference tokenizers.encode_batch (one thread)", ref1_cpu, ref1_wall),
            ("tiktoken from our merges, encode only", f_cpu, f_wall),
            ("stage encode-and-pack (split, EOS, round-trip check, write)", s_cpu, s_wall),
        ]
        for name, c, w in rows:
            print(f"{name:<62} {mb / c:6.2f} MB/CPU-s {n_tok / w:12,.0f} tokens/s  ({c:.2f} CPU-s)")
        print(f"identical ids on all {len(texts)} documents: {identical}")
        print(
            f"ratio per CPU-second, whole encode-and-pack vs reference: {ref_cpu / s_cpu:.2f}x "
            f"(vs one-thread reference {ref1_cpu / s_cpu:.2f}x; target >= 5x)"
        )
        if not identical:
            sys.exit("ids differ")


if __name__ == "__main__":
    main()
