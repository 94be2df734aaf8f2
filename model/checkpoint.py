"""Checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is written to ``.tmp-step-N`` and renamed to ``step-N`` only when every rank has
finished; it counts only once DCP's ``.metadata``, our ``meta.json`` and ``manifest.json`` exist.
Old ones are pruned to the last k. Per-rank state that is not a tensor of the model (data position,
RNG states, step) goes into ``extra-rank<r>.pt`` and is loaded with ``weights_only=True``.

Integrity: ``manifest.json``, written last, holds the SHA-256 of every other file. A resume checks
it before torch opens anything (DCP reads ``.metadata`` with pickle, so a planted file would run
code): a changed, missing or extra file is refused. Threat model: whoever can write the checkpoint
folder *and* its manifest is trusted, as whoever can write the code is.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tasks.common.storage import atomic_write_text, disk_guard, sha256_file

_STEP = re.compile(r"^step-(\d{8})$")


class CheckpointMismatchError(RuntimeError):
    pass


class CheckpointIntegrityError(CheckpointMismatchError):
    """The checkpoint's files do not match its manifest: refused before anything is unpickled."""


MANIFEST = "manifest.json"


def _files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.name != MANIFEST
    )


def write_manifest(root: Path) -> None:
    files = {name: sha256_file(root / name) for name in _files(root)}
    atomic_write_text(root / MANIFEST, json.dumps({"sha256": files}, indent=2, sort_keys=True))


def verify_manifest(path: Path) -> None:
    """Every file listed with the same hash, nothing else, no links; else CheckpointIntegrityError."""
    hint = (
        "refusing to load it (a checkpoint folder is trusted like code). Move it away to resume "
        "from the previous one, or start fresh"
    )
    try:
        listed = json.loads((path / MANIFEST).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointIntegrityError(f"{path}: unreadable {MANIFEST} ({exc}); {hint}") from None
    present = _files(path)
    for name in present:
        if (path / name).is_symlink():
            raise CheckpointIntegrityError(f"{path}: {name} is a symbolic link; {hint}")
    extra, missing = set(present) - set(listed), set(listed) - set(present)
    if extra or missing:
        raise CheckpointIntegrityError(
            f"{path}: files {'added' if extra else 'missing'} since it was written "
            f"({', '.join(sorted(extra or missing))}); {hint}"
        )
    for name, digest in listed.items():
        if sha256_file(path / name) != digest:
            raise CheckpointIntegrityError(
                f"{path}: {name} changed since it was written (SHA-256 mismatch); {hint}"
            )


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if _STEP.match(p.name)
        and (p / ".metadata").exists()
        and (p / "meta.json").exists()
        and (p / MANIFEST).exists()
    ]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)))


