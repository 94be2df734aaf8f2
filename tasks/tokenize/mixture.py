"""The weighted source mixture of the train split (``tokenize.mixture``): target shares, the
passes over each source that realise them, and the rewriting of each part's train tokens."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow.parquet as pq

from tasks.tokenize.config import TokenizeConfig
from tasks.tokenize.corpus import TokenizeError, is_val


class TrainDocs(Protocol):
    """What the mixture needs of an encoded part (``tasks.tokenize.stage.PartResult``): each train
    document in order, its length in tokens (EOS included), source and draw."""

    train_lengths: np.ndarray
    train_sources: list[str]
    train_draws: np.ndarray


def mixture_draw(doc_id: str) -> float:
    """A document's place in [0, 1) for the mixture's down- and upsampling (independent of the
    train/val split's hash)."""
    return int(hashlib.sha256(f"mixture\0{doc_id}".encode()).hexdigest()[:13], 16) / 16**13


def mixture_shares(mixture: dict, natural: dict[str, float]) -> dict[str, float]:
    """Target share of the training tokens per source: sources without a weight keep their natural
    share; the weighted ones divide the rest in proportion to their weights."""
    total = sum(natural.values())
    fixed = {s: n / total for s, n in natural.items() if s not in mixture}
    rest = 1.0 - sum(fixed.values())
    wsum = sum(m.weight for m in mixture.values())
    return {**fixed, **{s: rest * m.weight / wsum for s, m in mixture.items()}}


def mixture_epochs(mixture: dict, natural: dict[str, float], unit: str) -> dict[str, float]:
    """Passes over each source that realise the target shares with the train split's size kept;
    a weight on a source with nothing in the split, or one its cap cannot meet, is an error."""
    empty = [s for s in mixture if natural.get(s, 0) <= 0]
    if empty:
        raise TokenizeError(
            f"tokenize.mixture weights {', '.join(map(repr, empty))}, which yielded no training "
            f"documents (sources in the corpus: {', '.join(sorted(natural)) or 'none'}); fix the "
            "name or remove the weight"
        )
    total = sum(natural.values())
    shares = mixture_shares(mixture, natural)
    epochs = {s: shares[s] * total / n for s, n in natural.items()}
    for s, m in mixture.items():
        if epochs[s] > m.max_epochs * (1 + 1e-9):
            raise TokenizeError(
                f"tokenize.mixture.{s}: weight {m.weight} asks for {100 * shares[s]:.1f}% of the "
                f"training {unit}, {epochs[s]:.2f} passes over a source that holds "
                f"{100 * natural[s] / total:.1f}% of them, over its cap max_epochs {m.max_epochs}; "
                f"raise max_epochs to {math.ceil(epochs[s] * 100) / 100} or lower the weight"
            )
    return epochs


def check_mixture(cfg: TokenizeConfig, parts: Sequence[Path]) -> None:
    """Before any work: the mixture's sources exist and its caps can be met (train-split bytes
    stand in for tokens; the realised shares use tokens)."""
    if not cfg.mixture:
        return
    natural: dict[str, float] = {}
    for p in parts:
        t = pq.read_table(p, columns=["id", "source", "n_bytes"])
        ids, src, n = (t.column(c).to_pylist() for c in ("id", "source", "n_bytes"))
        for i, s, b in zip(ids, src, n, strict=True):
            if not is_val(i, cfg.val_fraction):
                natural[s] = natural.get(s, 0) + b
    mixture_epochs(cfg.mixture, natural, "bytes")


def assign_copies(results: list[TrainDocs], mixture: dict) -> tuple[list[np.ndarray], dict]:
    """How many times each train document enters the packed split, and the mixture report.

    A source with e passes gives every document floor(e) copies, and one more to its documents
    in the order of their draws until the fractional pass's token budget is filled: deterministic,
    spread over every part, within one document of the target."""
    lengths = np.concatenate([r.train_lengths for r in results])
    sources = np.array([s for r in results for s in r.train_sources], dtype=object)
    draws = np.concatenate([r.train_draws for r in results])
    natural = {s: float(lengths[sources == s].sum()) for s in sorted(set(sources.tolist()))}
    epochs = mixture_epochs(mixture, natural, "tokens")
    copies = np.zeros(len(lengths), np.int64)
    for s, e in epochs.items():
        idx = np.flatnonzero(sources == s)
        base = math.floor(e + 1e-12)
        copies[idx] = base
        budget = (e - base) * natural[s]
        order = idx[np.argsort(draws[idx], kind="stable")]
        before = np.cumsum(lengths[order]) - lengths[order]
        copies[order[before < budget - 0.5]] += 1
    total = float((lengths * copies).sum())
    shares = mixture_shares(mixture, natural)
    report = {}
    for s in natural:
        got = float((lengths * copies)[sources == s].sum())
        m = mixture.get(s)
        report[s] = {
            "weight": m.weight if m else None,
            "max_epochs": m.max_epochs if m else None,
            "natural_tokens": int(natural[s]),
            "natural_share": round(natural[s] / sum(natural.values()), 4),
            "target_share": round(shares[s], 4),
            "realised_tokens": int(got),
            "realised_share": round(got / total, 4) if total else 0.0,
            "epochs": round(got / natural[s], 4),
        }
    cuts = np.cumsum([len(r.train_lengths) for r in results])[:-1]
    return np.split(copies, cuts), report


def mix_part(path: str, lengths: np.ndarray, copies: np.ndarray, dtype: str) -> int:
    """Rewrite one part's train tokens as the mixture asks: pass k holds, in order, the documents
    with at least k copies (the loader visits windows in a shuffled order anyway)."""
    arr = np.fromfile(path, dtype=dtype)
    starts = np.cumsum(lengths) - lengths
    out = [
        arr[a : a + n]
        for k in range(1, int(copies.max(initial=0)) + 1)
        for a, n, c in zip(starts, lengths, copies, strict=True)
        if c >= k
    ]
    mixed = np.concatenate(out) if out else np.zeros(0, dtype)
    tmp = Path(path).with_suffix(".mixing")
    mixed.tofile(tmp)
    os.replace(tmp, path)
    return len(mixed)
