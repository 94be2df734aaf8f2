"""Tokenize flow: data/clean -> data/tokenizer + data/tokens (``python -m flows tokenize``)."""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.cli import main
from tasks.common import tracking
from tasks.common.env import apply_offline_defaults
from tasks.common.runners import task_map, task_runner
from tasks.common.summary import mixture_table
from tasks.params import load_params
from tasks.tokenize.stage import run_tokenize


@flow(name="tokenize", log_prints=True)
def tokenize(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> dict:
    apply_offline_defaults()  # a deployment run starts here, not in flows.cli
    params = load_params(params_file, overrides or [])
    cfg, log = params.tokenize, get_run_logger()
    runner = task_runner(params.infra, cfg.workers)  # started first, as in ingest
    with runner, tracking.stage_run("tokenize", params, "tokenize", parent_run_id) as run:
        summary = run_tokenize(cfg, task_map(runner, log.info), log.info)
        tracking.log_stage_outputs(summary.metrics, summary.seconds, {"index.json": summary.index})
        tracking.log_tags(
            {
                "tokenize.encoder": summary.index["encoder"],
                "tokenize.encoder_reason": summary.encoder_reason,
            }
        )
        url = tracking.run_url(run, params.infra)
        rows = [{"stat": k, "value": v} for k, v in summary.metrics.items()]
        rows += [{"stat": f"seconds.{k}", "value": round(v, 2)} for k, v in summary.seconds.items()]
        rows += [
            {"stat": "encoder", "value": f"{summary.index['encoder']}: {summary.encoder_reason}"},
            {"stat": "mlflow_run", "value": url},
        ]
        create_table_artifact(
            key="tokenize-stats", table=rows, description="Tokenizer and token-shard statistics"
        )
        if summary.index.get("mixture"):
            create_markdown_artifact(
                key="tokenize-mixture",
                markdown="\n".join(mixture_table(summary.index["mixture"])),
                description="Training mixture: target and realised token shares per source",
            )
        m = summary.metrics
        log.info(
            "tokenize: %d train / %d val tokens, %.2f bytes/token, vocab usage %.1f%%; MLflow: %s",
            m["train_tokens"],
            m["val_tokens"],
            m["bytes_per_token"],
            100 * m["vocab_usage"],
            url,
        )
    return summary.metrics


if __name__ == "__main__":  # the same as python -m flows tokenize
    sys.exit(main(["tokenize", *sys.argv[1:]]))
