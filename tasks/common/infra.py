"""The ``infra`` section: where the services are. Environment variables, where set, win over these
(``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL``, ``PREFECT_API_URL``); secrets never live here."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.common.config import Section


class InfraConfig(Section):
    """Services: MLflow, S3, where the data stages' tasks run. Secrets never live here."""

    SECTION = "infra"

    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; null: the SQLite file mlflow.db in the repo "
        "(MLFLOW_TRACKING_URI wins)",
    )
    mlflow_experiment: str = Field(default="llmforge", description="the MLflow experiment")
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, moto, ...); null: AWS_ENDPOINT_URL or AWS "
        "itself",
    )
    s3_region: str = Field(default="us-east-1", description="S3 region")
    s3_max_attempts: int = Field(
        default=4, ge=1, description="boto3 standard-mode attempts, the first included"
    )
    s3_connect_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="S3 connect timeout: with these defaults an endpoint that accepts connections "
        "and never answers fails in under 30 s",
    )
    s3_read_timeout_s: float = Field(default=5.0, gt=0, description="S3 read timeout")
    task_runner: Literal["process", "dask"] = Field(
        default="process",
        description="where ingest's and tokenize's per-shard tasks run: a local process pool, or "
        "Dask (the same tasks; a remote cluster's workers need this repo's environment and the "
        "data paths)",
    )
    dask_address: str | None = Field(
        default=None,
        description="a running Dask scheduler (tcp://host:8786); null: a local Dask cluster on "
        "127.0.0.1",
    )
