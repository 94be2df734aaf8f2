"""The training loop. Side concerns live in helpers: the data loader (data.py), checkpoints
(checkpoint.py), metrics and MFU (here, small), export (export.py); the loop itself stays short."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from model import checkpoint
from model.data import TokenLoader
from model.model import Llama
from model.parallelize import parallelize
from tasks.config import TrainConfig
from tasks.summary import eta_text

# Dense bf16 peak FLOP/s of known accelerators (vendor datasheets, no sparsity).
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
}


class NonFiniteLossError(RuntimeError):
    pass


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warmup then cosine (or warmup-stable-decay) to lr * min_lr_ratio; ``step`` counts from 1."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(cfg.warmup_steps, 1)
    lo = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps - int(cfg.decay_frac * cfg.max_steps)
        if step <= decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(cfg.max_steps - decay_start, 1)
        return lo + (cfg.lr - lo) * (1 - frac)
    frac = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * min(frac, 1.0)))


def _cpu_ghz() -> tuple[float, str]:
    """The CPU's highest clock: cpufreq's maximum, else the clock /proc/cpuinfo reports."""
    try:
        return int(
            Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()
        ) / 1e6, "cpufreq max"
    except (OSError, ValueError):
        pass
    try:
        mhz = [
            float(line.split(":")[1])
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("cpu MHz")
        ]
        if mhz:
            return max(mhz) / 1e3, "/proc/cpuinfo"
    except (OSError, ValueError):
        pass
    return 3.0, "assumed 3 GHz"


def cpu_peak(threads: int | None = None) -> tuple[float, str]:
    """Theoretical fp32 peak of the cores torch uses: cores x clock x FLOPs per cycle, with two FMA
    units per core (2 FLOPs each per vector lane). A stable roof that measured throughput cannot
    pass, unlike a matmul timed once at start-up on a shared machine."""
    cores = min(threads or torch.get_num_threads(), os.cpu_count() or 1)
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    lanes, isa = (
        (16, "AVX-512")
        if "avx512f" in flags
        else (8, "AVX2+FMA")
        if {"avx2", "fma"} <= flags
        else (4, "128-bit SIMD")
    )
    ghz, clock = _cpu_ghz()
    peak = cores * ghz * 1e9 * 2 * 2 * lanes
    return (
        peak,
        f"fp32 theoretical: {cores} cores x {ghz:.2f} GHz ({clock}) x {2 * 2 * lanes} FLOP/cycle ({isa})",
    )


def device_peak(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} bf16 datasheet"
        return float("nan"), f"{name} (unknown peak)"
    return cpu_peak()


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def init_distributed(cfg: TrainConfig) -> Dist:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    d.device = torch.device("cuda", d.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(d.device)
    if "MASTER_ADDR" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return d


class StopRequested:
    """SIGTERM sets a flag; the loop saves a checkpoint after the current step and the run ends
    with ``EXIT_STOPPED`` (never as a success)."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True


