"""The train stage's launcher: build the torchrun command, stream its output into the flow's log,
turn its end into success, a stop (resumable) or a failure with its reason, and hand the run's
records to MLflow (``tasks.train.results``). The finetune stage launches through it too."""

from __future__ import annotations

import collections
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from model.lifecycle import STOPPED_PREFIX, die_with_parent
from tasks.common.errors import UserError
from tasks.common.redaction import redact_text
from tasks.train.config import TrainConfig
from tasks.train.results import log_to_mlflow


class TrainError(UserError):
    pass


class TrainStopped(TrainError):
    """The run was stopped (SIGTERM, preemption) after a checkpoint; rerunning resumes it."""


def torchrun_command(
    cfg: TrainConfig, params_file: str, overrides: list[str], stage: str = "train"
) -> list[str]:
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
    return [*cmd, "-m", "model.train", "--params", params_file, "--stage", stage, *overrides]


def run_torchrun(cmd: list[str], log: Callable[[str], None], cwd: str | None = None) -> None:
    """Run torchrun, streaming every line (secrets masked) to ``log``; fail with the last error
    line. SIGTERM or SIGINT to this process is passed on to torchrun, which stops the workers at a
    checkpoint; the run then raises :class:`TrainStopped`, never returns as a success."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        cwd=cwd,
        preexec_fn=die_with_parent,  # torchrun stops (SIGTERM) if this flow dies
    )
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        proc.send_signal(signal.SIGTERM)

    old = (
        {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        if threading.current_thread() is threading.main_thread()  # signals reach only that one
        else {}
    )
    tail: collections.deque[str] = collections.deque(maxlen=500)
    stopped = ""
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = redact_text(line.rstrip())
            if (
                not line
                or "UserWarning" in line
                or line.startswith("  return func(")
                or set(line) == {"*"}
            ):
                continue
            if line.startswith(STOPPED_PREFIX):
                stopped = line
            tail.append(line)
            log(line)
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if stopped or (received and code != 0):
        raise TrainStopped(
            f"training was stopped ({stopped.removeprefix(STOPPED_PREFIX).strip() or 'signal'}); "
            "no export or metrics were written. Rerun the stage to resume from the last checkpoint"
        )
    if code != 0:
        restarts = next((int(a.split("=")[1]) for a in cmd if a.startswith("--max-restarts=")), 0)
        raise TrainError(f"training failed (exit {code}): {failure_reason(list(tail), restarts)}")


_GROUP_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
_ROOT_EXIT = re.compile(r"exitcode\s*: (-?\d+) \(pid: \d+\)\s*(?:\((SIG\w+)\))?")


def failure_reason(lines: list[str], max_restarts: int) -> str:
    """Why a torchrun launch failed, from its output: our own ``error:`` line when a worker
    wrote one (bad params, a tampered checkpoint, ...), else the root cause of torchrun's failure
    table (the rank, its signal or exit code, the last exception a rank printed), and how many
    restarts of ``train.max_restarts`` were spent."""
    ours = [line for line in lines if line.startswith("error:")]
    if ours:
        return ours[-1].removeprefix("error: ")
    root = next((i for i, line in enumerate(lines) if line.startswith("Root Cause")), None)
    cause = ""
    if root is not None:
        block = lines[root : root + 8]
        rank = next(
            (b.split(":")[1].split("(")[0].strip() for b in block if "rank " in b and ":" in b), "?"
        )
        code = next((m for b in block if (m := _ROOT_EXIT.search(b))), None)
        if code and code.group(2):
            cause = f"rank {rank} was killed by {code.group(2)}"
        elif code:
            cause = f"rank {rank} exited with status {code.group(1)}"
    exception = next(
        (
            line.split("]: ", 1)[-1]
            for line in reversed(lines)
            if re.match(r"(\[rank\d+\]: )?\w*(Error|Exception)\b: ", line)
            and "ChildFailedError" not in line
        ),
        "",
    )
    if exception and "killed by" not in cause:
        cause = f"{cause}: {exception}" if cause else exception
    cause = cause or "see the log above"
    failures = sum(bool(_GROUP_FAILED.search(line)) for line in lines)
    if max_restarts:
        spent = max(failures - 1, 0)
        cause += (
            f"; the worker group failed after {spent} restart(s) of train.max_restarts="
            f"{max_restarts}" + (" (the restart budget is spent)" if spent >= max_restarts else "")
        )
    return (
        cause + ". Checkpoints written so far are kept: rerun the stage to resume from the last one"
    )


def launch_and_log(
    cfg: TrainConfig,
    params_file: str,
    overrides: list[str],
    stage: str,
    log: Callable[[str], None],
    step: Callable,
) -> dict:
    """What the train and finetune flows share: torchrun with ``model.train --stage <stage>``,
    then the run's step metrics, loss curve and summary to MLflow; ``step(name, fn)`` makes each
    a Prefect task run. Returns the run's summary figures."""
    cmd = torchrun_command(cfg, params_file, overrides, stage)
    log(f"launching: {redact_text(' '.join(cmd))}")
    step("torchrun", lambda: run_torchrun(cmd, log))
    with tempfile.TemporaryDirectory() as tmp:
        return step("log-to-mlflow", lambda: log_to_mlflow(cfg, Path(tmp)))


def check_inputs(cfg: TrainConfig) -> None:
    """Data-dependent checks for ``python -m flows train``, before any flow, run or process
    starts (the model's shape is checked when params load; a pipeline run makes the tokens)."""
    index_path = Path(cfg.tokens_dir) / "index.json"
    if not index_path.exists():
        raise TrainError(
            f"{index_path} not found: run the tokenize stage first (python -m flows tokenize), "
            "or point train.tokens_dir at packed tokens"
        )
    index = json.loads(index_path.read_text())
    train_tokens = index["splits"]["train"]["tokens"]
    if train_tokens < cfg.seq_len + 1:
        raise TrainError(
            f"train.seq_len {cfg.seq_len} is longer than the training split ({train_tokens} "
            f"tokens in {cfg.tokens_dir}); lower train.seq_len or ingest more data"
        )
