"""Train flow: token shards -> models/ckpt + models/hf, launched with torchrun
(``python -m flows train [--params P] [train.nproc_per_node=2 ...]``)."""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.cli import main
from tasks.common import tracking
from tasks.common.env import apply_offline_defaults
from tasks.common.runners import as_task
from tasks.common.summary import markdown_table
from tasks.params import load_params
from tasks.train.launch import launch_and_log


@flow(name="train", log_prints=True)
def train(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> dict:
    apply_offline_defaults()  # a deployment run starts here, not in flows.cli
    params = load_params(params_file, overrides or [])
    cfg, log = params.train, get_run_logger()
    with tracking.stage_run("train", params, "train", parent_run_id) as run:
        metrics = launch_and_log(cfg, params_file, overrides or [], "train", log.info, as_task)
        url = tracking.run_url(run, params.infra)
        create_markdown_artifact(
            key="train-summary",
            markdown=markdown_table(metrics, "Training")
            + f"\nExport: `{cfg.export_dir}`  \nMLflow run: {url}\n",
        )
    return metrics


if __name__ == "__main__":  # the same as python -m flows train
    sys.exit(main(["train", *sys.argv[1:]]))
