"""Offline-by-default process environment.

Called before Prefect, MLflow, DVC or Hugging Face libraries are imported (``flows/__init__.py``
and the test suite do this), so nothing phones home and no step waits on the internet. Every
value is a default: a variable the user already set wins, which is how a user opts back in
(``HF_HUB_OFFLINE=0`` to download from the Hub, ``PREFECT_API_URL`` to use a team server).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DVC_NO_ANALYTICS": "1",
    "GIT_PYTHON_REFRESH": "quiet",
    # Prefect's ephemeral server takes longer than its 20 s default to start on 2 busy cores.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # Keep Prefect's local state inside the repo, not in the user's home.
    "PREFECT_HOME": str(REPO_ROOT / ".prefect"),
    "PREFECT_LOGGING_LEVEL": "INFO",
}


def apply_offline_defaults() -> None:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
