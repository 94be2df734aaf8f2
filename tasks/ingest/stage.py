"""The ingest stage: sources -> cleaned, filtered, deduplicated, decontaminated Parquet shards.

Per shard (in parallel): read -> decode -> normalise -> quality filters -> PII scrub ->
decontaminate -> sha256 + MinHash signature; the cleaned documents go to a staged Parquet file and
only their ids, hashes, sizes and signatures come back. Then once, in the fixed global order:
exact and near-duplicate removal on those, and (in parallel again) the output parts cut from the
staged files; the data card, quarantine and metrics are written atomically with them. Memory does
not grow with the text of the corpus: no process ever holds more than a shard or a part of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.common.errors import UserError
from tasks.common.runners import MapFn, release_memory, serial_map, start_map
from tasks.common.storage import S3Settings, atomic_dir, scratch_dir
from tasks.common.summary import headline, write_metrics
from tasks.ingest import filters
from tasks.ingest.card import build_card
from tasks.ingest.config import DataConfig
from tasks.ingest.decontam import NgramIndex, benchmark_index, load_index, save_benchmark_index
from tasks.ingest.dedup import (
    batch_ngrams,
    batch_signatures,
    batch_token_hashes,
    deduplicate,
    minhash_permutations,
)
from tasks.ingest.normalize import DecodeError, decode, normalize_text
from tasks.ingest.scrub import scrub
from tasks.ingest.sources import Bad, Item, discover, read_item

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("uri", pa.string()),
        ("sha256", pa.string()),
        ("n_bytes", pa.int64()),
    ]
)
# Per staged document, all the driver keeps: 42 bytes, not a dict of strings (~560 bytes)
META = np.dtype([("sha256", "S32"), ("source", np.int32), ("n_bytes", np.int64)])
SHARDS_PER_WORKER = 4  # at least, where shards of 1 MB or more allow
MIN_SHARD_BYTES = 1_000_000
BATCH_BYTES = 500_000  # cleaned documents are hashed and signed in batches of about this size
STAGE_FLUSH_BYTES = 2_000_000  # a shard stages its cleaned text in row groups of about this size
STEPS = ("read", "normalize", "filter", "scrub", "tokenize", "decontam", "hash_minhash", "stage")


class IngestError(UserError):
    """The stage cannot produce a usable corpus; the message says what to change."""


@dataclass
class SourceStats:
    docs_in: int = 0
    bytes_in: int = 0
    quarantined: int = 0
    filtered: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    contaminated: int = 0
    encodings: Counter = field(default_factory=Counter)

    def merge(self, other: SourceStats) -> None:
        self.docs_in += other.docs_in
        self.bytes_in += other.bytes_in
        self.quarantined += other.quarantined
        self.contaminated += other.contaminated
        self.filtered.update(other.filtered)
        self.pii.update(other.pii)
        self.encodings.update(other.encodings)


@dataclass
class ShardResult:
    stage_file: str  # the cleaned documents, in order (SCHEMA)
    meta: list[np.ndarray]  # what dedup and the card need of them (META): blocks, in order
    signatures: list[np.ndarray]  # their MinHash signatures: 2-D blocks, in order
    stats: dict[int, SourceStats]
    quarantine: list[dict]
    contamination: list[dict]
    seconds: dict[str, float]


def plan_shards(cfg: DataConfig, s3: S3Settings | None = None) -> list[list[Item]]:
    """Discover every input and cut the list, in order, into shards of at most ``shard_docs``
    items and (unless one item is larger) ``shard_bytes`` bytes; smaller where that would leave
    fewer than four shards per worker; and as many of about equal size as make a multiple of the
    workers, where shards of 1 MB or more allow: the workers then finish together instead of one
    cleaning a last shard alone (at 405 MB, 13 shards of 32 MB became 14 of 29)."""
    items = discover(cfg, s3)
    if not items:
        raise IngestError("the sources hold no input at all; check data.sources")
    total = sum(item.size for item in items)
    w = cfg.workers
    n = max(
        -(-total // cfg.shard_bytes),
        -(-len(items) // cfg.shard_docs),
        min(SHARDS_PER_WORKER * w, total // MIN_SHARD_BYTES),
        1,
    )
    if total // (-(-n // w) * w) >= MIN_SHARD_BYTES:
        n = -(-n // w) * w
    shards: list[list[Item]] = [[] for _ in range(n)]
    at = 0
    for item in items:  # each item to the shard its middle byte falls in
        shards[min(n - 1, (2 * at + item.size) * n // (2 * max(total, 1)))].append(item)
        at += item.size
    return [piece for shard in shards if shard for piece in _within_limits(shard, cfg)]


def _within_limits(items: list[Item], cfg: DataConfig) -> list[list[Item]]:
    """``items`` cut, in order, where ``shard_docs`` items or ``shard_bytes`` bytes would be passed
    (a shard of one item may be larger): rare after the even cut above, which aims below both."""
    pieces: list[list[Item]] = [[]]
    size = 0
    for item in items:
        if pieces[-1] and (len(pieces[-1]) >= cfg.shard_docs or size + item.size > cfg.shard_bytes):
            pieces.append([])
            size = 0
        pieces[-1].append(item)
        size += item.size
    return pieces


def doc_id(source_label: str, uri: str) -> str:
    return hashlib.sha256(f"{source_label}\0{uri}".encode()).hexdigest()[:24]


def decontam_index(cfg: DataConfig, index_dir: str | None = None) -> NgramIndex | None:
    """The benchmark n-gram index, memory-mapped: from ``index_dir`` where the run put a copy
    (remote workers see the run's folder, not this machine's cache), else from the cache."""
    if not cfg.decontam_benchmarks:
        return None
    if index_dir:
        return load_index(index_dir)
    return benchmark_index(tuple(cfg.decontam_benchmarks), cfg.decontam_ngram)


def process_shard(
    items: list[Item],
    cfg: DataConfig,
    stage_file: str,
    s3: S3Settings | None = None,
    index_dir: str | None = None,
) -> ShardResult:
    """Clean one shard's items; write the kept documents to ``stage_file`` and return everything
    else (digests, sizes, signatures, counts, quarantine and contamination rows)."""
    perms = minhash_permutations(cfg.minhash_perm, cfg.seed)
    index = decontam_index(cfg, index_dir)
    res = ShardResult(stage_file, [], [], {}, [], [], dict.fromkeys(STEPS, 0.0))
    t = res.seconds
    # no dictionaries: they never pay on unique texts (Arrow tries, then falls back), -25% CPU
    with pq.ParquetWriter(stage_file, SCHEMA, compression="lz4", use_dictionary=False) as writer:
        batch: list[dict] = []
        size = 0
        for doc in _clean_items(items, cfg, s3, index, perms, res):
            batch.append(doc)
            size += doc["n_bytes"]
            if size >= STAGE_FLUSH_BYTES:
                _stage(writer, batch, t)
                batch, size = [], 0
        _stage(writer, batch, t)
    return res


def _stage(writer: pq.ParquetWriter, docs: list[dict], seconds: dict[str, float]) -> None:
    t0 = time.perf_counter()
    # column by column: Arrow converts a list of strings ~2.5x faster than a list of dicts
    writer.write_table(pa.table({n: [d[n] for d in docs] for n in SCHEMA.names}, schema=SCHEMA))
    seconds["stage"] += time.perf_counter() - t0


def _clean_items(items, cfg, s3, index, perms, res: ShardResult):
    """The cleaning pipeline of :func:`process_shard`: yields each kept document (a SCHEMA row)
    and records everything else in ``res``."""
    t = res.seconds
    batch: list[tuple] = []
    size = 0
    for item in items:
        src = cfg.sources[item.source]
        st = res.stats.setdefault(item.source, SourceStats())
        t0 = time.perf_counter()
        raws = list(read_item(item, src, cfg, s3))
        t["read"] += time.perf_counter() - t0
        for raw in raws:
            st.docs_in += 1
            if isinstance(raw, Bad):
                st.quarantined += 1
                res.quarantine.append({"uri": raw.uri, "source": src.label, "reason": raw.reason})
                continue
            st.bytes_in += raw.n_bytes
            t0 = time.perf_counter()
            if isinstance(raw.data, bytes):
                try:
                    text, enc = decode(raw.data, cfg.fallback_encodings)
                except DecodeError as exc:
                    st.quarantined += 1
                    res.quarantine.append(
                        {"uri": raw.uri, "source": src.label, "reason": exc.reason}
                    )
                    continue
                st.encodings[enc] += 1
            else:
                text = raw.data
            text = normalize_text(text, cfg.unicode_form)
            t1 = time.perf_counter()
            reason = filters.first_failure(text, cfg)
            t2 = time.perf_counter()
            t["normalize"] += t1 - t0
            t["filter"] += t2 - t1
            if reason:
                st.filtered[reason] += 1
                continue
            text, found = scrub(text, cfg)
            st.pii.update(found)
            t["scrub"] += time.perf_counter() - t2
            data = text.encode("utf-8", "surrogatepass")
            batch.append((item.source, src, raw.uri, text, data, st))
            size += len(data)
            if size >= BATCH_BYTES:
                yield from _hash_batch(batch, cfg, index, perms, res)
                batch, size = [], 0
    yield from _hash_batch(batch, cfg, index, perms, res)


def _hash_batch(batch: list[tuple], cfg, index, perms, res: ShardResult):
    """Decontaminate, hash and sign a batch of cleaned documents ``(source index, source, uri,
    text, utf-8, stats)`` with array operations over all of them at once; yield the kept ones in
    order."""
    if not batch:
        return
    t, t0 = res.seconds, time.perf_counter()
    tok, bounds = batch_token_hashes([doc[4] for doc in batch])  # for decontamination and MinHash
    t1 = time.perf_counter()
    hits: list[list[str]] = [[] for _ in batch]
    if index is not None:
        hits = index.hits_batch(*batch_ngrams(tok, bounds, cfg.decontam_ngram), len(batch))
    t2 = time.perf_counter()
    sigs = batch_signatures(tok, bounds, cfg.dedup_ngram, perms)
    t["tokenize"] += t1 - t0
    t["decontam"] += t2 - t1
    kept, signed, meta = [], [], []
    for i, ((k, src, uri, text, data, st), found) in enumerate(zip(batch, hits, strict=True)):
        if found:
            st.contaminated += 1
            res.contamination.append({"uri": uri, "source": src.label, "matches": found})
            continue
        digest = hashlib.sha256(data).digest()
        meta.append((digest, k, len(data)))
        signed.append(i)
        kept.append(
            {
                "id": doc_id(src.label, uri),
                "text": text,
                "source": src.label,
                "uri": uri,
                "sha256": digest.hex(),
                "n_bytes": len(data),
            }
        )
    res.meta.append(np.array(meta, dtype=META))
    res.signatures.append(sigs[signed])
    t["hash_minhash"] += time.perf_counter() - t2
    yield from kept


@dataclass
class IngestSummary:
    card: dict
    metrics: dict
    seconds: dict[str, float]
    out_dir: str


def plan_parts(
    kept: list[tuple[str, int, int]], part_max_bytes: int
) -> tuple[list[list], list[int]]:
    """Cut the kept documents, ``(stage_file, row, n_bytes)`` in global order, into output parts of
    about ``part_max_bytes``: each part a list of ``(stage_file, [rows])`` segments, in order; and
    each part's size in bytes."""
    parts: list[list] = [[]]
    sizes = [0]
    for f, i, n in kept:
        if parts[-1] and sizes[-1] + n > part_max_bytes:
            parts.append([])
            sizes.append(0)
        part = parts[-1]
        if part and part[-1][0] == f:
            part[-1][1].append(i)
        else:
            part.append((f, [i]))
        sizes[-1] += n
    return parts, sizes


