"""A pool worker killed in the middle of a data stage (as the OOM killer would): the stage fails
with a last line that says what happened and what to do, the previous output is untouched and no
staging folder is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO, make_corpus, pool_workers, prose
from tests.flows.test_flows import write_params

pytestmark = pytest.mark.integration


def test_a_killed_ingest_worker_fails_the_stage_and_keeps_the_last_output(
    prefect_server, mlflow_sqlite, tmp_path, figure
):
    from flows.cli import WORKER_DIED

    small, big, out = tmp_path / "small", tmp_path / "big", tmp_path / "clean"
    make_corpus(small)
    big.mkdir()
    for i in range(400):  # 24 MB of distinct documents: seconds of cleaning on two workers
        (big / f"doc{i:03d}.txt").write_text(prose(i, lines=600))
    write_params(tmp_path, str(small))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["data"].update(out_dir=str(out), metrics_file=str(tmp_path / "m.json"), workers=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "flows", "ingest", "--params", str(tmp_path / "params.yaml")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    params["data"]["sources"] = [{"uri": str(big), "name": "big", "license": "CC0-1.0"}]
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(params))
    log = tmp_path / "big.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [*cmd[:-1], str(tmp_path / "big.yaml")], cwd=REPO, stdout=sink, stderr=sink
        )
    deadline, victim = time.monotonic() + 120, None
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        workers = sorted(pool_workers(proc.pid))
        staged = list(tmp_path.glob(".clean-staging.*/shard-*.parquet"))  # cleaning under way
        if len(workers) == 2 and staged:
            victim = workers[0]
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.05)
    proc.wait(300)
    err = log.read_text()
    assert victim is not None, "the run ended before a worker could be killed"
    assert proc.returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == f"error: {WORKER_DIED}"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the last output, whole
    assert staged and not [p for p in tmp_path.iterdir() if p.name.startswith(".clean")]
    figure("killed ingest worker: exit status, output kept, staging left", "1, yes, 0")
