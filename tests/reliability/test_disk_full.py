"""A full disk, for real: small tmpfs mounts under the outputs. The error names the path and
says the disk is full, nothing partial is left (no temporary folder, no half checkpoint), and
completed work survives."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from model import checkpoint
from tasks.common.storage import DiskFullError, atomic_dir
from tasks.tokenize.config import TokenizeConfig
from tasks.tokenize.stage import run_tokenize
from tests.conftest import build_tokens
from tests.train.test_stage import params_file, run_train

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size; skipped, with the reason, only where mounting is refused."""
    mounted = []

    def make(name: str, size_kb: int) -> Path:
        d = tmp_path / name
        d.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(d)],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tokens(tmp_path_factory.mktemp("disk-data"))


def leftovers(d: Path) -> list[str]:
    return [p.name for p in d.rglob("*") if ".tmp" in p.name]


def test_stage_output_on_a_full_disk(small_disk, data, tmp_path, figure):
    disk = small_disk("tokens-disk", 256)
    cfg = TokenizeConfig(
        in_dir=str(data / "clean"),
        tokenizer_dir=str(tmp_path / "tokenizer"),
        tokens_dir=str(disk / "tokens"),
        metrics_file=str(tmp_path / "m.json"),
        vocab_size=512,
    )
    with pytest.raises(DiskFullError) as err:
        run_tokenize(cfg, log=lambda m: None)
    msg = str(err.value)
    assert msg.startswith("disk full") and str(disk / "tokens") in msg
    assert leftovers(disk) == [] and not (disk / "tokens").exists()
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()  # the completed step survives
    figure("disk full (tokenize): message names the path, temporaries left", len(leftovers(disk)))


def test_checkpoint_on_a_full_disk(small_disk, data, tmp_path, figure):
    disk = small_disk("ckpt-disk", 2048)
    params = params_file(tmp_path / "run", data, max_steps=4, ckpt_every=2)
    text = params.read_text().replace(str(tmp_path / "run" / "ckpt"), str(disk / "ckpt"))
    params.write_text(text)
    out = run_train(params, check=False)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "disk full" in out.stderr and str(disk / "ckpt") in out.stderr
    assert "Traceback" not in out.stderr
    assert not list((disk / "ckpt").glob(".tmp-step-*"))  # no half checkpoint
    done = checkpoint.complete_checkpoints(disk / "ckpt")
    figure("disk full (checkpoint): complete checkpoints kept, partial left", f"{len(done)}, 0")


def test_killed_run_temporaries_are_cleared(tmp_path):
    """A killed run's `.tokens.<host>-<pid>.*.tmp` is removed by the next run; a live one stays."""
    import os
    import socket

    out = tmp_path / "tokens"
    dead = tmp_path / f".tokens.{socket.gethostname()}-999999999.abc.tmp"
    legacy = tmp_path / ".tokens.k2j3h4.tmp"  # left by an older version, before host-pid names
    live = tmp_path / f".tokens.{socket.gethostname()}-{os.getpid()}.xyz.tmp"
    for d in (dead, legacy, live):
        d.mkdir()
        (d / "part.bin").write_bytes(b"x")
    with atomic_dir(out) as tmp:
        (tmp / "ok").write_text("1")
    assert not dead.exists() and not legacy.exists() and live.exists()
    assert (out / "ok").read_text() == "1"
