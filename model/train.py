"""Training entry point, run by torchrun: ``torchrun --standalone --nproc_per_node=N -m model.train
[--params params.yaml] [--stage train|finetune] [train.max_steps=100 ...]``. ``python -m
flows train`` and ``python -m flows finetune`` build that command; both stages run this trainer
(finetune: FinetuneConfig.train_config, starting from the base model, on conversations).

Exit status (``model.lifecycle``): 0 complete (exported), 2 bad params, 3 a run that cannot go on
(non-finite loss, mismatched or tampered checkpoint, ...), 75 stopped by SIGTERM after writing a
checkpoint: rerun the same command to resume. A stopped run leaves no export and no metrics."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from model import checkpoint
from model.data import DataMismatchError
from model.export import ExportCheckError, export
from model.lifecycle import EXIT_CANNOT_GO_ON, STOPPED_PREFIX, die_with_parent
from model.steplog import read_log
from model.trainer import NonFiniteLossError, TrainResult, train
from tasks.common.config import ConfigError
from tasks.common.env import apply_offline_defaults
from tasks.common.errors import EXIT_STOPPED, EXIT_USER_ERROR
from tasks.common.storage import StorageError, atomic_write_text
from tasks.common.summary import headline, write_metrics
from tasks.params import parse_cli

if TYPE_CHECKING:
    from tasks.train.config import TrainConfig


def clear_stale_outputs(cfg: TrainConfig) -> None:
    """Remove a previous run's export, metrics and plot: until this run completes, nothing may
    look like its result (checkpoints and the step log stay, for the resume)."""
    shutil.rmtree(cfg.export_dir, ignore_errors=True)
    for f in (cfg.metrics_file, cfg.summary_file, cfg.plot_file):
        Path(f).unlink(missing_ok=True)


def write_outputs(cfg: TrainConfig, result: TrainResult, wall: float, diff: float) -> dict:
    records = read_log(cfg.log_file)
    Path(cfg.plot_file).parent.mkdir(parents=True, exist_ok=True)
    with open(cfg.plot_file, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "val_loss"])
        for r in records:
            w.writerow(
                [r["step"], f"{r['loss']:.6f}", f"{r['val_loss']:.6f}" if "val_loss" in r else ""]
            )
    last = records[-1] if records else {}
    timed = [r for r in records if r["step"] > records[0]["step"]] if len(records) > 1 else records
    val = result.val_loss
    metrics = {
        "steps": result.steps,
        "tokens_seen": result.steps * cfg.global_batch_tokens,
        "final_loss": round(last.get("loss", float("nan")), 6),
        "val_loss": round(val, 6) if math.isfinite(val) else None,
        "params": result.n_params,
        "flops_per_token": result.flops_per_token,
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in timed) / max(len(timed), 1), 1),
        "mfu": round(sum(r["mfu"] for r in timed) / max(len(timed), 1), 4),
        "peak_flops": result.peak,
        "peak_source": result.peak_source,
        "processes": result.world,
        "device": result.device,
        "wall_s": round(wall, 1),
        "export_max_logit_diff": diff,
    }
    atomic_write_text(cfg.summary_file, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    write_metrics(cfg.metrics_file, headline("train", metrics))
    return metrics


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()
    torch.set_float32_matmul_precision("high")
    try:
        params, args = parse_cli(
            argv,
            "Train or fine-tune the model (run under torchrun).",
            sections=("train", "finetune"),
            stages=("train", "finetune"),
            prog="python -m model.train",
        )
        cfg = params.train if args.stage == "train" else params.finetune.train_config(params.train)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    t0 = time.perf_counter()
    rank = int(os.environ.get("RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # Killed with its launcher (torchrun SIGKILLed, its node lost): no orphan keeps training
        # and writing checkpoints beside a resumed run.
        die_with_parent(signal.SIGKILL)
        if os.getppid() == 1:  # the launcher died before prctl took effect
            return EXIT_STOPPED
    if rank == 0:
        clear_stale_outputs(cfg)

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    try:
        result = train(cfg, log)
        if result.stopped:
            if rank != 0:
                return EXIT_STOPPED
            print(
                f"{STOPPED_PREFIX} SIGTERM at step {result.steps} of {cfg.max_steps}; "
                f"checkpoint written to {cfg.ckpt_dir}; rerun to resume",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_STOPPED
        state = get_model_state_dict(
            result.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank == 0:
            diff = export(
                state,
                result.model_config,
                cfg.tokenizer_dir,
                cfg.export_dir,
                cfg.export_check_tol,
                chat=result.chat,
            )
            metrics = write_outputs(cfg, result, time.perf_counter() - t0, diff)
            log(
                f"exported {cfg.export_dir} (max |logit diff| vs transformers {diff:.1e}); metrics: {json.dumps(metrics)}"
            )
        if dist.is_initialized():
            dist.barrier()
        return 0
    except (
        NonFiniteLossError,
        checkpoint.CheckpointMismatchError,
        DataMismatchError,
        ExportCheckError,
        FileNotFoundError,
        StorageError,
        ValueError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CANNOT_GO_ON
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
