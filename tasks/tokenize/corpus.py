"""The cleaned corpus as the tokenize stage (and fine-tuning's corpus conversations) read it:
its parts, its texts streamed in order, the tokenizer's training sample, and the train/val split
by document id."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow.parquet as pq

from tasks.common.errors import UserError


class TokenizeError(UserError):
    """The stage cannot produce usable token shards; the message says what to change."""


def parquet_parts(in_dir: str | Path) -> list[Path]:
    parts = sorted(Path(in_dir).glob("part-*.parquet"))
    if not parts:
        raise TokenizeError(
            f"no part-*.parquet in {in_dir}: run the ingest stage first (python -m flows ingest)"
        )
    return parts


def count_docs(parts: Sequence[Path]) -> int:
    """Documents in the parts, from the parquet footers (no data read)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts)


def sample_share(parts: Sequence[Path], max_bytes: int | None) -> float:
    """The share of documents the tokenizer trains on: all of them when the corpus holds at most
    ``max_bytes``, else about ``max_bytes`` worth (read from the ``n_bytes`` column only)."""
    if max_bytes is None:
        return 1.0
    total = sum(pq.read_table(p, columns=["n_bytes"]).column(0).to_numpy().sum() for p in parts)
    return 1.0 if total <= max_bytes else max_bytes / float(total)


def in_sample(sha256: str, share: float) -> bool:
    """A document's place in the sample depends on its content hash only: the same documents
    whatever the part layout, order or number of workers, spread over every part and source."""
    return share >= 1.0 or int(sha256[:16], 16) < share * 2.0**64


def iter_texts(parts: Sequence[Path], share: float = 1.0) -> Iterator[str]:
    """Stream the corpus texts (those in the sample) in order, batch by batch: never the whole
    corpus in memory."""
    for part in parts:
        f = pq.ParquetFile(part)
        for batch in f.iter_batches(columns=["text", "sha256"], batch_size=256):
            if share < 1.0:  # Python strings only for the texts in the sample
                batch = batch.filter([in_sample(h, share) for h in batch.column(1).to_pylist()])
            yield from batch.column(0).to_pylist()


def is_val(doc_id: str, fraction: float) -> bool:
    """Stable split by document id: the same document is always on the same side."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) < fraction * 2**32
