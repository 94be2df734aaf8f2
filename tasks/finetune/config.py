"""The ``finetune`` section: conversations -> ``data/sft`` -> the base model fine-tuned into a chat
model. The run itself is the train stage's (``tasks/train/config.py``): parallelism, device,
precision, optimiser and the rest come from ``train``, except the values ``finetune.run``
replaces."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

from pydantic import Field, TypeAdapter, ValidationError, field_validator

from tasks.common.config import ConfigError, Section, follows, format_errors, merged
from tasks.ingest.config import DataConfig, SourceConfig
from tasks.train.config import TrainConfig


class ChatSourceConfig(SourceConfig):
    """Conversations for fine-tuning (an item of ``finetune.sources``)."""

    uri: str = Field(
        default="corpus",
        description="corpus: derive conversations from the cleaned corpus (a function's "
        "signature and docstring -> its body, no download); any other uri is read like an ingest "
        "source (local, s3://, hf://), JSONL/JSON/Parquet records whose text_field holds a "
        "`messages` list of {role, content} turns",
    )
    text_field: str = Field(default="messages", description="field holding the messages list")


# The run's values that fine-tuning replaces; every other one is train's.
FINETUNE_RUN = {
    "seq_len": 512,  # one conversation per row: longer ones are quarantined
    "micro_batch": 8,  # the batch geometry is fine-tuning's own, whatever train's
    "global_batch_tokens": 8192,
    "max_steps": 30,
    "lr": 1e-3,
    "warmup_steps": 3,
    "schedule": "cosine",
    "eval_every": 10,
    "eval_batches": 2,
    "ckpt_every": 10,
}


class FinetuneConfig(Section):
    """The finetune stage: conversations -> data/sft -> the base model fine-tuned into a chat
    model (models/chat), through the train stage's trainer and launcher."""

    SECTION = "finetune"

    sources: list[ChatSourceConfig] = Field(
        default_factory=lambda: [
            ChatSourceConfig(uri="corpus", name="corpus-functions", license="PSF-2.0")
        ],
        min_length=1,
        description="the conversations' sources",
    )
    corpus_dir: str = follows(
        DataConfig, "out_dir", "the cleaned corpus `corpus` conversations are derived from"
    )
    base_model_dir: str = follows(TrainConfig, "export_dir", "the base model fine-tuned")
    sft_dir: str = Field(
        default="data/sft",
        description="rendered conversations: ids and loss masks, one per row, with index.json "
        "and quarantine.jsonl",
    )
    ckpt_dir: str = Field(default="models/chat_ckpt", description="the run's checkpoints")
    export_dir: str = Field(
        default="models/chat",
        description="the chat model: a Hugging Face folder whose tokenizer carries the chat "
        "template",
    )
    log_file: str = Field(default="models/chat_log.jsonl", description="the run's step log")
    metrics_file: str = Field(
        default="metrics/finetune.json", description="headline numbers for `dvc metrics show`"
    )
    summary_file: str = Field(
        default="models/chat_summary.json", description="every figure of the run"
    )
    plot_file: str = Field(
        default="plots/finetune_loss.csv", description="train and validation loss per step"
    )
    max_conversations: int | None = Field(
        default=3000,
        ge=1,
        description="corpus-derived conversations kept, a sample by hash; null: all",
    )
    max_answer_chars: int = Field(
        default=1200, ge=1, description="corpus-derived: functions at most this long"
    )
    val_fraction: float = Field(
        default=0.05, gt=0, lt=1, description="conversations held out, by hash"
    )
    run: dict[str, Any] = merged(
        FINETUNE_RUN,
        "train.<key> values replaced for fine-tuning (any train key but the paths, which are "
        "the keys above); e.g. {max_steps: 50, lr: 5e-4}.",
    )

    # Set by the stage itself, not through finetune.run.
    RESERVED: ClassVar[frozenset[str]] = frozenset(
        {"tokens_dir", "tokenizer_dir", "init_from", "ckpt_dir", "export_dir", "log_file",
         "metrics_file", "summary_file", "plot_file"}
    )  # fmt: skip

    @field_validator("run")
    @classmethod
    def _train_keys(cls, run: dict[str, Any]) -> dict[str, Any]:
        """Each key a train setting, each value of its type and within its bounds (checked as
        params load); how they combine with train's is checked by :meth:`train_config`."""
        for key, value in run.items():
            if key not in TrainConfig.model_fields:
                raise ValueError(f"finetune.run.{key}: not a train setting")
            if key in cls.RESERVED:
                raise ValueError(
                    f"finetune.run.{key}: set by the stage (finetune's own paths are finetune.* "
                    "keys)"
                )
            info = TrainConfig.model_fields[key]
            typ = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            try:
                TypeAdapter(typ, config=TrainConfig.model_config).validate_python(value)
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"].lower()
                raise ValueError(f"finetune.run.{key}: {msg} (got {value!r})") from None
        return run

    def train_config(self, train: TrainConfig) -> TrainConfig:
        """The trainer's config for this stage: ``train``'s, with ``run``'s values, this stage's
        paths, the conversations as data and the base model as the starting point."""
        paths = {k: getattr(self, k) for k in self.RESERVED if k in type(self).model_fields}
        merged_run = {
            **train.model_dump(),
            **self.run,
            **paths,
            "tokens_dir": self.sft_dir,
            "init_from": self.base_model_dir,
        }
        try:
            return TrainConfig.model_validate(merged_run)
        except ValidationError as exc:
            text = format_errors(
                exc,
                "fine-tuning's run (train's settings with finetune.run's)",
                lambda key: f"finetune.run.{key}" if key in self.run else f"train.{key}",
            )
            for key in self.run:  # a cross-field check names the keys as train.<key>
                text = re.sub(rf"\btrain\.{key}\b", f"finetune.run.{key}", text)
            raise ConfigError(text) from None
