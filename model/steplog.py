"""The step log of a training run (``train.log_file``: one JSON record per log step, written by rank
0) and the progress line printed with each record; and its reader, for the export's loss curve and
the flow's MLflow metrics. Torch-free: the flow reads the log without loading torch."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tasks.common.summary import eta_text


class MetricsLogger:
    """The step log (one JSONL record per log step, rank 0) and the progress line. Rates cover
    the steps since the previous log step, so a resume or a validation pass does not skew them."""

    def __init__(self, cfg, flops_per_token: float, peak: float, world: int, rank: int, log):
        self.cfg, self.flops, self.peak, self.world, self.rank, self.log = (
            cfg,
            flops_per_token,
            peak,
            world,
            rank,
            log,
        )
        self.path = Path(cfg.log_file)
        self.t_last, self.steps_since = time.perf_counter(), 0

    def start(self, step: int) -> None:
        """A fresh run (step 0) starts an empty log; a resumed one appends (last record per step
        wins when it is read)."""
        if self.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if step == 0:
                self.path.write_text("")
        self.t_last, self.steps_since = time.perf_counter(), 0

    def should_log(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.cfg.max_steps

    def step_done(self) -> None:
        self.steps_since += 1

    def record(self, step: int, values: dict) -> dict:
        """Write one record: ``values`` (loss, lr, ...) plus the rates since the last record."""
        dt = time.perf_counter() - self.t_last
        tps = self.steps_since * self.cfg.global_batch_tokens / dt
        rec = {
            "step": step,
            **values,
            "tokens_per_s": tps,
            "mfu": tps * self.flops / (self.peak * self.world),
            "tokens_seen": step * self.cfg.global_batch_tokens,
        }
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            eta = (self.cfg.max_steps - step) * dt / max(self.steps_since, 1)
            self.log(
                f"step {step}/{self.cfg.max_steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                f"gnorm {rec['grad_norm']:.2f} {tps:,.0f} tok/s MFU {100 * rec['mfu']:.1f}%"
                + (f" val {rec['val_loss']:.4f}" if "val_loss" in rec else "")
                + f" ETA {eta_text(eta)}"
            )
        self.t_last, self.steps_since = time.perf_counter(), 0
        return rec


def read_log(path: str) -> list[dict]:
    """The training log, last record per step (a resumed run re-logs steps after its checkpoint)."""
    by_step: dict[int, dict] = {}
    p = Path(path)
    if p.exists():
        for line in p.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]
