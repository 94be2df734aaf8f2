"""MLflow tracking: one experiment, a parent run per pipeline execution, a child run per stage.

Without a server the tracking URI is a SQLite file in the repo (``mlflow.db``, artifacts in
``mlartifacts/``); ``MLFLOW_TRACKING_URI`` (or ``infra.mlflow_tracking_uri``) points it at a server.
Params are flattened and redacted before logging: nothing that looks like a secret is ever sent.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tasks.common.config import to_flat_dict
from tasks.common.env import REPO_ROOT
from tasks.common.infra import InfraConfig
from tasks.common.redaction import install_log_redaction, redact_flat

if TYPE_CHECKING:
    from tasks.params import Params

# The MLflow UI opens an experiment in its GenAI view (traces, token costs) unless it is marked
# as model development: this is a training pipeline.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri(infra: InfraConfig) -> str:
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or infra.mlflow_tracking_uri
        or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
    )


def redact(flat: dict[str, Any]) -> dict[str, Any]:
    """Secret keys (exact names) and credential-shaped values masked; harmless keys stay visible."""
    return redact_flat(flat)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _setup(infra: InfraConfig):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(infra))
    exp = mlflow.get_experiment_by_name(infra.mlflow_experiment)
    if exp is None:
        location = None
        if tracking_uri(infra).startswith("sqlite:"):
            location = (REPO_ROOT / "mlartifacts").as_uri()
        exp_id = mlflow.create_experiment(
            infra.mlflow_experiment, artifact_location=location, tags=EXPERIMENT_KIND
        )
    else:
        exp_id = exp.experiment_id
        if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
            for k, v in EXPERIMENT_KIND.items():  # an experiment made before this tag existed
                mlflow.MlflowClient().set_experiment_tag(exp_id, k, v)
    mlflow.set_experiment(experiment_id=exp_id)
    return mlflow


@contextlib.contextmanager
def pipeline_run(params: Params) -> Iterator[Any]:
    """The parent run: the pipeline passes its id to each stage flow (``parent_run_id``), whose
    run nests under it."""
    install_log_redaction()
    mlflow = _setup(params.infra)
    with mlflow.start_run(
        run_name="pipeline",
        tags={"llmforge.kind": "pipeline", "git_commit": git_commit(), **prefect_tags()},
    ) as run:
        mlflow.log_params(redact(to_flat_dict(params.infra, "infra.")))
        yield run


@contextlib.contextmanager
def stage_run(stage: str, params: Params, section: str, parent: str | None = None) -> Iterator[Any]:
    """A run for one stage, logged with its own params section (and infra), nested under the
    pipeline's run ``parent`` when one is given. Log lines of the stage pass through the secret
    redaction from here on."""
    install_log_redaction()
    mlflow = _setup(params.infra)
    tags = {
        "llmforge.kind": "stage",
        "llmforge.stage": stage,
        "llmforge.status": "ran",
        "git_commit": git_commit(),
        **prefect_tags(),
    }
    with mlflow.start_run(
        run_name=stage, parent_run_id=parent, nested=bool(parent), tags=tags
    ) as run:
        flat = to_flat_dict(getattr(params, section), f"{section}.")
        flat.update(to_flat_dict(params.infra, "infra."))
        # MLflow caps a param value at 6000 characters.
        mlflow.log_params({k: str(v)[:6000] for k, v in redact(flat).items()})
        yield run


def prefect_tags() -> dict[str, str]:
    """The Prefect flow run this MLflow run belongs to (its id and UI address), when there is one."""
    try:
        from prefect.runtime import flow_run

        run_id, url = flow_run.id, flow_run.ui_url
    except Exception:  # outside a flow, or a Prefect without these fields
        return {}
    tags = {"prefect.flow_run_id": str(run_id)} if run_id else {}
    if url and str(url).startswith("http"):  # "None/..." without a UI (an ephemeral server)
        tags["prefect.flow_run_url"] = str(url)
    return tags


def record_stages(statuses: dict[str, str]) -> None:
    """On the pipeline's parent run: which stages ran and which DVC found up to date (skipped),
    as tags (``llmforge.stage.<name>``) and a ``stages.json`` artifact."""
    import mlflow

    mlflow.set_tags({f"llmforge.stage.{k}": v for k, v in statuses.items()})
    ran = [k for k, v in statuses.items() if v == "ran"]
    mlflow.set_tag(
        "mlflow.note.content",
        f"Stages run: {', '.join(ran) or 'none (every stage up to date in dvc.lock)'}; "
        f"skipped (up to date): {', '.join(k for k, v in statuses.items() if v == 'skipped') or 'none'}.",
    )
    mlflow.log_dict(statuses, "stages.json")


def run_url(run: Any, infra: InfraConfig) -> str:
    uri = tracking_uri(infra)
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def log_stage_outputs(
    metrics: dict[str, float], seconds: dict[str, float], json_artifacts: dict[str, Any]
) -> None:
    """Metrics, step timings (``time.<step>_s``) and JSON artifacts of the active stage run."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    mlflow.log_metrics({f"time.{k}_s": float(v) for k, v in seconds.items()})
    for name, obj in json_artifacts.items():
        mlflow.log_dict(obj, name)


def log_tags(tags: dict[str, str]) -> None:
    import mlflow

    mlflow.set_tags(tags)
