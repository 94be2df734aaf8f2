"""Ingest flow: sources -> data/clean (``python -m flows ingest [--params P] [key=value ...]``)."""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.cli import main
from tasks.common import tracking
from tasks.common.env import apply_offline_defaults
from tasks.common.redaction import install_log_redaction
from tasks.common.runners import describe, task_map, task_runner
from tasks.common.storage import S3Settings
from tasks.ingest.card import card_markdown
from tasks.ingest.stage import ingest_started
from tasks.params import load_params


@flow(name="ingest", log_prints=True)
def ingest(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> dict:
    apply_offline_defaults()  # a deployment run starts here, not in flows.cli
    params = load_params(params_file, overrides or [])
    cfg, log = params.data, get_run_logger()
    install_log_redaction()  # stage_run installs it too, but the planning logs before that
    # The workers start first and get the shards before the MLflow run opens: its start-up (~2
    # CPU-s with a SQLite store) overlaps theirs and the cleaning. Bad input fails in the planning.
    log.info("ingest on %s", describe(params.infra, cfg.workers))
    runner = task_runner(params.infra, cfg.workers)
    s3 = S3Settings.from_infra(params.infra)
    with (
        runner,
        ingest_started(cfg, s3, task_map(runner, log.info), log=log.info) as finish,
        tracking.stage_run("ingest", params, "data", parent_run_id) as run,
    ):
        summary = finish()
        tracking.log_stage_outputs(summary.metrics, summary.seconds, {"card.json": summary.card})
        url = tracking.run_url(run, params.infra)
        create_markdown_artifact(
            key="ingest-data-card",
            markdown=card_markdown(summary.card, url),
            description="Ingest data card",
        )
        t = summary.metrics
        log.info(
            "ingest: %d docs in -> %d out (%.1f MB); card: %s/card.json; MLflow: %s",
            t["docs_in"],
            t["docs_out"],
            t["bytes_out"] / 1e6,
            summary.out_dir,
            url,
        )
    return summary.metrics


if __name__ == "__main__":  # the same as python -m flows ingest
    sys.exit(main(["ingest", *sys.argv[1:]]))
