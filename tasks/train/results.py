"""What a finished run leaves for MLflow: its step metrics (loss curves first), its summary
figures and a PNG of the loss curve, read from the step log and summary the run wrote."""

from __future__ import annotations

import json
from pathlib import Path

from model.steplog import read_log
from tasks.train.config import TrainConfig


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


# Step log field -> MLflow metric. The part before "/" is the chart section in the MLflow UI,
# and sections sort by name: the loss curves (train and validation) come first, then the
# optimizer, then speed; the run's summary numbers (one value each) sit last, under "summary/".
STEP_METRICS = {
    "loss": "loss/train",
    "val_loss": "loss/val",
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",
    "tokens_per_s": "speed/tokens_per_s",
    "mfu": "speed/mfu",
}


def log_to_mlflow(cfg: TrainConfig, tmp_dir: Path) -> dict:
    import mlflow

    records = read_log(cfg.log_file)
    for r in records:
        mlflow.log_metrics(
            {STEP_METRICS[k]: float(v) for k, v in r.items() if k in STEP_METRICS},
            step=int(r["step"]),
        )
    metrics = json.loads(Path(cfg.summary_file).read_text())
    mlflow.log_metrics(
        {
            f"summary/{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    )
    mlflow.log_dict(metrics, "train.json")
    if records:
        png = tmp_dir / "train_loss.png"
        loss_curve_png(records, png)
        mlflow.log_artifact(str(png))
    return metrics
