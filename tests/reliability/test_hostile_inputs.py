"""Hostile and careless inputs to ingest: links out of the source, loops, FIFOs, devices, sockets,
folders named like files, and a gzip bomb. Every one is quarantined with a reason, nothing outside
the source folder enters the corpus, and the bomb costs bounded memory."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pyarrow.parquet as pq

from tasks.ingest.config import DataConfig, SourceConfig
from tasks.ingest.stage import run_ingest
from tests.conftest import REPO, prose

CANARY = "canary-outside-the-source-5d1e"


def ingest(tmp: Path, uri: str, **kw) -> tuple[list[dict], str]:
    cfg = DataConfig(
        sources=[SourceConfig(uri=uri, name="hostile", **kw)],
        out_dir=str(tmp / "out"),
        metrics_file=str(tmp / "m.json"),
        decontam_benchmarks=[],
        min_chars=10,
    )
    run_ingest(cfg, log=lambda m: None)
    rows = [json.loads(x) for x in (tmp / "out" / "quarantine.jsonl").read_text().splitlines()]
    text = "".join(
        t
        for p in sorted((tmp / "out").glob("part-*.parquet"))
        for t in pq.read_table(p)["text"].to_pylist()
    )
    return rows, text


def test_links_and_special_files_are_quarantined(tmp_path, figure):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(f"{CANARY}\n" + prose(3))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "good.txt").write_text(prose(1))
    (src / "inside.txt").symlink_to(src / "good.txt")  # a link inside the root is fine
    hostile = {
        "shadow.txt": lambda p: p.symlink_to("/etc/shadow"),
        "secret.txt": lambda p: p.symlink_to(outside / "secret.txt"),
        "up.txt": lambda p: p.symlink_to(Path("..") / "outside" / "secret.txt"),
        "outdir": lambda p: p.symlink_to(outside),
        "loop.txt": lambda p: p.symlink_to(p),
        "dangling.txt": lambda p: p.symlink_to(src / "missing.txt"),
        "zero.txt": lambda p: p.symlink_to("/dev/zero"),
        "fifo.txt": lambda p: os.mkfifo(p),
        "sock.txt": lambda p: socket.socket(socket.AF_UNIX).bind(str(p)),
        "sub/deep.txt": lambda p: p.symlink_to(outside / "secret.txt"),
    }
    for name, make in hostile.items():
        make(src / name)
    rows, text = ingest(tmp_path, str(src))
    reasons = {Path(r["uri"]).relative_to(src).as_posix(): r["reason"] for r in rows}
    caught = [n for n in hostile if n in reasons]
    figure("inputs quarantined", f"{len(caught)}/{len(hostile)}")
    figure("canary occurrences in the corpus (links out)", text.count(CANARY))
    assert caught == list(hostile), reasons
    assert CANARY not in text and "root:" not in text
    assert "symlink out of the source root" in reasons["shadow.txt"]
    assert reasons["loop.txt"] == "symlink loop"
    assert "FIFO" in reasons["fifo.txt"] and "socket" in reasons["sock.txt"]
    assert text.count(prose(1)) >= 1  # the good file (and its inside link) still went through

    # A folder with a file's name, matched by a glob, is reported too.
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "dir.txt").mkdir()
    (tmp_path / "g" / "ok.txt").write_text(prose(2))
    rows, _ = ingest(tmp_path / "glob", str(tmp_path / "g" / "*.txt"))
    assert [Path(r["uri"]).name for r in rows] == ["dir.txt"] and "folder" in rows[0]["reason"]

    # follow_symlinks is the explicit way to allow links out.
    _, text = ingest(tmp_path / "follow", str(src / "sub"), follow_symlinks=True)
    assert CANARY in text


def _bomb(path: Path, gib: float) -> None:
    """A valid gzip file of ``gib`` GiB of zeros, written in a stream (about 1 MB per GiB)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1 << 20)
    with open(path, "wb") as f:
        for _ in range(int(gib * 1024)):
            f.write(z.compress(block))
        f.write(z.flush())


def test_gzip_bomb_costs_bounded_memory(tmp_path, figure):
    src = tmp_path / "bomb"
    src.mkdir()
    _bomb(src / "bomb.txt.gz", 1.0)
    (src / "fine.txt.gz").write_bytes(gzip.compress(prose(4).encode()))
    compressed = (src / "bomb.txt.gz").stat().st_size
    code = f"""
import resource, sys
from tasks.ingest.config import DataConfig, SourceConfig
from tasks.ingest.sources import discover, read_item
cfg = DataConfig(sources=[SourceConfig(uri={str(src)!r})], max_file_bytes=4_000_000)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = [r for item in discover(cfg) for r in read_item(item, cfg.sources[0], cfg)]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(max(0, peak - base) // 1024, "|".join(getattr(r, "reason", "ok") for r in out))
"""
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    grown_mb, reasons = res.stdout.split(maxsplit=1)
    figure(f"gzip bomb (1 GiB from {compressed // 1024} KB): extra memory MB", grown_mb)
    assert "oversized" in reasons and "ok" in reasons
    assert int(grown_mb) < 64  # inflated whole, it was 1024 MB


class _Zeros:
    def __init__(self, n: int):
        self.left = n

    def read(self, k: int = -1) -> bytes:
        k = self.left if k < 0 else min(k, self.left)
        self.left -= k
        return b"\0" * k


def test_release_archive_bomb_is_refused_before_extracting(tmp_path, figure):
    import tarfile
    import time

    from tasks.release.errors import ReleaseError
    from tasks.release.verify import verify

    bomb = tmp_path / "llmforge-demo-0.1.0.tar.gz"
    size = 1 << 30
    with gzip.open(bomb, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        info = tarfile.TarInfo("llmforge-demo-0.1.0/model.safetensors")
        info.size = size
        tar.addfile(info, _Zeros(size))
    t = time.monotonic()
    before = shutil.disk_usage(tmp_path).used
    try:
        verify(str(bomb), load=False)
        raise AssertionError("accepted")
    except ReleaseError as exc:
        assert "unsafe archive" in str(exc) and "refused before extracting" in str(exc)
    grown = (shutil.disk_usage(tmp_path).used - before) >> 20
    figure(
        f"release bomb ({bomb.stat().st_size >> 20} MB -> 1 GiB): refused after s, MB written",
        f"{time.monotonic() - t:.1f}, {max(grown, 0)}",
    )
    assert grown < 64
