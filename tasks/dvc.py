"""The few DVC calls the pipeline flow makes (through DVC's own CLI, in this interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

from tasks.env import REPO_ROOT


def _dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def available() -> bool:
    return (REPO_ROOT / ".dvc").is_dir() and (REPO_ROOT / "dvc.yaml").is_file()


def up_to_date(stage: str) -> bool:
    """True when DVC would not rerun ``stage`` (its deps, params and outs match dvc.lock)."""
    out = _dvc("status", stage, "--json")
    if out.returncode != 0:
        return False
    try:
        return not json.loads(out.stdout or "{}")
    except json.JSONDecodeError:
        return False


def commit(stage: str) -> None:
    out = _dvc("commit", "--force", stage)
    if out.returncode != 0:
        raise RuntimeError(f"dvc commit {stage} failed: {out.stderr.strip() or out.stdout.strip()}")