def all_mean(x: torch.Tensor) -> float | list[float]:
    """The mean over ranks of a scalar (a float) or a vector (a list), in one all-reduce."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.AVG if x.is_cuda else dist.ReduceOp.SUM)
        if not x.is_cuda:
            x /= dist.get_world_size()
    return float(x) if x.dim() == 0 else x.tolist()


@torch.no_grad()
def evaluate(model, loader: TokenLoader, n_batches: int, device, autocast) -> float:
    model.eval()
    loader.position = 0  # the same val batches every time
    losses = []
    for _ in range(n_batches):
        x, y = (t.to(device) for t in loader.next())
        with autocast:
            _, loss = model(x, y)
        losses.append(loss.float())
    model.train()
    return all_mean(torch.stack(losses).mean())


def train(cfg: TrainConfig, log=print) -> dict:
    d = init_distributed(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dtype = (
        torch.bfloat16
        if (cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and d.device.type == "cuda"))
        else torch.float32
    )
    autocast = torch.autocast(d.device.type, dtype=dtype, enabled=dtype != torch.float32)

    index = (
        json.loads((Path(cfg.tokens_dir) / "index.json").read_text())
        if (Path(cfg.tokens_dir) / "index.json").exists()
        else None
    )
    if index is None:
        raise FileNotFoundError(
            f"{cfg.tokens_dir}/index.json not found: run the tokenize stage first (python -m flows.tokenize)"
        )
    mcfg = cfg.model_shape(index["vocab_size"])
    per_step = cfg.micro_batch * cfg.seq_len * d.world
    if cfg.global_batch_tokens % per_step:
        raise ValueError(
            f"train.global_batch_tokens {cfg.global_batch_tokens} is not a multiple of micro_batch*seq_len*processes = {per_step}"
        )
    accum = cfg.global_batch_tokens // per_step

    model = Llama(mcfg).to(d.device)
    n_params, flops_tok = model.num_params(), model.flops_per_token(cfg.seq_len)
    model = parallelize(model, cfg.parallel, d.device, cfg.activation_checkpointing, cfg.compile)
    optim = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
        fused=d.device.type == "cuda",
    )
    train_data = TokenLoader(
        cfg.tokens_dir, "train", cfg.micro_batch, cfg.seq_len, d.rank, d.world, cfg.seed
    )
    val_data = (
        TokenLoader(cfg.tokens_dir, "val", cfg.micro_batch, cfg.seq_len, d.rank, d.world, cfg.seed)
        if index["splits"]["val"]["tokens"] > cfg.seq_len
        else None
    )
    meta = {
        "model": mcfg.to_dict(),
        "data_fingerprint": train_data.fingerprint,
        "world_size": d.world,
        "train": cfg.trajectory(),
    }

    step = 0
    last = checkpoint.latest(cfg.ckpt_dir)
    if last is not None:
        checkpoint.verify(last)  # before anything in it is opened
        # The checkpoint folder persists across stage reruns (dvc.yaml), so that a preempted run
        # resumes; a completed run, or one with other settings, is replaced instead.
        why = checkpoint.not_resumable(last, meta)
        if why:
            log(f"not resuming: {why}; starting fresh (its checkpoints are removed)")
            checkpoint.discard(cfg.ckpt_dir)
            last = None
    if last is not None:
        extra = checkpoint.load(last, model, optim)
        train_data.load_state_dict(extra["data"])
        step = int(extra["step"])
        log(f"resumed from {last} at step {step}, data position {train_data.position}")
    stop = StopRequested()
    peak, peak_src = device_peak(d.device)
    log(
        f"model: {n_params / 1e6:.2f}M params, {flops_tok / 1e6:.1f} MFLOP/token; {d.world} process(es) on {d.device}, "
        f"{dtype}, {cfg.parallel}; grad accumulation {accum}; peak {peak / 1e9:.0f} GFLOP/s ({peak_src})"
    )

    log_path = Path(cfg.log_file)
    if d.rank == 0:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if step == 0:
            log_path.write_text("")
    model.train()
    t_last, tokens_since, val_loss, history = time.perf_counter(), 0, float("nan"), []
    while step < cfg.max_steps:
        step += 1
        lr = lr_at(step, cfg)
        for group in optim.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(accum):
            x, y = (t.to(d.device) for t in train_data.next())
            sync = micro == accum - 1 or not hasattr(model, "no_sync")
            ctx = model.no_sync() if not sync else contextlib.nullcontext()
            with ctx, autocast:
                _, loss = model(x, y)
                if cfg.debug_nan_at_step == step:
                    loss = loss * float("nan")
            (loss / accum).backward()
            loss_sum += loss.detach().float()
        # The stop request rides on the loss all-reduce: every rank learns at the same step that
        # some rank got SIGTERM, so all of them write the same checkpoint and exit together
        # (a per-rank flag let one rank enter the collective save while another started a step).
        requested = torch.tensor(float(stop.requested), device=d.device)
        loss_val, stop_votes = all_mean(torch.stack([loss_sum / accum, requested]))
        stopping = stop_votes > 0
        if not math.isfinite(loss_val):
            raise NonFiniteLossError(
                f"loss is {loss_val} at step {step}; stopped without a checkpoint past step {step - 1}. "
                "Lower train.lr, raise train.warmup_steps, or check the data"
            )
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        optim.step()
        optim.zero_grad(set_to_none=True)
        tokens_since += cfg.global_batch_tokens

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            dt = time.perf_counter() - t_last
            tps = tokens_since / dt
            mfu = tps * flops_tok / (peak * d.world)
            rec = {
                "step": step,
                "loss": loss_val,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tps,
                "mfu": mfu,
                "tokens_seen": step * cfg.global_batch_tokens,
                "data_position": train_data.position,
            }
            if val_data is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                val_loss = evaluate(model, val_data, cfg.eval_batches, d.device, autocast)
                rec["val_loss"] = val_loss
            history.append(rec)
            if d.rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                steps_timed = tokens_since / cfg.global_batch_tokens
                eta = (cfg.max_steps - step) * dt / steps_timed
                log(
                    f"step {step}/{cfg.max_steps} loss {loss_val:.4f} lr {lr:.2e} gnorm {grad_norm:.2f} "
                    f"{tps:,.0f} tok/s MFU {100 * mfu:.1f}%"
                    + (f" val {val_loss:.4f}" if "val_loss" in rec else "")
                    + f" ETA {eta_text(eta)}"
                )
            t_last, tokens_since = time.perf_counter(), 0
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stopping:
            checkpoint.save(
                cfg.ckpt_dir,
                step,
                model,
                optim,
                meta,
                {"step": step, "data": train_data.state_dict()},
                cfg.keep_last,
                debug_kill=cfg.debug_kill_in_checkpoint == step,
            )
            if stopping:
                log(f"SIGTERM: checkpoint written at step {step}; exiting")
                return {"stopped_at": step}
    return {
        "model": model,
        "model_config": mcfg,
        "n_params": n_params,
        "flops_per_token": flops_tok,
        "peak": peak,
        "peak_source": peak_src,
        "dist": d,
        "val_loss": val_loss,
        "history": history,
        "steps": step,
    }
