"""The whole pipeline as one Prefect flow, under one MLflow parent run.

Stages that DVC reports up to date are skipped; after each stage that ran, ``dvc commit`` records
its outputs, so this entry point and ``dvc repro`` leave the same ``dvc.lock`` and a clean
``dvc status``. With overrides the outputs no longer match ``params.yaml``, so nothing is recorded.
"""

from __future__ import annotations

import sys
import time

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.cli import main
from flows.evaluate import evaluate
from flows.finetune import finetune
from flows.ingest import ingest
from flows.release import release
from flows.tokenize import tokenize
from flows.train import train
from tasks.common import dvc, tracking
from tasks.common.env import apply_offline_defaults
from tasks.common.summary import key_figure, pipeline_summary
from tasks.params import load_params

STAGES = {
    "ingest": ingest,
    "tokenize": tokenize,
    "train": train,
    "finetune": finetune,
    "evaluate": evaluate,
    "release": release,
}


@flow(name="pipeline", log_prints=True)
def pipeline(
    params_file: str = "params.yaml", overrides: list[str] | None = None, force: bool = False
) -> dict:
    apply_offline_defaults()  # a deployment run starts here, not in flows.cli
    log = get_run_logger()
    params = load_params(params_file, overrides or [])
    record = not overrides and params_file == "params.yaml" and dvc.available()
    results, statuses, rows = {}, {}, []
    with tracking.pipeline_run(params) as run:
        for name, stage_flow in STAGES.items():
            t0 = time.monotonic()
            if record and not force and dvc.up_to_date(name):
                log.info("%s: up to date in dvc.lock, skipped", name)
                results[name], statuses[name] = "skipped", "skipped"
            else:
                if record:
                    dvc.clear_outs(name)
                results[name] = stage_flow(
                    params_file=params_file,
                    overrides=overrides or [],
                    parent_run_id=run.info.run_id,
                )
                statuses[name] = "ran"
                if record:
                    dvc.commit(name)
            rows.append(
                {
                    "stage": name,
                    "status": statuses[name],
                    "seconds": time.monotonic() - t0,
                    "figure": key_figure(name, results[name]),
                }
            )
        tracking.record_stages(statuses)
        where = {
            "MLflow": tracking.run_url(run, params.infra),
            "evaluation": f"{params.evaluate.out_dir}/comparison.md",
            "data card": f"{params.data.out_dir}/card.json",
        }
        if flow_run.ui_url and str(flow_run.ui_url).startswith("http"):
            where = {"Prefect": str(flow_run.ui_url), **where}
        log.info("pipeline done\n%s", pipeline_summary(rows, where))
    return results


if __name__ == "__main__":  # the same as python -m flows pipeline
    sys.exit(main(["pipeline", *sys.argv[1:]]))
