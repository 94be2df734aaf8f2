"""The few DVC calls the pipeline flow makes (through DVC's own CLI, in this interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

from tasks.common.env import REPO_ROOT


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


def clear_outs(stage: str) -> list[str]:
    """Remove a stale stage's outputs before it runs, as ``dvc repro`` does (unless ``persist``):
    a rerun never resumes from, or mixes with, what an older version of the stage left behind."""
    import shutil

    import yaml

    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"][stage]
    removed = []
    for out in spec.get("outs", []):
        path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
        if (opts or {}).get("persist"):
            continue
        p = REPO_ROOT / path
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(path)
    return removed
