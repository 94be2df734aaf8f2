"""Train flow: token shards -> models/ckpt + models/hf, launched with torchrun
(``python -m flows.train [--params P] [train.nproc_per_node=2 ...]``)."""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.cli import run_cli
from tasks import tracking
from tasks.config import load_params
from tasks.runners import as_task
from tasks.summary import markdown_table
from tasks.train import check_inputs, launch_and_log


@flow(name="train", log_prints=True)
def train(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    params = load_params(params_file, overrides or [])
    cfg, log = params.train, get_run_logger()
    with tracking.stage_run("train", params, "train") as run:
        metrics = launch_and_log(cfg, params_file, overrides or [], "train", log.info, as_task)
        url = tracking.run_url(run, params.infra)
        create_markdown_artifact(
            key="train-summary",
            markdown=markdown_table(metrics, "Training")
            + f"\nExport: `{cfg.export_dir}`  \nMLflow run: {url}\n",
        )
    return metrics


if __name__ == "__main__":
    sys.exit(
        run_cli(
            train,
            "Train: a Llama-style model with torchrun, checkpointed and exported to Hugging Face format.",
            preflight=lambda params: check_inputs(params.train),
        )
    )
