"""Exact and near-duplicate removal.

Word n-grams are hashed once per document with numpy (a rolling polynomial over per-word CRC32s);
the same hashes feed MinHash shingles here and the decontamination n-grams in ``decontam.py``.
Signatures use datasketch's own permutations and its update formula, computed in blocks so a large
document never builds a huge matrix; candidates come from datasketch's ``MinHashLSH`` and are kept
only when their estimated Jaccard similarity reaches the threshold. Documents are visited in a fixed
global order, so the first of a group is kept whatever the parallelism upstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from datasketch.minhash import _fmix

_P = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so the rolling hash mixes every position
_BLOCK = 2048


_WORD_BYTE = np.zeros(256, dtype=bool)
for _c in b"0123456789abcdefghijklmnopqrstuvwxyz_":
    _WORD_BYTE[_c] = True
_WORD_BYTE[0x80:] = True  # UTF-8 lead and continuation bytes: non-ASCII letters stay inside words
_PINV = np.uint64(pow(int(_P), -1, 1 << 64))


def token_hashes(text: str) -> np.ndarray:
    """A 64-bit hash of every word (runs of ASCII letters, digits, ``_`` or non-ASCII characters,
    ASCII-lower-cased), computed without a Python loop: the polynomial hash of a word is read off
    prefix sums of ``byte * P^-i`` (P is odd, so invertible modulo 2^64). Stable across processes.
    """
    b = np.frombuffer(text.encode("utf-8", "surrogatepass").lower(), dtype=np.uint8)
    if len(b) == 0:
        return np.empty(0, dtype=np.uint64)
    word = _WORD_BYTE[b]
    edges = np.diff(word.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)  # exclusive
    if len(starts) == 0:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        pinv_pow = np.cumprod(np.full(len(b), _PINV, dtype=np.uint64))  # P^-(i+1)
        p_pow = np.cumprod(np.full(len(b), _P, dtype=np.uint64))  # P^(i+1)
        prefix = np.concatenate(
            ([np.uint64(0)], np.cumsum((b.astype(np.uint64) + np.uint64(1)) * pinv_pow))
        )
        # sum_{i in [s, e)} (b_i + 1) * P^-(i+1), scaled by P^e: the word's hash, independent of s.
        return (prefix[ends] - prefix[starts]) * p_pow[ends - 1]


def ngram_hashes(tok: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of every contiguous n-gram of ``tok`` (empty when shorter than n)."""
    m = len(tok) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _P + tok[k : k + m]
    return h


SCHEME = "affine32"  # datasketch's default since 2.0: uint32 affine maps after a MurmurHash3 mix


def minhash_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations


def signature(shingles: np.ndarray, perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """MinHash signature of the shingle hashes (low 32 bits), equal to datasketch's
    ``MinHash(scheme="affine32").update_batch`` on them, computed in blocks."""
    a, b = perms
    sig = np.full(len(a), np.iinfo(np.uint32).max, dtype=np.uint32)
    hv = _fmix(np.unique(shingles.astype(np.uint32)), 32)
    with np.errstate(over="ignore"):
        for i in range(0, len(hv), _BLOCK):
            phv = hv[i : i + _BLOCK, None] * a + b
            np.minimum(sig, phv.min(axis=0), out=sig)
    return sig


def doc_signature(tok: np.ndarray, n: int, perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    shingles = ngram_hashes(tok, n) if len(tok) >= n else ngram_hashes(tok, max(len(tok), 1))
    return signature(shingles, perms)


@dataclass
class DedupResult:
    keep: list[bool]
    exact_of: dict[int, int] = field(default_factory=dict)  # dropped index -> kept index
    near_of: dict[int, int] = field(default_factory=dict)

    @property
    def n_exact(self) -> int:
        return len(self.exact_of)

    @property
    def n_near(self) -> int:
        return len(self.near_of)


def deduplicate(
    sha256s: list[str], signatures: list[np.ndarray], threshold: float, num_perm: int, seed: int
) -> DedupResult:
    """Keep the first document of every exact (same sha256) or near-duplicate group, in order."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    seen: dict[str, int] = {}
    kept_sigs: dict[int, LeanMinHash] = {}
    res = DedupResult(keep=[False] * len(sha256s))
    for i, (digest, sig) in enumerate(zip(sha256s, signatures, strict=True)):
        if digest in seen:
            res.exact_of[i] = seen[digest]
            continue
        seen[digest] = i
        mh = LeanMinHash(seed=seed, hashvalues=sig, scheme=SCHEME)
        match = next(
            (j for j in sorted(lsh.query(mh)) if kept_sigs[j].jaccard(mh) >= threshold), None
        )
        if match is not None:
            res.near_of[i] = match
            continue
        lsh.insert(i, mh)
        kept_sigs[i] = mh
        res.keep[i] = True
    return res
