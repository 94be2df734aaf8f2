"""Evaluate flow: models/hf -> reports/eval (``python -m flows evaluate``)."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.cli import main
from tasks.common import tracking
from tasks.common.env import apply_offline_defaults
from tasks.common.records import DataCard
from tasks.common.runners import as_task
from tasks.evaluate.report import artifact_table, numeric_metrics, progress_rows, write_report
from tasks.evaluate.stage import run_evaluate
from tasks.params import load_params


# log_prints off, explicitly: a subflow inherits the pipeline's True, and then the dis() output
# that dill captures from stdout (datasets fingerprints lm-eval's tasks) would fill the run log.
@flow(name="evaluate", log_prints=False)
def evaluate(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> dict:
    apply_offline_defaults()  # a deployment run starts here, not in flows.cli
    params = load_params(params_file, overrides or [])
    cfg, log = params.evaluate, get_run_logger()
    with tracking.stage_run("evaluate", params, "evaluate", parent_run_id) as run:
        results = run_evaluate(cfg, log.info, step=as_task)  # a task run per benchmark
        rows = write_report(results, cfg.out_dir, DataCard.find(cfg.data_dir))
        out = Path(cfg.out_dir)
        import mlflow

        mlflow.log_metrics(numeric_metrics(results))
        table = artifact_table(rows)
        mlflow.log_table({k: [row[k] for row in table] for k in table[0]}, "comparison_table.json")
        for name in ("comparison.md", "comparison.png", "results.json"):
            mlflow.log_artifact(str(out / name))
        url = tracking.run_url(run, params.infra)
        progress = "; ".join(
            f"{p['measure']} {p['score']:.3f}"
            for p in progress_rows(results)
            if p["status"] == "ran"
        )
        create_table_artifact(
            key="eval-vs-gpt4",
            table=table,
            description=f"Ours vs GPT-4, scores in % with 95% intervals (gate "
            f"{'passed' if results['gate']['passed'] else 'FAILED'}). Progress measures: "
            f"{progress}. MLflow: {url}",
        )
        log.info(
            "evaluate: gate %s in %.0f s; report %s/comparison.md; MLflow: %s",
            "passed" if results["gate"]["passed"] else "FAILED",
            results["timings"]["total"],
            cfg.out_dir,
            url,
        )
    return {
        "gate": results["gate"],
        "benchmarks": {k: v.get("score", v["status"]) for k, v in results["benchmarks"].items()},
    }


if __name__ == "__main__":  # the same as python -m flows evaluate
    sys.exit(main(["evaluate", *sys.argv[1:]]))
