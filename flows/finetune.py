"""Finetune flow: conversations -> data/sft -> the base model (models/hf) fine-tuned into a chat
model (models/chat), launched with torchrun through the train stage's trainer
(``python -m flows finetune [--params P] [finetune.run.max_steps=50 ...]``)."""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.cli import main
from tasks.common import tracking
from tasks.common.env import apply_offline_defaults
from tasks.common.runners import as_task
from tasks.common.summary import markdown_table
from tasks.finetune.conversations import prepare_conversations
from tasks.params import load_params
from tasks.train.launch import launch_and_log


@flow(name="finetune", log_prints=True)
def finetune(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> dict:
    apply_offline_defaults()  # a deployment run starts here, not in flows.cli
    params = load_params(params_file, overrides or [])
    cfg, log = params.finetune.train_config(params.train), get_run_logger()
    with tracking.stage_run("finetune", params, "finetune", parent_run_id) as run:
        data = as_task("prepare-conversations", lambda: prepare_conversations(params, log.info))
        import mlflow

        mlflow.log_dict(data.as_dict(), "conversations.json")
        metrics = launch_and_log(cfg, params_file, overrides or [], "finetune", log.info, as_task)
        metrics = {**metrics, "train_conversations": data.kept["train"]}
        mlflow.log_metric("summary/train_conversations", data.kept["train"])
        url = tracking.run_url(run, params.infra)
        create_markdown_artifact(
            key="finetune-summary",
            markdown=markdown_table(metrics, "Fine-tuning")
            + f"\nChat model: `{cfg.export_dir}`  \nMLflow run: {url}\n",
        )
    return metrics


if __name__ == "__main__":  # the same as python -m flows finetune
    sys.exit(main(["finetune", *sys.argv[1:]]))
