"""The ``train`` section: the trainer's run (batch, schedule, optimiser, cadence, parallelism,
launch). The train stage runs it as written; the finetune stage runs it with the values
``finetune.run`` replaces (``tasks/finetune/config.py``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from model.config import ModelConfig
from tasks.common.config import Section, follows
from tasks.tokenize.config import TokenizeConfig

Preset = Literal[tuple(ModelConfig.PRESETS)]  # type: ignore[valid-type]


class TrainConfig(Section):
    """The train stage: token shards -> a Llama-style model, checkpoints and a Hugging Face export.
    Fine-tuning runs under the same settings, with the values ``finetune.run`` replaces."""

    SECTION = "train"

    tokens_dir: str = follows(TokenizeConfig, "tokens_dir", "packed token shards to train on")
    tokenizer_dir: str = follows(
        TokenizeConfig, "tokenizer_dir", "the tokenizer, exported with the model"
    )
    ckpt_dir: str = Field(
        default="models/ckpt", description="checkpoints (DCP), the last keep_last kept"
    )
    export_dir: str = Field(default="models/hf", description="the Hugging Face export")
    log_file: str = Field(
        default="models/train_log.jsonl", description="the step log, one JSON record per log step"
    )
    metrics_file: str = Field(
        default="metrics/train.json", description="headline numbers for `dvc metrics show`"
    )
    summary_file: str = Field(
        default="models/train_summary.json",
        description="every figure of the run, device included (the model card reads it)",
    )
    plot_file: str = Field(
        default="plots/train_loss.csv",
        description="train and validation loss per logged step (`dvc plots show`)",
    )
    preset: Preset = Field(
        default="tiny", description="the model's shape; the five keys below override it"
    )
    n_layer: int | None = Field(default=None, ge=1, description="transformer blocks")
    n_head: int | None = Field(default=None, ge=1, description="attention heads")
    n_kv_head: int | None = Field(
        default=None, ge=1, description="key/value heads (grouped-query attention)"
    )
    d_model: int | None = Field(default=None, ge=8, description="hidden size")
    tie_embeddings: bool | None = Field(
        default=None, description="share the input embedding with the output layer"
    )
    seq_len: int = Field(
        default=1024,
        ge=8,
        description="the context length: of the model, the exported tokenizer and the "
        "generation config",
    )
    micro_batch: int = Field(
        default=8, ge=1, description="sequences of seq_len per process per micro-step"
    )
    global_batch_tokens: int = Field(
        default=8192,
        ge=8,
        description="tokens per optimizer step: gradients accumulate over micro-steps to it",
    )
    max_steps: int = Field(default=60, ge=1, description="optimizer steps")
    lr: float = Field(default=3e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(
        default=0.1, ge=0, le=1, description="the schedule ends at lr * min_lr_ratio"
    )
    warmup_steps: int = Field(default=6, ge=0, description="linear warmup from 0 to lr")
    schedule: Literal["cosine", "wsd"] = Field(
        default="cosine", description="cosine, or warmup-stable-decay (wsd)"
    )
    decay_frac: float = Field(
        default=0.2, gt=0, le=1, description="wsd: the share of steps in the final decay"
    )
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay")
    weight_decay_params: Literal["matrices", "all"] = Field(
        default="matrices",
        description="matrices: decay linear and embedding weights, not the norm gains "
        "(nanoGPT, OLMo-core); all: every parameter",
    )
    beta1: float = Field(default=0.9, gt=0, lt=1, description="AdamW beta1")
    beta2: float = Field(default=0.95, gt=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(default=1.0, gt=0, description="gradient norm clipping")
    log_every: int = Field(default=5, ge=1, description="steps between step-log records")
    eval_every: int = Field(default=20, ge=1, description="steps between validation passes")
    eval_batches: int = Field(default=4, ge=1, description="micro-batches per validation pass")
    ckpt_every: int = Field(default=20, ge=1, description="steps between checkpoints")
    keep_last: int = Field(default=2, ge=1, description="checkpoints kept")
    parallel: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="data parallelism: DDP, or FSDP2 (fully_shard)"
    )
    compile: bool | Literal["auto"] = Field(
        default="auto",
        description="torch.compile per block; auto: on GPUs, off on CPUs, where it pays for "
        "itself only after about 200 steps of the demo's shape (bench/train_throughput.py: 45 s "
        "to compile, 8% faster)",
    )
    activation_checkpointing: bool = Field(
        default=False, description="recompute each block's activations in the backward pass"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="auto: bf16 on GPUs, fp32 on CPUs"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: a GPU when present"
    )
    nproc_per_node: int = Field(default=1, ge=1, description="torchrun processes per node")
    nnodes: int = Field(default=1, ge=1, description="nodes")
    rdzv_endpoint: str | None = Field(
        default=None,
        description="host:port of the c10d rendezvous for multi-node runs; null: --standalone",
    )
    max_restarts: int = Field(
        default=0, ge=0, description="torchrun's elastic restarts of the worker group"
    )
    threads: int = Field(
        default=0, ge=0, description="torch CPU threads per process; 0: torch's default"
    )
    seed: int = Field(default=1234, description="initialisation and data order")
    export_check_tol: float = Field(
        default=1e-4,
        gt=0,
        description="largest |logit difference| allowed between the export in transformers and "
        "the trained model",
    )
    debug_nan_at_step: int | None = Field(
        default=None, description="fault injection for tests: the loss becomes NaN at this step"
    )
    debug_kill_in_checkpoint: int | None = Field(
        default=None,
        description="fault injection for tests: rank 0 SIGKILLs itself while writing this "
        "step's checkpoint (after the tensors, before the manifest that makes it complete)",
    )
    init_from: str | None = Field(
        default=None,
        description="start from this Hugging Face export (its shape and weights) instead of a "
        "fresh preset model: set by the finetune stage; null for pretraining",
    )

    # Fields that change how a run is carried out or reported, not what it computes: a checkpoint
    # written under other values of these is still resumed.
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset(
        {
            "tokens_dir", "tokenizer_dir", "ckpt_dir", "export_dir", "log_file", "metrics_file",
            "summary_file", "plot_file", "log_every", "eval_every", "eval_batches", "ckpt_every",
            "keep_last", "compile", "activation_checkpointing", "device", "nproc_per_node",
            "nnodes", "rdzv_endpoint", "max_restarts", "threads", "export_check_tol",
            "debug_nan_at_step", "debug_kill_in_checkpoint",
        }
    )  # fmt: skip

    def trajectory(self) -> dict:
        """The params that decide the run's weights, step by step (checkpointed, compared on
        resume)."""
        return {k: v for k, v in self.model_dump().items() if k not in self.OPERATIONAL}

    def model_shape(self, vocab_size: int) -> ModelConfig:
        """The model's shape from the preset and the overrides above; ValueError names the key."""
        return ModelConfig.preset(
            self.preset,
            vocab_size=vocab_size,
            max_seq_len=self.seq_len,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_kv_head=self.n_kv_head,
            d_model=self.d_model,
            tie_embeddings=self.tie_embeddings,
        )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        # The shape and the batch arithmetic fail here, before any flow, run or process starts
        # (the vocabulary, known only once the tokenizer exists, plays no part in them).
        try:
            m = self.model_shape(vocab_size=1)
        except ValueError as exc:
            keys = "train.n_head / train.n_kv_head / train.d_model (or train.preset)"
            raise ValueError(f"{keys}: {exc}") from None
        per_step = self.micro_batch * self.seq_len * self.nproc_per_node * self.nnodes
        if self.global_batch_tokens % per_step:
            raise ValueError(
                f"train.global_batch_tokens {self.global_batch_tokens} is not a multiple of "
                f"train.micro_batch * train.seq_len * processes = {self.micro_batch} * "
                f"{self.seq_len} * {self.nproc_per_node * self.nnodes} = {per_step}"
            )
        if m.head_dim % 2:
            raise ValueError(
                f"train.d_model / train.n_head = {m.head_dim}: rotary embeddings need an even "
                "head size"
            )
        return self
