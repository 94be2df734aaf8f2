"""Tokenizer training time and encode throughput on the embedded default corpus (data/clean).

One run, same machine: the reference (Hugging Face ``tokenizers`` ``encode_batch``, the usual path)
against the stage's whole encode-and-pack step (tiktoken built from our merges, EOS appended, split,
round-trip check, packed and written), in MB per CPU-second (all threads counted) and tokens/s,
and a check that every encoder gives identical ids.

This VM's speed drifts by tens of percent within minutes, so the measurements are interleaved:
each round times every encoder once, the ratio is taken within a round, and medians are reported.
The reference is the fastest in that round of ``tokenizers`` with GPT-4's pattern as published,
with our equivalent rewrite of it (tasks/tokenize/config.py), and with one thread instead of Rayon's pool.

    make run   # (or python -m flows.ingest) so that data/clean exists
    .venv/bin/python -m bench.tokenize_throughput [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from tokenizers import Regex, Tokenizer, pre_tokenizers

from tasks.common.env import apply_offline_defaults
from tasks.params import load_params
from tasks.tokenize.config import GPT4_SPLIT_PATTERN
from tasks.tokenize.corpus import parquet_parts
from tasks.tokenize.stage import encode_part
from tasks.tokenize.tokenizer import (
    EncoderSpec,
    encode_batch,
    save_tokenizer,
    tiktoken_encoding,
    train_tokenizer,
)


def cpu_wall(fn):
    """Result, CPU-seconds (all threads) and wall seconds of one call."""
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def with_pattern(tokenizer_json: str, pattern: str):
    tok = Tokenizer.from_file(tokenizer_json)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tok


def main() -> None:
    apply_offline_defaults()
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
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
        fast = EncoderSpec("tiktoken", path)
        gpt4_tok = with_pattern(path, GPT4_SPLIT_PATTERN)
        gpt4_tiktoken = tiktoken_encoding(path, GPT4_SPLIT_PATTERN)
        eos, vocab = tok.token_to_id(cfg.eos_token), tok.get_vocab_size()

        def reference(t, threads: bool):  # the usual path, as users call it
            os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"
            return [e.ids for e in t.encode_batch(texts, add_special_tokens=False)]

        runs = {
            "reference tokenizers.encode_batch, GPT-4 pattern as published": lambda: reference(
                gpt4_tok, True
            ),
            "reference tokenizers.encode_batch, our pattern": lambda: reference(tok, True),
            "reference tokenizers.encode_batch, our pattern, one thread": lambda: reference(
                tok, False
            ),
            "tiktoken from our merges, GPT-4 pattern as published": lambda: (
                gpt4_tiktoken.encode_ordinary_batch(texts, num_threads=1)
            ),
            "tiktoken from our merges, our pattern (the stage's encoder)": lambda: [
                a.tolist() for a in encode_batch(fast, cfg, texts)
            ],
            "stage encode-and-pack (split, EOS, round-trip check, write)": lambda: [
                encode_part(str(p), tmp + "/tokens", fast, cfg, vocab, eos) for p in parts
            ],
        }
        encode_batch(fast, cfg, texts[:2])  # build the encoder outside the timings
        cpus = {name: [] for name in runs}
        walls = {name: [] for name in runs}
        want, identical, ratios = None, True, []
        for _ in range(args.rounds):
            for name, fn in runs.items():
                out, c, w = cpu_wall(fn)
                cpus[name].append(c)
                walls[name].append(w)
                if name.startswith("stage"):
                    continue
                want = want if want is not None else out
                identical &= out == want
                del out
            ref = min(c[-1] for n, c in cpus.items() if n.startswith("reference"))
            ratios.append(ref / cpus[list(runs)[-1]][-1])
        n_tok = sum(map(len, want))
        for name in runs:
            c, w = statistics.median(cpus[name]), statistics.median(walls[name])
            print(f"{name:<62} {mb / c:6.2f} MB/CPU-s {n_tok / w:12,.0f} tokens/s  ({c:.2f} CPU-s)")
        print(
            f"identical ids on all {len(texts)} documents, every encoder and pattern: {identical}"
        )
        print(
            "ratio per CPU-second, whole encode-and-pack vs the faster reference, per round: "
            + ", ".join(f"{r:.2f}x" for r in ratios)
            + f"; median {statistics.median(ratios):.2f}x (target >= 5x)"
        )
        if not identical:
            sys.exit("ids differ")


if __name__ == "__main__":
    main()
