"""Parallelism, activation checkpointing and compilation, applied to a plain model (torchtitan's split:
the model file knows nothing of them)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def parallelize(
    model: nn.Module,
    mode: str,
    device: torch.device,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    if compile:
        for i, block in enumerate(
            model.layers
        ):  # per block: small graphs, fast compiles, FSDP-friendly
            model.layers[i] = torch.compile(block)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if mode == "fsdp" and dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root holds the (tied) embedding and lm_head
        return model
    if mode == "ddp" and world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model
