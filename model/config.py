"""The model's shape: a small dataclass with named presets, free of torch so that params can be
checked (heads against width) before any process or run starts. The run's settings are the train
stage's section, ``tasks/train/config.py``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # from the tokenizer
    max_seq_len: int  # the context length, from train.seq_len
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    ffn_hidden: int = 0  # 0: 8/3 * d_model rounded up to a multiple of 64 (Llama's SwiGLU sizing)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}"
            )
        if self.ffn_hidden == 0:
            object.__setattr__(self, "ffn_hidden", 64 * math.ceil(8 * self.d_model / 3 / 64))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    # Named presets, from the CPU demo up to ~1B parameters: shapes only (the vocabulary comes from
    # the tokenizer, the context length from train.seq_len).
    PRESETS: ClassVar[dict[str, dict]] = {
        "debug": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64),  # tests: seconds on a CPU
        "tiny": dict(n_layer=4, n_head=4, n_kv_head=2, d_model=256),
        "small": dict(n_layer=6, n_head=6, n_kv_head=2, d_model=384),
        "125m": dict(n_layer=12, n_head=12, n_kv_head=4, d_model=768),
        "350m": dict(n_layer=24, n_head=16, n_kv_head=4, d_model=1024),
        "1b": dict(n_layer=16, n_head=32, n_kv_head=8, d_model=2048, tie_embeddings=False),
    }

    @classmethod
    def preset(cls, name: str, vocab_size: int, max_seq_len: int, **overrides) -> ModelConfig:
        """A preset's shape; ``overrides`` that are not None replace its fields."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown model preset {name!r} (known: {', '.join(cls.PRESETS)})")
        known = {f.name for f in fields(cls)}
        return cls(
            vocab_size=vocab_size,
            max_seq_len=max_seq_len,
            **{
                **cls.PRESETS[name],
                **{k: v for k, v in overrides.items() if k in known and v is not None},
            },
        )

    def to_dict(self) -> dict:
        return asdict(self)
