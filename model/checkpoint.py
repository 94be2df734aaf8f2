"""Checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is written to ``.tmp-step-N`` and renamed to ``step-N`` only when every rank has
finished; it counts only once DCP's ``.metadata`` and our ``meta.json`` exist. Old ones are pruned
to the last k. Per-rank state that is not a tensor of the model (data position, RNG states, step)
goes into ``extra-rank<r>.pt`` and is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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

_STEP = re.compile(r"^step-(\d{8})$")


class CheckpointMismatchError(RuntimeError):
    pass


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
        if _STEP.match(p.name) and (p / ".metadata").exists() and (p / "meta.json").exists()
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
    ckpt_dir: str | Path, step: int, model, optim, meta: dict, extra: dict, keep_last: int
) -> Path:
    root = Path(ckpt_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a killed run
    _barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save({**extra, "rng": rng_state()}, tmp / f"extra-rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def check_meta(path: Path, meta: dict) -> dict:
    saved = json.loads((path / "meta.json").read_text())
    for key in ("model", "data_fingerprint", "world_size"):
        if saved.get(key) != meta.get(key):
            what = {
                "model": "model config",
                "data_fingerprint": "dataset",
                "world_size": "number of processes",
            }[key]
            raise CheckpointMismatchError(
                f"{path} was written with a different {what} ({saved.get(key)!r} vs {meta.get(key)!r}); "
                f"resume with the original settings, or start fresh by moving the checkpoint folder away"
            )
    return saved


def load(path: Path, model, optim) -> dict:
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optim, state["optim"])
    extra = torch.load(path / f"extra-rank{_rank()}.pt", weights_only=True)
    torch.set_rng_state(extra["rng"]["torch"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    return extra
