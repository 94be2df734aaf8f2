"""The training loop, torchtitan-shaped: ``Trainer.fit`` reads as the recipe (train a step, maybe
validate, maybe log, maybe checkpoint, stop when asked) and delegates the side concerns to the
objects that own them: the checkpointer (resume, save policy, the collective stop;
checkpoint.py), the validator (below), the metrics logger (JSONL, MFU, ETA; metrics.py) and the
data loader (data.py). Parallelism is applied in parallelize.py; the model knows nothing of it.

Host syncs happen only at log, validation and checkpoint steps: the loss, the gradient norm and
the "first non-finite step" stay on the device in between, so a GPU never waits for the host."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from model.checkpoint import Checkpointer
from model.config import ModelConfig
from model.data import IGNORE, ConversationLoader, TokenLoader, make_loader
from model.metrics import all_mean, device_peak
from model.model import Llama
from model.parallelize import parallelize
from model.steplog import MetricsLogger

if TYPE_CHECKING:
    from tasks.train.config import TrainConfig


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


def param_groups(model: nn.Module, weight_decay: float, which: str) -> list[dict]:
    """AdamW groups: weight decay on matrices only (linear weights and the embedding), none on
    the RMSNorm gains, as nanoGPT, torchtitan and OLMo-core do; ``which="all"`` decays all."""
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) tensors appear once
        if p.requires_grad:
            (decay if which == "all" or p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Accumulate without communication on non-final micro-steps: FSDP2 skips its
    reduce-scatter (``set_requires_gradient_sync``), DDP its all-reduce (``no_sync``)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2's fully_shard
        model.set_requires_gradient_sync(enabled)
        yield
    elif hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
    else:
        yield


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    control: object = None  # a gloo group for host-side votes (None: the default group)


def init_distributed(cfg: TrainConfig) -> Dist:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    d.device = torch.device("cuda", d.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(d.device)
    if "MASTER_ADDR" in os.environ and not dist.is_initialized():
        # torchrun's store (env://) outlives a worker-group restart (--max-restarts), and so do
        # the addresses the previous group's ranks published in it: a restarted rank could read
        # its peer's stale address and fail to connect ("Gloo connectFullMesh failed ...
        # Connection refused"). Each attempt gets its own key prefix.
        store, rank, size = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            store=dist.PrefixStore(f"llmforge/attempt-{attempt}", store),
            rank=rank,
            world_size=size,
        )
        if use_cuda:  # stop votes on CPU tensors, off the GPU stream
            d.control = dist.new_group(backend="gloo")
    return d


class Validator:
    """Validation loss on the same held-out batches every time, at ``eval_every`` and the end."""

    def __init__(self, cfg: TrainConfig, loader: TokenLoader | None, device, autocast):
        self.cfg, self.loader, self.device, self.autocast = cfg, loader, device, autocast

    def should_validate(self, step: int) -> bool:
        return self.loader is not None and (
            step % self.cfg.eval_every == 0 or step == self.cfg.max_steps
        )

    @torch.no_grad()
    def validate(self, model: nn.Module) -> float:
        model.eval()
        self.loader.position = 0
        losses = []
        for _ in range(self.cfg.eval_batches):
            x, y = (t.to(self.device) for t in self.loader.next())
            with self.autocast:
                _, loss = model(x, y)
            losses.append(loss.float())
        model.train()
        return all_mean(torch.stack(losses).mean())


@dataclass
class TrainResult:
    """What ``train()`` hands back: the model (for the export) and the run's figures."""

    steps: int
    stopped: bool  # by SIGTERM, after a checkpoint of step ``steps``
    model: nn.Module
    model_config: ModelConfig
    n_params: int
    flops_per_token: float
    peak: float
    peak_source: str
    world: int
    device: str
    val_loss: float = float("nan")
    chat: bool = False  # trained on conversations (the export gets the chat template)


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg, self.log = cfg, log
        self.d = d = init_distributed(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and d.device.type == "cuda")
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.autocast = torch.autocast(d.device.type, dtype=self.dtype, enabled=bf16)

        loader = lambda split: make_loader(  # noqa: E731
            cfg.tokens_dir, split, cfg.micro_batch, cfg.seq_len, d.rank, d.world, cfg.seed
        )
        self.data = loader("train")
        vocab = self.data.index["vocab_size"]
        state, init = None, {}
        if cfg.init_from:  # fine-tuning: the base model's shape and weights
            from model.export import from_hf
            from tasks.common.storage import sha256_file

            self.mcfg, state = from_hf(cfg.init_from)
            init = {"init_sha256": sha256_file(Path(cfg.init_from) / "model.safetensors")}
            if self.mcfg.vocab_size != vocab:
                raise ValueError(
                    f"{cfg.init_from} has a {self.mcfg.vocab_size}-token vocabulary but "
                    f"{cfg.tokens_dir} was tokenized with {vocab}: prepare the data with the "
                    "base model's tokenizer"
                )
            if cfg.seq_len > self.mcfg.max_seq_len:
                raise ValueError(
                    f"sequences of {cfg.seq_len} tokens are longer than the context of "
                    f"{cfg.init_from} ({self.mcfg.max_seq_len}): lower finetune.run.seq_len"
                )
        else:
            self.mcfg = cfg.model_shape(vocab)
        per_step = cfg.micro_batch * cfg.seq_len * d.world
        if cfg.global_batch_tokens % per_step:
            raise ValueError(
                f"train.global_batch_tokens {cfg.global_batch_tokens} is not a multiple of "
                f"micro_batch*seq_len*processes = {per_step}"
            )
        self.accum = cfg.global_batch_tokens // per_step

        model = Llama(self.mcfg).to(d.device)
        if state is not None:
            model.load_state_dict(state)
        self.n_params, self.flops = model.num_params(), model.flops_per_token(cfg.seq_len)
        self.compiled = cfg.compile is True or (cfg.compile == "auto" and d.device.type == "cuda")
        self.model = parallelize(
            model, cfg.parallel, d.device, cfg.activation_checkpointing, self.compiled
        )
        self.optim = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay, cfg.weight_decay_params),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            fused=d.device.type == "cuda",
        )
        has_val = self.data.index["splits"]["val"]["tokens"] > cfg.seq_len
        self.validator = Validator(cfg, loader("val") if has_val else None, d.device, self.autocast)
        meta = {
            "model": self.mcfg.to_dict(),
            "data_fingerprint": self.data.fingerprint,
            "world_size": d.world,
            "train": {**cfg.trajectory(), **init},
        }
        self.checkpointer = Checkpointer(
            cfg, self.model, self.optim, self.data, meta, log, d.control
        )
        self.peak, self.peak_source = device_peak(d.device)
        self.metrics = MetricsLogger(cfg, self.flops, self.peak, d.world, d.rank, log)
        # The first step whose gradient norm was not finite (0: none yet), kept on the device.
        # The norm is taken after the gradient all-reduce, so every rank sees the same value.
        self.first_bad = torch.zeros((), device=d.device)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.d.device.type == "cuda":  # pinned + non_blocking: no wait for the GPU
            return t.pin_memory().to(self.d.device, non_blocking=True)
        return t

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over ``accum`` micro-batches; loss and grad norm stay on the device.
        Each micro-batch's mean loss is weighted by its share of the step's target tokens (counted
        on the host, before the copy), so masked targets (fine-tuning) weigh like in one big
        batch; with every target counted (pretraining) each share is 1/accum."""
        batches = [self.data.next() for _ in range(self.accum)]
        counts = [int((y != IGNORE).sum()) for _, y in batches]
        total = max(sum(counts), 1)
        loss_sum = torch.zeros((), device=self.d.device)
        for micro, ((x, y), n) in enumerate(zip(batches, counts, strict=True)):
            x, y = self._to_device(x), self._to_device(y)
            with gradient_sync(self.model, micro == self.accum - 1), self.autocast:
                _, loss = self.model(x, y)
                if self.cfg.debug_nan_at_step == step:
                    loss = loss * float("nan")
            (loss * (n / total)).backward()
            loss_sum += loss.detach().float() * (n / total)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        self.first_bad = torch.where(
            (self.first_bad == 0) & ~torch.isfinite(norm), float(step), self.first_bad
        )
        return loss_sum, norm

    def check_finite(self) -> None:
        """Raise if any step so far had a non-finite loss (a host sync: at log and save steps)."""
        bad = int(self.first_bad)
        if bad:
            last = self.checkpointer.last_saved
            raise NonFiniteLossError(
                f"loss is not finite at step {bad}; stopped without a checkpoint past step "
                f"{last}"
                + (" (none was written)" if not last else "")
                + ". Lower train.lr, raise train.warmup_steps, or check the data"
            )

    def fit(self) -> TrainResult:
        cfg, step, val_loss = self.cfg, self.checkpointer.resume(), float("nan")
        stopping = False
        self.log(
            f"model: {self.n_params / 1e6:.2f}M params, {self.flops / 1e6:.1f} MFLOP/token; "
            f"{self.d.world} process(es) on {self.d.device}, {self.dtype}, {cfg.parallel}"
            f"{', compiled' if self.compiled else ''}; grad "
            f"accumulation {self.accum}; peak {self.peak / 1e9:.0f} GFLOP/s ({self.peak_source})"
        )
        self.metrics.start(step)
        self.model.train()
        while step < cfg.max_steps:
            step += 1
            lr = lr_at(step, cfg)
            for group in self.optim.param_groups:
                group["lr"] = lr
            loss, grad_norm = self.train_step(step)
            self.metrics.step_done()
            stopping = self.checkpointer.stop_requested()
            validate = self.validator.should_validate(step)
            if validate or self.metrics.should_log(step):
                self.check_finite()
                values = {"loss": all_mean(loss), "lr": lr, "grad_norm": float(grad_norm)}
                if validate:
                    val_loss = values["val_loss"] = self.validator.validate(self.model)
                self.metrics.record(step, {**values, "data_position": self.data.position})
            if self.checkpointer.should_save(step, stopping):
                self.check_finite()
                self.checkpointer.save(step)
            if stopping:
                self.log(f"SIGTERM: checkpoint written at step {step}; exiting")
                break
        return TrainResult(
            steps=step,
            stopped=stopping,
            model=self.model,
            model_config=self.mcfg,
            n_params=self.n_params,
            flops_per_token=self.flops,
            peak=self.peak,
            peak_source=self.peak_source,
            world=self.d.world,
            device=self.d.device.type,
            val_loss=val_loss,
            chat=isinstance(self.data, ConversationLoader),
        )


def train(cfg: TrainConfig, log=print) -> TrainResult:
    return Trainer(cfg, log).fit()
