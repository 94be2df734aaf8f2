"""The ingest stage's logic as plain functions, on a corpus with known exact answers."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.common.runners import serial_map
from tasks.ingest import stage as ingest_mod
from tasks.ingest.config import DataConfig, SourceConfig
from tasks.ingest.sources import SourceError
from tasks.ingest.stage import (
    SCHEMA,
    IngestError,
    ingest_started,
    plan_shards,
    process_shard,
    run_ingest,
)
from tests.conftest import REPO, make_corpus


def run(cfg, out):
    return run_ingest(cfg, out_dir=str(out), log=lambda m: None)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    return root, make_corpus(root)


def cfg_for(root, tmp_path, **kw):
    return DataConfig(
        sources=[SourceConfig(uri=str(root), name="fixture", license="CC0-1.0")],
        metrics_file=str(tmp_path / "metrics.json"),
        **{"min_chars": 50, **kw},
    )


def test_known_corpus_exact_counts(corpus, tmp_path):
    root, expect = corpus
    out = tmp_path / "clean"
    summary = run(cfg_for(root, tmp_path), out)
    card = json.loads((out / "card.json").read_text())
    t = card["totals"]
    assert t["docs_out"] == expect["docs_out"]
    assert t["quarantined"] == expect["quarantined"]
    assert t["exact_duplicates"] == expect["exact"] and t["near_duplicates"] == expect["near"]
    assert card["filters"]["too_short"] == expect["too_short"]
    assert t["contaminated"] == expect["contaminated"]
    assert card["decontamination"]["hits"][0]["uri"].endswith("leak.py")
    assert card["pii_replaced"] == {"email": 1}
    assert card["licenses"] == {"fixture": "CC0-1.0"}
    assert summary.metrics == t

    reasons = [
        json.loads(line)["reason"] for line in (out / "quarantine.jsonl").read_text().splitlines()
    ]
    joined = "\n".join(reasons)
    for expected in (
        "empty",
        "binary",
        "undecodable",
        "unsupported file type",
        "wrong schema",
        "invalid JSON line",
        "no column 'text'",
    ):
        assert expected in joined, expected

    table = pq.read_table(out / "part-00000.parquet")
    assert table.schema.equals(SCHEMA)
    rows = table.to_pylist()
    assert len(rows) == expect["docs_out"] and len({r["id"] for r in rows}) == len(rows)
    assert any(r["uri"].endswith("records.jsonl#L1") for r in rows)
    assert any("<EMAIL>" in r["text"] for r in rows)
    import hashlib

    for r in rows:
        assert r["sha256"] == hashlib.sha256(r["text"].encode()).hexdigest()
        assert r["n_bytes"] == len(r["text"].encode())


def test_output_independent_of_sharding(corpus, tmp_path, monkeypatch):
    """Parts are cut from the staged shards: one shard per input or one for all, the same bytes;
    with small parts, most of them take their rows from several staged shards."""
    root, _ = corpus
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run(cfg_for(root, tmp_path, shard_docs=1, part_max_bytes=1500), a)
    run(cfg_for(root, tmp_path, shard_docs=100, part_max_bytes=1500), c)
    names = sorted(p.name for p in a.iterdir())
    assert len([n for n in names if n.startswith("part-")]) > 3
    assert names == sorted(p.name for p in c.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (c / name).read_bytes(), name
    by_bytes = cfg_for(root, tmp_path, shard_bytes=2000, part_max_bytes=1500)
    shards = plan_shards(by_bytes)
    assert len(shards) > 3 and all(sum(i.size for i in s) <= 2000 or len(s) == 1 for s in shards)
    run(by_bytes, c)  # shards closed by size: the same bytes again
    for name in names:
        assert (a / name).read_bytes() == (c / name).read_bytes(), name
    # Staged in row groups of one document each: the parts read only the row groups they need,
    # and get the same bytes.
    monkeypatch.setattr(ingest_mod, "STAGE_FLUSH_BYTES", 1)
    run(cfg_for(root, tmp_path, shard_docs=100, part_max_bytes=1500), c)
    for name in names:
        assert (a / name).read_bytes() == (c / name).read_bytes(), name
    monkeypatch.undo()
    run(cfg_for(root, tmp_path, shard_docs=100, part_max_bytes=10**9), b)
    ta = [r for p in sorted(a.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    tb = [r for p in sorted(b.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert ta == tb
    assert (
        json.loads((a / "card.json").read_text())["totals"]
        == json.loads((b / "card.json").read_text())["totals"]
    )


def test_staged_rows_read_by_row_group(corpus, tmp_path, monkeypatch):
    """A shard stages its documents in row groups as it goes (its memory does not grow with its
    size); a part reads back only the row groups that hold its rows."""
    root, _ = corpus
    monkeypatch.setattr(ingest_mod, "STAGE_FLUSH_BYTES", 1)
    cfg = cfg_for(root, tmp_path)
    path = str(tmp_path / "shard.parquet")
    res = process_shard([i for s in plan_shards(cfg) for i in s], cfg, path)
    meta = np.concatenate(res.meta)
    n = len(meta)
    assert pq.ParquetFile(path).num_row_groups >= n > 3
    full = pq.read_table(path)
    assert [bytes.fromhex(h) for h in full.column("sha256").to_pylist()] == meta["sha256"].tolist()
    assert full.column("n_bytes").to_pylist() == meta["n_bytes"].tolist()
    for rows in ([0], [1, 2], [0, n - 1], list(range(0, n, 2)), list(range(n))):
        assert ingest_mod._read_rows(path, rows).equals(full.take(rows)), rows


def test_shards_four_per_worker(corpus, tmp_path, monkeypatch):
    """Shards shrink below data.shard_bytes where the corpus would give a worker fewer than four
    (but not below 1 MB, so a small corpus stays one task)."""
    root, _ = corpus
    assert len(plan_shards(cfg_for(root, tmp_path, workers=2))) == 1
    monkeypatch.setattr(ingest_mod, "MIN_SHARD_BYTES", 1)
    shards = plan_shards(cfg_for(root, tmp_path, workers=2))
    total = sum(i.size for s in shards for i in s)
    # eight slots of total/8 bytes; an item goes to the slot its middle byte is in, so a shard
    # passes its slot by at most one item, and an item larger than a slot may leave one empty
    assert 7 <= len(shards) <= 8
    sizes = [[i.size for i in s] for s in shards]
    assert all(sum(s) <= -(-total // 8) + max(s) for s in sizes), sizes


def test_shard_count_is_a_multiple_of_the_workers(tmp_path):
    """As many shards per worker, of about one size, so that no worker cleans the last one alone.
    40 inputs of 1 MB under data.shard_bytes=3 MB made 13 shards of 3 MB and one of 1 MB for any
    number of workers (of three workers, two had five shards); now 14, 15 and 16 shards of 2-3 MB
    for 2, 3 and 4 workers, in input order."""
    root = tmp_path / "in"
    root.mkdir()
    for i in range(40):
        (root / f"f{i:02d}.py").write_text((f"# {i:02d}".ljust(99) + "\n") * 10_000)  # 1 MB
    for workers, count in ((2, 14), (3, 15), (4, 16)):
        shards = plan_shards(cfg_for(root, tmp_path, workers=workers, shard_bytes=3_000_000))
        sizes = [sum(i.size for i in s) for s in shards]
        assert len(shards) == count and len(shards) % workers == 0, (workers, sizes)
        assert max(sizes) <= 3_000_000 and max(sizes) - min(sizes) <= 1_000_000, sizes
        assert [i.uri for s in shards for i in s] == sorted(str(p) for p in root.iterdir())


def test_rerun_gives_identical_bytes(corpus, tmp_path):
    root, _ = corpus
    run(cfg_for(root, tmp_path), tmp_path / "x")
    run(cfg_for(root, tmp_path), tmp_path / "y")
    for name in ("part-00000.parquet", "card.json", "quarantine.jsonl"):
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()


def test_nothing_usable_fails_and_keeps_previous_output(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "clean"
    run(cfg_for(root, tmp_path), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(IngestError, match="no usable document.*min_chars"):
        run(cfg_for(root, tmp_path, min_chars=100_000, max_chars=200_000), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".clean.")]  # no temp dirs left


def test_staged_shards_are_removed_on_success_and_on_failure(corpus, tmp_path):
    root, _ = corpus
    cfg = cfg_for(root, tmp_path, shard_docs=2)
    staged: list[str] = []

    def spy(fn, jobs, *progress):
        staged.extend(j["stage_file"] for j in jobs if "stage_file" in j)
        return serial_map(fn, jobs)

    run_ingest(cfg, out_dir=str(tmp_path / "ok" / "clean"), map_fn=spy, log=lambda m: None)
    assert len(staged) > 3 and not any(os.path.exists(f) for f in staged)
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["clean"]

    def dies_after_two(fn, jobs, *progress):  # a worker lost mid-stage
        serial_map(fn, jobs[:2])
        assert all(os.path.exists(j["stage_file"]) for j in jobs[:2])
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        run_ingest(cfg, out_dir=str(tmp_path / "bad" / "clean"), map_fn=dies_after_two)
    assert list((tmp_path / "bad").iterdir()) == []  # no output, no staging left behind


def test_ingest_hands_the_shards_out_before_it_yields(corpus, tmp_path):
    """The flow opens its MLflow run inside ``ingest_started``: by then the shards are with the
    workers (started), and only the finish waits for them. Same output as ``run_ingest``."""
    root, _ = corpus
    cfg = cfg_for(root, tmp_path, shard_docs=2)
    events: list[str] = []

    def pool(fn, jobs, *progress):
        return serial_map(fn, jobs)

    def start(fn, jobs, *progress):
        events.append(f"start {fn.__name__}")
        return lambda: serial_map(fn, jobs)

    pool.start = start
    with ingest_started(
        cfg, map_fn=pool, out_dir=str(tmp_path / "a"), log=lambda m: None
    ) as finish:
        events.append("yielded")
        summary = finish()
    assert events == ["start process_shard", "yielded"]
    assert summary.card == run(cfg, tmp_path / "b").card


def fake_code(rng, n_bytes: int) -> str:
    """Code-like text that passes the quality filters and shares no 5-gram run with other files."""
    lines, size = [], 0
    while size < n_bytes:
        a, b, c = (f"{rng.choice('abcdefghij')}{rng.getrandbits(40):x}" for _ in range(3))
        line = (
            f"    {a} = compute_{b}({c}, limit={rng.randint(0, 999)})  # step {rng.getrandbits(20)}"
        )
        lines.append(line)
        size += len(line) + 1
    return "def main():\n" + "\n".join(lines) + "\n"


def peak_rss_mb(root, out) -> float:
    """Peak resident memory of an ingest of ``root`` (serial: one process is the whole tree)."""
    script = (
        "import resource, sys\n"
        "from tasks.ingest.config import DataConfig, SourceConfig\n"
        "from tasks.ingest.stage import run_ingest\n"
        f"cfg = DataConfig(sources=[SourceConfig(uri={str(root)!r}, name='gen', license='CC0-1.0')],"
        f" metrics_file={str(out)!r} + '.json', shard_docs=50)\n"
        f"s = run_ingest(cfg, out_dir={str(out)!r}, log=lambda m: None)\n"
        "print(s.metrics['docs_out'], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    docs, kb = out.stdout.split()[-2:]
    return int(docs), int(kb) / 1024


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """Ten times the corpus, about the same peak: no process holds the corpus's text."""
    import random

    rng = random.Random(7)
    for name, files in (("small", 60), ("large", 600)):
        for i in range(files):
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / f"m{i:04d}.py").write_text(fake_code(rng, 50_000))
    small_docs, small = peak_rss_mb(tmp_path / "small", tmp_path / "out-small")
    large_docs, large = peak_rss_mb(tmp_path / "large", tmp_path / "out-large")
    print(f"peak RSS: {small:.0f} MB for 3 MB, {large:.0f} MB for 30 MB ({large / small:.2f}x)")
    assert (small_docs, large_docs) == (60, 600)
    assert large < 1.3 * small, (small, large)


