"""Exact and near-duplicate removal.

Word n-grams are hashed once per document with numpy (a rolling polynomial over per-word CRC32s);
the same hashes feed MinHash shingles here and the decontamination n-grams in ``decontam.py``.
Signatures use datasketch's own permutations and its update formula, computed in blocks so a large
document never builds a huge matrix.

Near duplicates are found by LSH banding as distributable steps: each band (datasketch's optimal
bands and rows for the threshold) buckets the documents by their signature slice and yields the
pairs that share a bucket (one task per band: on the process pool or the Dask cluster); the pairs
are verified (estimated Jaccard similarity at least the threshold), and one pass in the fixed
global order keeps the first document of every group: a document is dropped when it pairs with an
earlier kept one. That is exactly what an in-memory datasketch ``MinHashLSH`` gives when documents
are inserted in order (tested), whatever the parallelism upstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from datasketch import MinHash
from datasketch.lsh import _optimal_param
from datasketch.minhash import _fmix

from tasks.runners import MapFn, serial_map

_P = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so the rolling hash mixes every position
_BLOCK = 8192


_WORD_BYTE = np.zeros(256, dtype=bool)
for _c in b"0123456789abcdefghijklmnopqrstuvwxyz_":
    _WORD_BYTE[_c] = True
_WORD_BYTE[0x80:] = True  # UTF-8 lead and continuation bytes: non-ASCII letters stay inside words
_PINV = np.uint64(pow(int(_P), -1, 1 << 64))


def word_spans(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and (exclusive) end offsets of the words of lower-cased UTF-8 bytes ``b``."""
    word = _WORD_BYTE[b]
    edges = np.diff(word.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def _power_table(base: np.uint64, n: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.cumprod(np.full(n, base, dtype=np.uint64))  # base^(i+1)


_TABLE = 1 << 20  # powers for texts up to 1 MB are computed once per process (16 MB)
_POWERS: list[np.ndarray] = []


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``P^-(i+1)`` and ``P^(i+1)`` for ``i < n``."""
    if n > _TABLE:
        return _power_table(_PINV, n), _power_table(_P, n)
    if not _POWERS:
        _POWERS.extend((_power_table(_PINV, _TABLE), _power_table(_P, _TABLE)))
    return _POWERS[0][:n], _POWERS[1][:n]


def span_hashes(b: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The 64-bit hash of each span of ``b``: the polynomial hash of a word is read off prefix
    sums of ``byte * P^-i`` (P is odd, so invertible modulo 2^64), so it does not depend on where
    the word sits."""
    pinv_pow, p_pow = _powers(len(b))
    with np.errstate(over="ignore"):
        prefix = np.concatenate(
            ([np.uint64(0)], np.cumsum((b.astype(np.uint64) + np.uint64(1)) * pinv_pow))
        )
        # sum_{i in [s, e)} (b_i + 1) * P^-(i+1), scaled by P^e: the word's hash, independent of s.
        return (prefix[ends] - prefix[starts]) * p_pow[ends - 1]


def text_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", "surrogatepass").lower(), dtype=np.uint8)


def token_hashes(text: str) -> np.ndarray:
    """A 64-bit hash of every word (runs of ASCII letters, digits, ``_`` or non-ASCII characters,
    ASCII-lower-cased), computed without a Python loop. Stable across processes."""
    b = text_bytes(text)
    if len(b) == 0:
        return np.empty(0, dtype=np.uint64)
    starts, ends = word_spans(b)
    if len(starts) == 0:
        return np.empty(0, dtype=np.uint64)
    return span_hashes(b, starts, ends)


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


def unique_sorted(x: np.ndarray) -> np.ndarray:
    """``np.unique`` by sorting: several times faster than its hash table on integer arrays."""
    x = np.sort(x)
    return x[np.concatenate(([True], x[1:] != x[:-1]))] if len(x) else x


def signature(shingles: np.ndarray, perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """MinHash signature of the shingle hashes (low 32 bits), equal to datasketch's
    ``MinHash(scheme="affine32").update_batch`` on them. Computed in blocks of one buffer laid out
    permutation by permutation, so each minimum runs along contiguous memory; uint32 arithmetic
    wraps, which is the scheme's modulo 2^32."""
    a, b = perms
    sig = np.full(len(a), np.iinfo(np.uint32).max, dtype=np.uint32)
    hv = _fmix(unique_sorted(shingles.astype(np.uint32)), 32)
    buf = np.empty((len(a), min(len(hv), _BLOCK)), dtype=np.uint32)
    for i in range(0, len(hv), _BLOCK):
        block = hv[i : i + _BLOCK]
        out = buf[:, : len(block)]
        np.multiply(a[:, None], block[None, :], out=out)
        np.add(out, b[:, None], out=out)
        np.minimum(sig, out.min(axis=1), out=sig)
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


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands and rows per band: datasketch's own choice for ``MinHashLSH(threshold, num_perm)``."""
    return _optimal_param(threshold, num_perm, 0.5, 0.5)


def band_pairs(band: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pairs ``(i, j)``, ``i < j``, of ``rows`` whose signature slices in this band are equal."""
    if len(rows) < 2:
        return np.zeros((0, 2), np.int64)
    _, bucket = np.unique(band, axis=0, return_inverse=True)
    bucket = bucket.ravel()
    order = np.argsort(bucket, kind="stable")
    cuts = np.flatnonzero(np.diff(bucket[order])) + 1
    pairs = []
    for group in np.split(order, cuts):
        if len(group) > 1:
            members = np.sort(rows[group])
            a, b = np.triu_indices(len(members), k=1)
            pairs.append(np.stack([members[a], members[b]], axis=1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)


def deduplicate(
    sha256s: list[str],
    signatures: list[np.ndarray],
    threshold: float,
    num_perm: int,
    map_fn: MapFn = serial_map,
) -> DedupResult:
    """Keep the first document of every exact (same sha256) or near-duplicate group, in order.

    ``map_fn`` runs the band steps (serially by default; the flow passes its task runner's)."""
    res = DedupResult(keep=[False] * len(sha256s))
    seen: dict[str, int] = {}
    unique = []
    for i, digest in enumerate(sha256s):
        if digest in seen:
            res.exact_of[i] = seen[digest]
        else:
            seen[digest] = i
            unique.append(i)
    rows = np.array(unique, np.int64)
    sig = np.stack([signatures[i] for i in unique]) if unique else np.zeros((0, num_perm))
    b, r = lsh_bands(threshold, num_perm)
    jobs = [{"band": sig[:, k * r : (k + 1) * r], "rows": rows} for k in range(b)]
    found = map_fn(band_pairs, jobs, "ingest: near-dup bands", [job["band"].nbytes for job in jobs])
    pairs = np.unique(np.concatenate([np.zeros((0, 2), np.int64), *found]), axis=0)
    # verify: the estimated Jaccard similarity (the share of equal signature values)
    at = np.searchsorted(rows, pairs)  # rows is sorted: a document's row in sig
    sim = (sig[at[:, 0]] == sig[at[:, 1]]).sum(axis=1) / num_perm
    earlier: dict[int, list[int]] = {}
    for i, j in pairs[sim >= threshold].tolist():
        earlier.setdefault(j, []).append(i)
    for i in unique:
        match = min((j for j in earlier.get(i, ()) if res.keep[j]), default=None)
        if match is None:
            res.keep[i] = True
        else:
            res.near_of[i] = match
    return res
