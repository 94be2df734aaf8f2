"""Finetune flow: conversations -> data/sft -> the base model (models/hf) fine-tuned into a chat
model (models/chat), launched with torchrun through the train stage's trainer
(``python -m flows.finetune [--params P] [finetune.max_steps=50 ...]``)."""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.cli import run_cli
from tasks import tracking
from tasks.config import load_params
from tasks.finetune import check_inputs, prepare_conversations
from tasks.runners import as_task
from tasks.summary import markdown_table
from tasks.train import launch_and_log


@flow(name="finetune", log_prints=True)
def finetune(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    params = load_params(params_file, overrides or [])
    cfg, log = params.finetune.train_config(params.train), get_run_logger()
    with tracking.stage_run("finetune", params, "finetune") as run:
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


if __name__ == "__main__":
    sys.exit(
        run_cli(
            finetune,
            "Finetune: supervised fine-tuning of the base model into a chat model (torchrun).",
            preflight=check_inputs,
        )
    )
