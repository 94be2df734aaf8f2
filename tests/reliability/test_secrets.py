"""Secrets never stored: a credential given as a param is refused before Prefect, MLflow or torchrun
start; log lines reaching the Prefect server and params reaching MLflow are masked by value; and
harmless keys that merely contain "token" stay readable."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from prefect import flow, get_run_logger

from tasks.common import tracking
from tasks.common.redaction import redact_text
from tasks.ingest.config import DataConfig
from tasks.ingest.scrub import scrub
from tasks.params import Params
from tests.conftest import run_flow
from tests.flows.test_flows import api

pytestmark = pytest.mark.integration

CANARY = "canaryPW7f3a9c51be02"
ENV_CANARY = "canary-env-secret-0d9e4b7a"


def test_secrets_as_params_are_refused_before_anything_starts(tmp_path, prefect_server, figure):
    before = len(api(prefect_server, "/flow_runs/filter"))
    overrides = [
        f"infra.s3_endpoint_url=http://admin:{CANARY}@127.0.0.1:9000",
        f"release.hub_token=hf_{CANARY}abcdefghijklmnopqrstu",
        f"data.sources.0.uri=s3://bucket/x?X-Amz-Signature={CANARY}",
    ]
    leaks = 0
    for o in overrides:
        t = time.monotonic()
        out = run_flow(
            "flows",
            "train",
            o,
            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
        )
        assert out.returncode == 2 and "secret" in out.stderr, out.stderr[-1500:]
        assert time.monotonic() - t < 30
        leaks += (out.stdout + out.stderr).count(CANARY)
    assert not (tmp_path / "m.db").exists()  # no MLflow run was even opened
    stored = len(api(prefect_server, "/flow_runs/filter"))
    figure("secret overrides refused before any run", f"{len(overrides)}/{len(overrides)}")
    assert leaks == 0 and stored == before


@flow(name="secret-probe")
def secret_probe(params: Params, url: str) -> str:
    log = get_run_logger()
    with tracking.stage_run("probe", params, "tokenize") as run:
        log.info("connecting to %s with key %s", url, ENV_CANARY)
        log.info(f"inline {url} and {ENV_CANARY}")
        return run.info.run_id


def test_logs_and_mlflow_hold_no_secret(prefect_server, mlflow_sqlite, monkeypatch, figure):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_CANARY)
    url = f"https://user:{CANARY}@minio.internal:9000/bucket"
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        run_id = secret_probe(Params(), url)
    time.sleep(3)  # Prefect ships logs in batches
    # the newest logs: the session's server holds every earlier test's too
    logs = api(prefect_server, "/logs/filter", {"limit": 200, "sort": "TIMESTAMP_DESC"})
    text = "\n".join(entry["message"] for entry in logs)
    assert "connecting to https://<USER>:<PASSWORD>@minio.internal:9000/bucket" in text
    db = Path(mlflow_sqlite.removeprefix("sqlite:///")).read_bytes()
    hits = text.count(CANARY) + text.count(ENV_CANARY) + db.count(CANARY.encode())
    hits += db.count(ENV_CANARY.encode())
    figure("canary occurrences (Prefect logs, MLflow database)", hits)
    assert hits == 0

    import mlflow

    shown = mlflow.get_run(run_id).data.params
    # Keys that contain "token" but hold no secret stay visible.
    assert shown["tokenize.eos_token"] == "<|eos|>" and shown["tokenize.vocab_size"] == "8192"
    assert shown["tokenize.tokens_dir"] == "data/tokens"
    assert "***" not in shown.values()


def test_uppercase_and_value_shaped_secrets():
    cfg = DataConfig()
    code = "AWS_SECRET_ACCESS_KEY = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'\n"
    clean, counts = scrub(code, cfg)
    assert "wJalrXUtnFEMI" not in clean and counts["aws_secret_key"] == 1
    for secret in (
        "postgres://app:s3cr3t@db:5432/x",
        "hf_" + "a" * 34,
        "sk-" + "b" * 40,
        "ghp_" + "c" * 36,
        "AKIA" + "D" * 16,
    ):
        assert redact_text(f"value {secret} end") != f"value {secret} end", secret
    assert redact_text("eos_token <|eos|> and 8192 tokens") == "eos_token <|eos|> and 8192 tokens"
