"""Exact and near-duplicate removal.

Words are hashed with numpy (a polynomial hash read off prefix sums, so it does not depend on a
word's position), a batch of documents at a time; the same hashes feed MinHash shingles here and
the decontamination n-grams in ``decontam.py``. Signatures use datasketch's permutations and its
update formula (written out, tested against it), computed in blocks so a large document never
builds a huge matrix.

Near duplicates are found by LSH banding as distributable steps: each band (datasketch's optimal
bands and rows for the threshold, computed the same way) buckets the documents by their signature
slice and returns the buckets of more than one document (a task takes several bands, on the process
pool or the Dask cluster; its output is linear in the documents). One pass in the fixed global order
then keeps the first document of every group: a document is dropped when its estimated Jaccard
similarity with an earlier *kept* member of one of its buckets reaches the threshold. That is
exactly what an in-memory datasketch ``MinHashLSH`` gives when documents are inserted in order
(tested), whatever the parallelism upstream.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from tasks.common.runners import MapFn, serial_map

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


_TABLE = 1 << 20  # powers for pieces up to 1 MB, computed once per process (16 MB)
_POWERS: list[np.ndarray] = []


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``P^-(i+1)`` and ``P^(i+1)`` for ``i < n``."""
    if n > _TABLE:
        return _power_table(_PINV, n), _power_table(_P, n)
    if not _POWERS:
        _POWERS.extend((_power_table(_PINV, _TABLE), _power_table(_P, _TABLE)))
    return _POWERS[0][:n], _POWERS[1][:n]


_local = threading.local()
_SCRATCH_MAX = 16 << 20


def _scratch(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A reusable buffer of this thread's, grown as needed: the per-batch working arrays (MB each)
    are then allocated once per process instead of once per batch, which spares their page
    faults and keeps a long-lived worker's heap from fragmenting (a freshly mapped array is
    touched page by page)."""
    n = int(np.prod(shape))
    if n * np.dtype(dtype).itemsize > _SCRATCH_MAX:  # a rare large input: not kept
        return np.empty(shape, dtype=dtype)
    buf = getattr(_local, name, None)
    if buf is None or buf.dtype != dtype or len(buf) < n:  # grows to the largest batch yet
        buf = np.empty(n, dtype=dtype)
        setattr(_local, name, buf)
    return buf[:n].reshape(shape)


def span_hashes(b: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The 64-bit hash of each span of ``b``: the polynomial hash of a word is read off prefix
    sums of ``byte * P^-i`` (P is odd, so invertible modulo 2^64), so it does not depend on where
    the word sits."""
    pinv_pow, p_pow = _powers(len(b))
    # prefix[i] = sum_{j < i} (b_j + 1) * P^-(j+1), built in one buffer: no temporaries, whose
    # churn fragments a long-lived worker's heap
    prefix = _scratch("prefix", (len(b) + 1,), np.uint64)
    prefix[0] = 0
    with np.errstate(over="ignore"):
        np.add(b, 1, out=prefix[1:], dtype=np.uint64)  # in uint64 under any numpy promotion
        np.multiply(prefix[1:], pinv_pow, out=prefix[1:])
        np.cumsum(prefix, out=prefix)
        # sum_{i in [s, e)} (b_i + 1) * P^-(i+1), scaled by P^e: the word's hash, independent of s.
        h = prefix[ends]
        h -= prefix[starts]
        h *= p_pow[ends - 1]
        return h


def text_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", "surrogatepass").lower(), dtype=np.uint8)


def token_hashes(text: str) -> np.ndarray:
    """A 64-bit hash of every word (runs of ASCII letters, digits, ``_`` or non-ASCII characters,
    ASCII-lower-cased), computed without a Python loop. Stable across processes. A long text is
    hashed in pieces of about 1 MB cut between words (a word's hash does not depend on where it
    sits), so the 8-byte-per-byte arrays never grow with the document."""
    return _word_hashes(text_bytes(text))


def _word_hashes(b: np.ndarray) -> np.ndarray:
    """:func:`token_hashes` of lower-cased UTF-8 bytes."""
    pieces = []
    start = 0
    while start < len(b):
        end = min(start + _TABLE, len(b))
        if end < len(b):
            breaks = np.flatnonzero(~_WORD_BYTE[b[start:end]])
            if len(breaks):  # cut after the last non-word byte
                end = start + int(breaks[-1]) + 1
            else:  # one word longer than a piece: take all of it
                after = np.flatnonzero(~_WORD_BYTE[b[end:]])
                end = end + int(after[0]) if len(after) else len(b)
        piece = b[start:end]
        starts, ends = word_spans(piece)
        if len(starts):
            pieces.append(span_hashes(piece, starts, ends))
        start = end
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.uint64)