def latest(ckpt_dir: str | Path) -> Path | None:
    ckpts = complete_checkpoints(ckpt_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(
    ckpt_dir: str | Path,
    step: int,
    model,
    optim,
    meta: dict,
    extra: dict,
    keep_last: int,
    debug_kill: bool = False,
) -> Path:
    root = Path(ckpt_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # leftovers of killed runs: never complete
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
    try:
        with disk_guard(root, f"the step-{step} checkpoint"):
            dcp.save(state, checkpoint_id=str(tmp))
            torch.save({**extra, "rng": rng_state()}, tmp / f"extra-rank{_rank()}.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial checkpoint behind
        raise
    _barrier()
    if debug_kill and _rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection (train.debug_kill_in_checkpoint)
    if _rank() == 0:
        with disk_guard(root, f"the step-{step} checkpoint"):
            meta_text = json.dumps({**meta, "step": step}, indent=2, sort_keys=True)
            (tmp / "meta.json").write_text(meta_text)
            write_manifest(tmp)  # last: a checkpoint without it is incomplete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def verify(path: Path) -> None:
    """Rank 0 checks the manifest (reading every file once, not once per rank); all ranks get its
    verdict, so every rank refuses together."""
    error = ""
    if _rank() == 0:
        try:
            verify_manifest(path)
        except CheckpointIntegrityError as exc:
            error = str(exc)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise CheckpointIntegrityError(error)


def not_resumable(path: Path, meta: dict, restarted: bool = False) -> str:
    """Why the checkpoint at ``path`` is not where this run goes on ("" when it is): it ends a
    completed run (a rerun of the stage means its code or inputs changed; but not within one
    launch, ``restarted``: torchrun restarting the group after the last save goes on to the
    export), or another run wrote it (other model, data, processes or train params)."""
    saved = json.loads((path / "meta.json").read_text())
    done = (saved.get("train") or {}).get("max_steps")
    if done is not None and saved.get("step", 0) >= done and not restarted:
        return f"{path.name} ends a completed run"
    what = {
        "model": "model config",
        "data_fingerprint": "dataset (tokens, tokenizer, seq_len or seed)",
        "world_size": "number of processes",
        "train": "train params",
    }
    for key, name in what.items():
        if saved.get(key) != meta.get(key):
            if key not in saved:
                return f"{path.name} was written by an older version (no {name} recorded)"
            if isinstance(meta.get(key), dict) and isinstance(saved.get(key), dict):
                keys = sorted(
                    k
                    for k in meta[key].keys() | saved[key].keys()
                    if meta[key].get(k) != saved[key].get(k)
                )
                return f"{path.name} was written with a different {name} ({', '.join(keys)})"
            return f"{path.name} was written with a different {name}"
    return ""


def discard(ckpt_dir: str | Path) -> None:
    """Remove every checkpoint of an older, different run (rank 0; every rank waits)."""
    root = Path(ckpt_dir)
    if _rank() == 0 and root.is_dir():
        for p in [*root.glob("step-*"), *root.glob(".tmp-step-*")]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()


def load(path: Path, model, optim) -> dict:
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optim, state["optim"])
    try:
        extra = torch.load(path / f"extra-rank{_rank()}.pt", weights_only=True)
    except pickle.UnpicklingError as exc:  # refused by weights_only: not what save() writes
        raise CheckpointIntegrityError(
            f"{path}/extra-rank{_rank()}.pt holds objects that are not plain tensors and numbers "
            f"(refused by weights_only: {str(exc).splitlines()[0]}); move the checkpoint away"
        ) from None
    torch.set_rng_state(extra["rng"]["torch"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    return extra


class Checkpointer:
    """The checkpoint policy of a run: resume from the last complete checkpoint, save every
    ``ckpt_every`` steps, at the last step and on a stop request, and agree on stop requests across
    ranks.

    A SIGTERM (preemption) reaches ranks at different moments; a per-rank flag would let one rank
    enter the collective save while another starts the next step's all-reduce, and both hang.
    So every step ends with a tiny all-reduce (MAX) of the flag on a CPU (gloo) group: every rank
    learns at the same step that some rank was asked to stop, saves that step and exits. On a GPU
    that group keeps the vote off the device stream, so it does not wait for the GPU."""

    def __init__(self, cfg, model, optim, loader, meta: dict, log, group=None):
        self.cfg, self.model, self.optim, self.loader, self.meta, self.log = (
            cfg,
            model,
            optim,
            loader,
            meta,
            log,
        )
        self.group = group
        self.last_saved = 0
        self._requested = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._requested = True

    def resume(self) -> int:
        """Load the last complete checkpoint of this same run; return its step (0: fresh)."""
        last = latest(self.cfg.ckpt_dir)
        if last is None:
            return 0
        verify(last)  # before anything in it is opened
        # The checkpoint folder persists across stage reruns (dvc.yaml), so that a preempted run
        # resumes; a completed run, or one with other settings, is replaced instead.
        # TORCHELASTIC_RESTART_COUNT: how often torchrun has restarted this group (max_restarts).
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        why = not_resumable(last, self.meta, restarted)
        if why:
            self.log(f"not resuming: {why}; starting fresh (its checkpoints are removed)")
            discard(self.cfg.ckpt_dir)
            return 0
        extra = load(last, self.model, self.optim)
        self.loader.load_state_dict(extra["data"])
        self.last_saved = int(extra["step"])
        self.log(
            f"resumed from {last} at step {self.last_saved}, data position {self.loader.position}"
        )
        return self.last_saved

    def stop_requested(self) -> bool:
        """Whether any rank got SIGTERM; the same answer on every rank (a collective: call it
        once per step, on every rank)."""
        if not dist.is_initialized():
            return self._requested
        flag = torch.tensor([int(self._requested)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def should_save(self, step: int, stopping: bool) -> bool:
        return step % self.cfg.ckpt_every == 0 or step == self.cfg.max_steps or stopping

    def save(self, step: int) -> Path:
        path = save(
            self.cfg.ckpt_dir,
            step,
            self.model,
            self.optim,
            self.meta,
            {"step": step, "data": self.loader.state_dict()},
            self.cfg.keep_last,
            debug_kill=self.cfg.debug_kill_in_checkpoint == step,
        )
        self.last_saved = step
        return path
