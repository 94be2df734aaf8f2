"""The train stage's plumbing around torchrun: build the command, stream its output, and log the
run's step metrics, loss curve and summary to MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tasks.config import TrainConfig


class TrainError(RuntimeError):
    pass


def torchrun_command(cfg: TrainConfig, params_file: str, overrides: list[str]) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={cfg.nproc_per_node}",
        f"--nnodes={cfg.nnodes}",
        f"--max-restarts={cfg.max_restarts}",
    ]
    if cfg.rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}", "--rdzv-id=llmforge"]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", "model.train", "--params", params_file, *overrides]


def run_torchrun(cmd: list[str], log: Callable[[str], None], cwd: str | None = None) -> None:
    """Run torchrun, streaming every line to ``log``; fail with the last error line."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=cwd
    )
    errors: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if (
            not line
            or "UserWarning" in line
            or line.startswith("  return func(")
            or set(line) == {"*"}
        ):
            continue
        if line.startswith("error:") or "Error" in line:
            errors.append(line)
        log(line)
    if proc.wait() != 0:
        msg = next(
            (e for e in reversed(errors) if e.startswith("error:")), errors[-1] if errors else ""
        )
        raise TrainError(f"training failed (exit {proc.returncode}): {msg.removeprefix('error: ')}")


def loss_curve_png(records: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_mlflow(cfg: TrainConfig, tmp_dir: Path) -> dict:
    import mlflow

    from model.train import read_log

    records = read_log(cfg.log_file)
    for r in records:
        mlflow.log_metrics(
            {k: float(v) for k, v in r.items() if k not in ("step",)}, step=int(r["step"])
        )
    metrics = json.loads(Path(cfg.metrics_file).read_text())
    mlflow.log_metrics(
        {
            f"final.{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and v is not None
        }
    )
    mlflow.log_dict(metrics, "train.json")
    if records:
        png = tmp_dir / "train_loss.png"
        loss_curve_png(records, png)
        mlflow.log_artifact(str(png))
    return metrics