def batch_token_hashes(datas: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`token_hashes` of several UTF-8 texts in one pass over their concatenation (a
    newline between them, so no word spans two): ``(hashes, bounds)``, text ``i``'s words being
    ``hashes[bounds[i]:bounds[i + 1]]``. A few dozen array operations per batch instead of per
    text: most documents are a few kilobytes. Batches larger than a piece are hashed text by text."""
    total = sum(map(len, datas)) + len(datas)
    if total > _TABLE:
        toks = [_word_hashes(np.frombuffer(d.lower(), dtype=np.uint8)) for d in datas]
        bounds = np.cumsum([0] + [len(t) for t in toks])
        return (np.concatenate(toks) if toks else np.empty(0, np.uint64)), bounds
    b = np.frombuffer(b"\n".join(datas).lower(), dtype=np.uint8)
    starts, ends = word_spans(b)
    offsets = np.cumsum([0] + [len(d) + 1 for d in datas])
    return span_hashes(b, starts, ends), np.searchsorted(starts, offsets)


def batch_ngrams(tok: np.ndarray, bounds: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n-gram hashes, owning text)`` of every n-gram that lies within one text of a batch: for
    each text, exactly ``ngram_hashes`` of its own words."""
    owner = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    grams = ngram_hashes(tok, n)
    m = len(grams)
    if m == 0:
        return grams, owner[:0]
    inside = owner[:m] == owner[n - 1 :]
    return grams[inside], owner[:m][inside]


def batch_signatures(
    tok: np.ndarray, bounds: np.ndarray, n: int, perms: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """:func:`doc_signature` of every text of a batch (one row each), from one sort and one pass
    of blocks over all their shingles: each block's minima are taken per text with
    ``minimum.reduceat``."""
    lens = np.diff(bounds)
    shingles, owner = batch_ngrams(tok, bounds, n)
    short = np.flatnonzero((lens > 0) & (lens < n))  # a text shorter than n: one shingle of all
    if len(short):
        extra = [ngram_hashes(tok[bounds[i] : bounds[i + 1]], int(lens[i])) for i in short]
        shingles = np.concatenate([shingles, *extra])
        owner = np.concatenate([owner, short])
    key = unique_sorted((owner.astype(np.uint64) << np.uint64(32)) | shingles.astype(np.uint32))
    owner = (key >> np.uint64(32)).astype(np.int64)
    return _minima(_fmix(key.astype(np.uint32)), owner, perms, len(lens))


def _minima(
    hv: np.ndarray, owner: np.ndarray, perms: tuple[np.ndarray, np.ndarray], k: int
) -> np.ndarray:
    """The MinHash signatures of ``k`` texts from their mixed shingle values ``hv`` (each text's
    contiguous, ``owner`` ascending), in blocks of one buffer laid out permutation by permutation,
    so each minimum runs along contiguous memory; uint32 arithmetic wraps, which is the scheme's
    modulo 2^32. A text without shingles keeps the all-max signature."""
    a, b = perms
    sig = np.full((k, len(a)), np.iinfo(np.uint32).max, dtype=np.uint32)
    buf = _scratch("minima", (len(a), min(len(hv), _BLOCK)), np.uint32)
    for i in range(0, len(hv), _BLOCK):
        block, who = hv[i : i + _BLOCK], owner[i : i + _BLOCK]
        out = buf[:, : len(block)]
        np.multiply(a[:, None], block[None, :], out=out)
        np.add(out, b[:, None], out=out)
        cuts = np.flatnonzero(np.concatenate(([True], who[1:] != who[:-1])))
        rows = who[cuts]  # distinct within a block: a text's shingles are contiguous
        sig[rows] = np.minimum(sig[rows], np.minimum.reduceat(out, cuts, axis=1).T)
    return sig


def ngram_hashes(tok: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of every contiguous n-gram of ``tok`` (empty when shorter than n)."""
    m = len(tok) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    h = tok[:m].astype(np.uint64)  # a copy, then updated in place
    with np.errstate(over="ignore"):
        for k in range(1, n):
            h *= _P
            h += tok[k : k + m]
    return h


def minhash_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's ``MinHash(num_perm, seed, scheme="affine32").permutations``: odd multipliers
    ``a`` and offsets ``b`` drawn from ``RandomState(seed)``. Written out here so the ingest
    workers never import datasketch (and the scipy it loads, ~0.6 CPU-s per process); tests
    check the signatures against datasketch's own."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def _fmix(hv: np.ndarray) -> np.ndarray:
    """The MurmurHash3 32-bit finalizer that datasketch's affine32 scheme applies first."""
    hv = hv ^ (hv >> np.uint32(16))
    hv = hv * np.uint32(0x85EBCA6B)
    hv = hv ^ (hv >> np.uint32(13))
    hv = hv * np.uint32(0xC2B2AE35)
    return hv ^ (hv >> np.uint32(16))


def unique_sorted(x: np.ndarray) -> np.ndarray:
    """``np.unique`` by sorting: several times faster than its hash table on integer arrays."""
    x = np.sort(x)
    return x[np.concatenate(([True], x[1:] != x[:-1]))] if len(x) else x


def signature(shingles: np.ndarray, perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """MinHash signature of the shingle hashes (low 32 bits), equal to datasketch's
    ``MinHash(scheme="affine32").update_batch`` on them."""
    hv = _fmix(unique_sorted(shingles.astype(np.uint32)))
    return _minima(hv, np.zeros(len(hv), dtype=np.int64), perms, 1)[0]


def doc_signature(tok: np.ndarray, n: int, perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    shingles = ngram_hashes(tok, n) if len(tok) >= n else ngram_hashes(tok, max(len(tok), 1))
    return signature(shingles, perms)


@dataclass
class DedupResult:
    keep: list[bool]
    exact_of: dict[int, int] = field(default_factory=dict)  # dropped index -> kept index
    near_of: dict[int, int] = field(default_factory=dict)
    comparisons: int = 0  # signature pairs verified

    @property
    def n_exact(self) -> int:
        return len(self.exact_of)

    @property
    def n_near(self) -> int:
        return len(self.near_of)


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands and rows per band: datasketch's choice for ``MinHashLSH(threshold, num_perm)`` (equal
    weights), the ``b * r <= num_perm`` that minimises the false-positive plus false-negative
    area. Computed here, not imported: datasketch loads scipy for its integrals, ~0.35 s of the
    driver's serial tail. ``1 - (1 - s^r)^b`` is a polynomial of degree ``b * r``, so a
    ``num_perm // 2 + 1``-point Gauss-Legendre rule integrates it exactly (tested equal to
    datasketch's)."""
    b, r = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)]).T
    x, w = np.polynomial.legendre.leggauss(num_perm // 2 + 1)

    def area(lo: float, hi: float) -> np.ndarray:  # of P(candidate | similarity s), per (b, r)
        s = (hi - lo) / 2 * x + (hi + lo) / 2
        return (hi - lo) / 2 * ((1 - (1 - s[None, :] ** r[:, None]) ** b[:, None]) @ w)

    false_pos = area(0.0, threshold)
    false_neg = (1 - threshold) - area(threshold, 1.0)
    k = int(np.argmin(false_pos + false_neg))  # the first minimum, in datasketch's (b, r) order
    return int(b[k]), int(r[k])


def band_buckets(bands: list[np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
    """The buckets of these bands that hold more than one document: each the sorted ``rows``
    whose signature slices in one band are equal. Linear in the documents, however large a
    bucket. (One task takes several bands: a task costs more than a band.)"""
    if len(rows) < 2:
        return []
    found = []
    for band in bands:
        # each row's slice as one opaque value, so one sort groups equal slices (4x faster than
        # np.unique(axis=0)); only the groups of two or more are cut out
        width = band.itemsize * band.shape[1]
        key = np.ascontiguousarray(band).view(np.dtype((np.void, width))).ravel()
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
        sizes = np.diff(np.r_[starts, len(order)])
        shared = sizes > 1
        found += [
            np.sort(rows[order[i : i + n]])
            for i, n in zip(starts[shared].tolist(), sizes[shared].tolist(), strict=True)
        ]
    return found


def deduplicate(
    sha256s: list[str],
    signatures: np.ndarray | list[np.ndarray],
    threshold: float,
    num_perm: int,
    map_fn: MapFn = serial_map,
    tasks: int = 1,
) -> DedupResult:
    """Keep the first document of every exact (same sha256) or near-duplicate group, in order.

    ``map_fn`` runs the band steps as ``tasks`` jobs (serially by default; the flow passes its
    task runner's and one job per worker). Then
    one pass in global order over the documents that share a bucket with another: each is compared
    with the *kept* earlier members of its buckets only (ascending, the first match wins), so a
    bucket of k copies costs about k comparisons, not k^2/2 pairs."""
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
    sig = np.asarray(signatures)[rows] if unique else np.zeros((0, num_perm))
    b, r = lsh_bands(threshold, num_perm)
    bands = [sig[:, k * r : (k + 1) * r] for k in range(b)]
    jobs = [{"bands": bands[k::tasks], "rows": rows} for k in range(min(tasks, b))]
    found = map_fn(
        band_buckets,
        jobs,
        "ingest: near-dup bands",
        [sum(band.nbytes for band in job["bands"]) for job in jobs],
    )
    buckets = [members for group in found for members in group]
    in_buckets: dict[int, list[int]] = {}
    for k, members in enumerate(buckets):
        for i in members.tolist():
            in_buckets.setdefault(i, []).append(k)
    kept_in: list[list[int]] = [[] for _ in buckets]  # each bucket's kept members so far, in order
    row_of = {i: n for n, i in enumerate(unique)}
    for i in unique:
        ks = in_buckets.get(i)
        if ks is None:  # shares no bucket: kept
            res.keep[i] = True
            continue
        earlier = sorted({j for k in ks for j in kept_in[k]})
        match = None
        if earlier:
            # verify: the estimated Jaccard similarity (the share of equal signature values)
            sim = (sig[[row_of[j] for j in earlier]] == sig[row_of[i]]).sum(axis=1) / num_perm
            res.comparisons += len(earlier)
            passing = np.flatnonzero(sim >= threshold)
            match = earlier[passing[0]] if len(passing) else None
        if match is None:
            res.keep[i] = True
            for k in ks:
                kept_in[k].append(i)
        else:
            res.near_of[i] = match
    return res