def write_parts(parts: list[tuple[list, str]]) -> list[str]:
    """Output parts, each ``(segments, path)``, from their staged segments (reading only the
    shards they need). One task writes several parts: a task costs more than a part."""
    for segments, path in parts:
        table = pa.concat_tables([_read_rows(f, rows) for f, rows in segments]).combine_chunks()
        pq.write_table(table, path, compression="zstd", use_dictionary=["source"])  # as above
    return [Path(path).name for _, path in parts]


def _read_rows(stage_file: str, rows: list[int]) -> pa.Table:
    """The given rows (ascending) of a staged shard, reading only the row groups that hold them:
    a part's memory does not grow with the shard size."""
    f = pq.ParquetFile(stage_file)
    starts = np.cumsum([0] + [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)])
    at = np.asarray(rows)
    group = np.searchsorted(starts, at, side="right") - 1
    groups = np.unique(group)
    sizes = starts[groups + 1] - starts[groups]
    offset = np.cumsum(sizes) - sizes  # where each group read begins in the table read back
    local = offset[np.searchsorted(groups, group)] + at - starts[group]
    return f.read_row_groups(groups.tolist(), use_threads=False).take(local)


def _docs_read(result: ShardResult) -> int:
    return sum(st.docs_in for st in result.stats.values())


