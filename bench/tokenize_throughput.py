"""Tokenizer training time and encode throughput on the embedded default corpus (data/clean).

One run, same machine: the reference (Hugging Face ``tokenizers`` ``encode_batch``, the usual path)
against the stage's whole encode-and-pack step (tiktoken built from our merges, EOS appended, split,
round-trip check, packed and written), in MB per CPU-second (all threads counted) and tokens/s,
and a check that both give identical ids.

    make run   # (or python -m flows.ingest) so that data/clean exists
    .venv/bin/python bench/tokenize_throughput.py
"""

from __future__ import annotations

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


def cpu_wall(fn):
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def main() -> None:
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

        ref_ids, ref_cpu, ref_wall = cpu_wall(lambda: encode_batch(ref_spec, cfg, texts))
        n_tok = sum(map(len, ref_ids))
        print(
            f"reference tokenizers.encode_batch: {mb / ref_cpu:.2f} MB/CPU-s, {n_tok / ref_wall:,.0f} tokens/s ({ref_cpu:.2f} CPU-s, {ref_wall:.2f} s wall)"
        )

        fast_ids, f_cpu, f_wall = cpu_wall(lambda: encode_batch(fast_spec, cfg, texts))
        print(
            f"tiktoken encode only:              {mb / f_cpu:.2f} MB/CPU-s, {n_tok / f_wall:,.0f} tokens/s ({f_cpu:.2f} CPU-s)"
        )
        identical = fast_ids == ref_ids
        print(f"identical ids on all {len(texts)} documents: {identical}")

        eos = tok.token_to_id(cfg.eos_token)
        _, s_cpu, s_wall = cpu_wall(
            lambda: [
                encode_part(str(p), tmp + "/tokens", fast_spec, cfg, tok.get_vocab_size(), eos)
                for p in parts
            ]
        )
        print(
            f"stage encode-and-pack (tiktoken):  {mb / s_cpu:.2f} MB/CPU-s, {n_tok / s_wall:,.0f} tokens/s ({s_cpu:.2f} CPU-s)"
        )
        print(
            f"ratio vs reference, per CPU-second: encode {ref_cpu / f_cpu:.2f}x, whole encode-and-pack {ref_cpu / s_cpu:.2f}x (target >= 5x)"
        )
        if not identical:
            sys.exit("ids differ")


if __name__ == "__main__":
    main()