def test_missing_path_and_empty_glob_are_source_errors(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        plan_shards(cfg_for(tmp_path / "nope", tmp_path))
    with pytest.raises(SourceError, match="glob matches no file"):
        plan_shards(cfg_for(str(tmp_path / "*.none"), tmp_path))


def test_oversized_input_is_quarantined(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "big.txt").write_text("word\n" * 5000)
    (tmp_path / "c" / "ok.txt").write_text(
        "".join(f"a real sentence number {i} with words in it.\n" for i in range(10))
    )
    summary = run(cfg_for(tmp_path / "c", tmp_path, max_file_bytes=10_000), tmp_path / "out")
    q = (tmp_path / "out" / "quarantine.jsonl").read_text()
    assert "oversized" in q and summary.metrics["docs_out"] == 1


def test_hf_local_dataset_streams(tmp_path):
    d = tmp_path / "hfds"
    d.mkdir()
    with open(d / "train.jsonl", "w") as f:
        for i in range(3):
            f.write(
                json.dumps(
                    {
                        "content": "".join(
                            f"document {i} line {j} with enough words to pass.\n" for j in range(8)
                        )
                    }
                )
                + "\n"
            )
    cfg = DataConfig(
        sources=[SourceConfig(uri=f"hf://{d}", text_field="content", license="MIT")],
        metrics_file=str(tmp_path / "m.json"),
        min_chars=50,
        decontam_benchmarks=[],
    )
    summary = run(cfg, tmp_path / "out")
    assert summary.metrics["docs_out"] == 3
    # Hub records come in items that carry their size, so shards close by bytes for them too
    (item,) = plan_shards(cfg)[0]
    assert len(item.records) == 3 and item.size == sum(len(t) for _, t in item.records)


def test_hf_unavailable_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(sources=[SourceConfig(uri="hf://no-such-org/no-such-dataset-xyz")])
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE"):
        plan_shards(cfg)
    assert time.monotonic() - t0 < 60


def test_stdlib_source_is_deterministic_and_large():
    from tasks.ingest.sources import discover

    cfg = DataConfig()
    a, b = discover(cfg), discover(cfg)
    assert [i.uri for i in a] == [i.uri for i in b]
    assert len(a) > 500 and sum(i.size for i in a) > 10_000_000
    assert all(i.uri.startswith("stdlib://") for i in a)
    assert not any("site-packages" in i.uri for i in a)
    assert os.path.exists(a[0].location)


def test_release_memory_hands_freed_heap_back(tmp_path):
    """Each task run ends with release_memory(): memory the task freed but the allocator kept (here
    200 MB of heap blocks below one still in use, which glibc never trims by itself) goes back to
    the OS, so a long-lived worker does not creep up task after task."""
    code = (
        "import numpy as np, psutil\n"
        "from tasks.common.runners import release_memory\n"
        "rss = lambda: psutil.Process().memory_info().rss\n"
        "blocks = [np.ones(100_000, np.uint8) for _ in range(2000)]\n"
        "keep = np.ones(100_000, np.uint8)\n"
        "del blocks\n"
        "before = rss()\n"
        "release_memory()\n"
        "print(before - rss())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 100 * 2**20  # most of the 200 MB (148 MB on one machine)