@contextlib.contextmanager
def ingest_started(
    cfg: DataConfig,
    s3: S3Settings | None = None,
    map_fn: MapFn = serial_map,
    out_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> Iterator[Callable[[], IngestSummary]]:
    """The stage begun: planned (bad input fails here, before any work) and the shards handed to
    ``map_fn``'s workers, which clean them into a staging folder while the caller goes on (the
    flow opens its MLflow run meanwhile). What it yields waits for them, then runs
    :func:`finalize`. The staging folder is removed on leaving, whatever happens; a killed run's
    by the next run."""
    shards = plan_shards(cfg, s3)
    sizes = [sum(item.size for item in s) for s in shards]
    log(f"{sum(map(len, shards))} input item(s) in {len(shards)} shard(s)")
    out = Path(out_dir or cfg.out_dir)
    with scratch_dir(out.with_name(f"{out.name}-staging")) as staging:
        index_dir = None
        if cfg.decontam_benchmarks:  # built once, in a child process; the workers memory-map it
            names, n = tuple(cfg.decontam_benchmarks), cfg.decontam_ngram
            try:
                index_dir = save_benchmark_index(names, n, staging / "decontam-index")
            except RuntimeError as exc:
                raise IngestError(f"{exc}. Check data.decontam_benchmarks.") from exc
        jobs = [
            {
                "items": s,
                "cfg": cfg,
                "s3": s3,
                "stage_file": str(staging / f"shard-{i:05d}.parquet"),
                "index_dir": index_dir,
            }
            for i, s in enumerate(shards)
        ]
        results = start_map(map_fn, process_shard, jobs, "ingest: read+clean", sizes, _docs_read)
        yield lambda: finalize(results(), cfg, str(out), map_fn)


def run_ingest(
    cfg: DataConfig,
    s3: S3Settings | None = None,
    map_fn: MapFn = serial_map,
    out_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> IngestSummary:
    """The whole stage: plan, clean the shards into a staging folder (``map_fn`` runs them, in
    parallel under the flow), then :func:`finalize`."""
    with ingest_started(cfg, s3, map_fn, out_dir, log) as finish:
        return finish()


def finalize(
    results: list[ShardResult],
    cfg: DataConfig,
    out_dir: str | None = None,
    map_fn: MapFn = serial_map,
) -> IngestSummary:
    """Global dedup in shard order on the documents' metadata and signatures, then the output
    parts cut from the staged shards, card, quarantine and metrics, written atomically."""
    t0 = time.perf_counter()
    meta = np.concatenate([m for res in results for m in res.meta] or [np.zeros(0, META)])
    where = [(res.stage_file, i) for res in results for i in range(sum(len(m) for m in res.meta))]
    blocks = [s for res in results for s in res.signatures]
    for res in results:  # the one copy left is ``sigs``, freed after dedup
        res.signatures = []
    sigs = np.concatenate(blocks) if blocks else np.zeros((0, cfg.minhash_perm), np.uint32)
    del blocks
    stats = {i: SourceStats() for i in range(len(cfg.sources))}
    for res in results:
        for i, st in res.stats.items():
            stats[i].merge(st)
    quarantine = [q for res in results for q in res.quarantine]
    contamination = [c for res in results for c in res.contamination]

    shas = meta["sha256"].tolist()
    dd = deduplicate(shas, sigs, cfg.minhash_threshold, cfg.minhash_perm, map_fn, cfg.workers)
    del shas
    source = meta["source"].tolist()
    dup = {i: Counter() for i in stats}
    for i in dd.exact_of:
        dup[source[i]]["exact"] += 1
    for i in dd.near_of:
        dup[source[i]]["near"] += 1
    keep = np.array(dd.keep, dtype=bool)
    kept = meta[keep]  # the surviving documents' sources and sizes, for the card
    sizes = meta["n_bytes"].tolist()
    kept_at = [(*where[i], sizes[i]) for i in np.flatnonzero(keep).tolist()]
    # The signatures and dedup's working set are done with: hand the heap back before the parts
    # are written, when the workers are busy again (at 405 MB: 371 MB then, not 406).
    del sigs, where
    release_memory()
    t_dedup = time.perf_counter() - t0

    if not len(kept):
        dropped = sum((st.filtered for st in stats.values()), Counter())
        raise IngestError(
            "no usable document left after cleaning: "
            f"{sum(st.docs_in for st in stats.values())} read, {len(quarantine)} quarantined, "
            f"filtered {dict(dropped)}, {len(contamination)} contaminated, {dd.n_exact + dd.n_near} duplicates. "
            "Check data.sources, or relax the filters (e.g. data.min_chars) in params.yaml."
        )

    card = build_card(cfg, stats, dup, kept, dd.n_exact, dd.n_near, contamination, len(quarantine))
    out = Path(out_dir or cfg.out_dir)
    with atomic_dir(out) as tmp:
        parts, sizes = plan_parts(kept_at, cfg.part_max_bytes)
        paths = [str(tmp / f"part-{i:05d}.parquet") for i in range(len(parts))]
        per = -(-len(parts) // (2 * cfg.workers))  # about two tasks per worker
        groups = range(0, len(parts), per)
        jobs = [
            {"parts": list(zip(parts[i : i + per], paths[i : i + per], strict=True))}
            for i in groups
        ]
        names = map_fn(
            write_parts, jobs, "ingest: write parts", [sum(sizes[i : i + per]) for i in groups]
        )
        card["parts"] = [name for group in names for name in group]
        (tmp / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        with open(tmp / "quarantine.jsonl", "w") as f:
            for q in quarantine:
                f.write(json.dumps(q, sort_keys=True) + "\n")
    totals = card["totals"]
    metrics = {k: totals[k] for k in sorted(totals)}
    write_metrics(cfg.metrics_file, headline("ingest", metrics))

    seconds = dict.fromkeys(STEPS, 0.0)
    for res in results:
        for k, v in res.seconds.items():
            seconds[k] += v
    seconds["dedup"] = t_dedup
    seconds["write"] = time.perf_counter() - t0 - t_dedup
    return IngestSummary(card=card, metrics=metrics, seconds=seconds, out_dir=str(out))
