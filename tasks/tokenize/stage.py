"""The tokenize stage: train a byte-level BPE on data/clean, then encode and pack token shards.

The tokenizer is trained with Hugging Face ``tokenizers`` (GPT-4's split pattern, then byte-level
BPE, special tokens first). For encoding, a tiktoken ``Encoding`` is built from the very same
merges and pattern; it is used only after it reproduced the reference encoder's ids exactly on a
sample of this run's documents, otherwise the stage falls back to ``tokenizers`` and says why.

Each document becomes its ids followed by EOS; documents go to train or val by a stable hash of
their id (never cut), into ``data/tokens/{train,val}/part-*.bin`` (uint16 when the vocabulary fits)
plus ``index.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tasks.common.runners import MapFn, serial_map
from tasks.common.storage import atomic_dir
from tasks.common.summary import headline, write_metrics
from tasks.tokenize.config import TokenizeConfig
from tasks.tokenize.corpus import TokenizeError, is_val, parquet_parts
from tasks.tokenize.mixture import assign_copies, check_mixture, mix_part, mixture_draw
from tasks.tokenize.tokenizer import (
    EncoderSpec,
    choose_encoder,
    decode_bytes,
    encode_batch,
    save_tokenizer,
    train_tokenizer,
)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


@dataclass
class PartResult:
    name: str
    tokens: dict[str, int]
    docs: dict[str, int]
    bytes: dict[str, int]
    not_round_trip: int
    counts: np.ndarray  # token id histogram over train+val, for vocabulary usage
    # each train document, in order: its length in tokens (EOS included), source and draw
    train_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    train_sources: list[str] = field(default_factory=list)
    train_draws: np.ndarray = field(default_factory=lambda: np.zeros(0))


def encode_part(
    part: str, out_dir: str, spec: EncoderSpec, cfg: TokenizeConfig, vocab_size: int, eos_id: int
) -> PartResult:
    """Encode one parquet part into ``out_dir/{train,val}/<part>.bin``."""
    table = pq.read_table(part, columns=["id", "text", "source"])
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    split_of = ["val" if is_val(i, cfg.val_fraction) else "train" for i in ids]
    name = Path(part).stem + ".bin"
    res = pack_texts(name, texts, split_of, spec, cfg, out_dir, vocab_size, eos_id)
    train = [i for i, s in enumerate(split_of) if s == "train"]
    sources = table.column("source").to_pylist()
    res.train_sources = [sources[i] for i in train]
    res.train_draws = np.array([mixture_draw(ids[i]) for i in train])
    return res


def pack_texts(
    name: str,
    texts: list[str],
    split_of: list[str],
    spec: EncoderSpec,
    cfg: TokenizeConfig,
    out_dir: str,
    vocab_size: int,
    eos_id: int,
) -> PartResult:
    """Encode ``texts``, append EOS to each, check each round-trips, write ``out_dir/<split>/name``."""
    zero = {"train": 0, "val": 0}
    res = PartResult(name, dict(zero), dict(zero), dict(zero), 0, np.zeros(vocab_size, np.int64))
    eos = np.array([eos_id], np.uint32)
    pieces: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    lengths = []
    for text, ids, split in zip(texts, encode_batch(spec, cfg, texts), split_of, strict=True):
        data = text.encode("utf-8", "surrogatepass")
        if decode_bytes(spec, cfg, ids) != data:
            res.not_round_trip += 1
        pieces[split] += (ids, eos)
        if split == "train":
            lengths.append(len(ids) + 1)
        res.docs[split] += 1
        res.bytes[split] += len(data)
    for split, chunks in pieces.items():
        arr = np.concatenate(chunks or [np.zeros(0, np.uint32)]).astype(token_dtype(vocab_size))
        res.tokens[split] = len(arr)
        res.counts += np.bincount(arr, minlength=vocab_size)[:vocab_size]
        path = Path(out_dir) / split / res.name
        path.parent.mkdir(parents=True, exist_ok=True)
        arr.tofile(path)
    res.train_lengths = np.array(lengths, np.int64)
    return res


@dataclass
class TokenizeSummary:
    index: dict
    metrics: dict
    seconds: dict[str, float]
    encoder_reason: str


def run_tokenize(
    cfg: TokenizeConfig, map_fn: MapFn = serial_map, log: Callable[[str], None] = print
) -> TokenizeSummary:
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    parts = parquet_parts(cfg.in_dir)
    check_mixture(cfg, parts)  # a weight that cannot be met fails here, before any work
    tok = train_tokenizer(cfg)
    seconds["train_tokenizer"] = time.perf_counter() - t0
    vocab_size = tok.get_vocab_size()
    eos_id = tok.token_to_id(cfg.eos_token)
    with atomic_dir(cfg.tokenizer_dir) as tdir:
        save_tokenizer(tok, cfg, tdir)
    tokenizer_json = str(Path(cfg.tokenizer_dir) / "tokenizer.json")
    tok_hash = hashlib.sha256(Path(tokenizer_json).read_bytes()).hexdigest()

    t1 = time.perf_counter()
    spec, reason = choose_encoder(tokenizer_json, cfg)
    seconds["check_encoder"] = time.perf_counter() - t1
    log(f"encoder: {spec.kind} ({reason})")

    t2 = time.perf_counter()
    with atomic_dir(cfg.tokens_dir) as tmp:
        results: list[PartResult] = map_fn(
            encode_part,
            [
                dict(
                    part=str(p),
                    out_dir=str(tmp),
                    spec=spec,
                    cfg=cfg,
                    vocab_size=vocab_size,
                    eos_id=eos_id,
                )
                for p in parts
            ],
            "tokenize: encode+pack",
            [p.stat().st_size for p in parts],
            lambda r: sum(r.docs.values()),
        )
        seconds["encode_pack"] = time.perf_counter() - t2
        mixture = None
        if cfg.mixture:
            t3 = time.perf_counter()
            copies, mixture = assign_copies(results, cfg.mixture)
            dtype = np.dtype(token_dtype(vocab_size)).name
            jobs = [
                dict(
                    path=str(tmp / "train" / r.name), lengths=r.train_lengths, copies=c, dtype=dtype
                )
                for r, c in zip(results, copies, strict=True)
            ]
            sizes = [int(r.train_lengths.sum()) for r in results]
            for r, c, n in zip(
                results, copies, map_fn(mix_part, jobs, "tokenize: mix", sizes), strict=True
            ):
                r.tokens["train"], r.docs["train"] = n, int(c.sum())
            seconds["mix"] = time.perf_counter() - t3
            for s, m in mixture.items():
                log(
                    f"mixture: {s} {100 * m['realised_share']:.1f}% of training tokens (target "
                    f"{100 * m['target_share']:.1f}%, natural {100 * m['natural_share']:.1f}%), "
                    f"{m['epochs']:.2f} passes"
                )
        index = build_index(results, cfg, vocab_size, eos_id, tok_hash, spec.kind, reason)
        if mixture is not None:
            index["mixture"] = mixture
        if index["splits"]["train"]["tokens"] == 0:
            raise TokenizeError(
                "no training tokens: the corpus is empty or tokenize.val_fraction is too high"
            )
        (tmp / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    metrics = index_metrics(index)
    write_metrics(cfg.metrics_file, headline("tokenize", metrics))
    return TokenizeSummary(index, metrics, seconds, reason)


def build_index(
    results: list[PartResult],
    cfg: TokenizeConfig,
    vocab_size: int,
    eos_id: int,
    tok_hash: str,
    kind: str,
    reason: str,
) -> dict:
    splits = {}
    for split in ("train", "val"):
        splits[split] = {
            "tokens": sum(r.tokens[split] for r in results),
            "docs": sum(r.docs[split] for r in results),
            "bytes": sum(r.bytes[split] for r in results),
            "shards": [
                {"path": f"{split}/{r.name}", "tokens": r.tokens[split], "docs": r.docs[split]}
                for r in results
            ],
        }
    counts = sum((r.counts for r in results), np.zeros(vocab_size, dtype=np.int64))
    counts[eos_id] = 0
    docs = sum(s["docs"] for s in splits.values())
    content_tokens = sum(s["tokens"] for s in splits.values()) - docs  # EOS excluded
    return {
        "dtype": np.dtype(token_dtype(vocab_size)).name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer_sha256": tok_hash,
        "encoder": kind,
        "val_fraction": cfg.val_fraction,
        "splits": splits,
        "bytes_per_token": round(
            sum(s["bytes"] for s in splits.values()) / max(content_tokens, 1), 4
        ),
        "vocab_used": int((counts > 0).sum()),
        "not_round_trip": sum(r.not_round_trip for r in results),
    }


def index_metrics(index: dict) -> dict:
    return {
        "train_tokens": index["splits"]["train"]["tokens"],
        "val_tokens": index["splits"]["val"]["tokens"],
        "train_docs": index["splits"]["train"]["docs"],
        "val_docs": index["splits"]["val"]["docs"],
        "bytes_per_token": index["bytes_per_token"],
        "vocab_usage": round(index["vocab_used"] / index["vocab_size"], 4),
        "not_round_trip": index["not_round_trip"],
        **{  # target vs realised share of each source (MLflow metric names: no ':' or '/')
            f"mix.{re.sub(r'[^A-Za-z0-9_.-]', '_', s)}.{k}": v
            for s, r in index.get("mixture", {}).items()
            for k in ("target_share", "realised_share", "epochs")
            for v in [r[k]]
        },
    }
