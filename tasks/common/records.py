"""The records stages hand each other, each with one typed reader: the data card (ingest), the token
index (tokenize), the run summary (train and finetune) and the evaluation results (evaluate).

A stage writes its record as JSON; a downstream stage reads it here instead of looking keys up in a
dict, so a missing or renamed field fails once, at the read, with the file named and what to run.
Readers ignore fields they do not use: a record may carry more than its readers need."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.common.errors import UserError


class RecordError(UserError):
    """A stage's record is missing or unreadable: the message names the file and the stage."""


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


R = TypeVar("R", bound=Record)


def read_record(cls: type[R], path: str | Path, stage: str) -> R:
    path = Path(path)
    if not path.exists():
        raise RecordError(
            f"{path} not found: run the {stage} stage first (python -m flows {stage})"
        )
    try:
        return cls.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise RecordError(
            f"{path} is not a {cls.__name__} this version reads ({str(exc).splitlines()[0]}); "
            f"rerun the {stage} stage"
        ) from None


# ------------------------------------------------------------------- data/clean/card.json


class SourceCard(Record):
    name: str
    uri: str
    license: str
    docs_in: int
    docs_out: int
    quarantined: int
    filtered: dict[str, int]
    exact_duplicates: int
    near_duplicates: int
    contaminated: int


class Decontamination(Record):
    benchmarks: list[str]  # the sets checked (tasks.common.benchmarks' decontam names)
    ngram: int
    hits: list[dict[str, Any]]
    dropped_per_benchmark: dict[str, int] = Field(default_factory=dict)


class DataCard(Record):
    """What ingest made of each source: counts in and out, filters, PII, decontamination."""

    sources: list[SourceCard]
    filters: dict[str, int]
    pii_replaced: dict[str, int]
    decontamination: Decontamination

    @classmethod
    def read(cls, data_dir: str | Path) -> DataCard:
        return read_record(cls, Path(data_dir) / "card.json", "ingest")

    @classmethod
    def find(cls, data_dir: str | Path) -> DataCard | None:
        """The card, or None where ``data_dir`` holds none (a model trained elsewhere)."""
        return cls.read(data_dir) if (Path(data_dir) / "card.json").exists() else None


# ------------------------------------------------------------------- data/tokens/index.json


class Shard(Record):
    path: str
    tokens: int
    docs: int = 0


class Split(Record):
    tokens: int
    docs: int
    bytes: int = 0
    shards: list[Shard]


class TokenIndex(Record):
    """The packed token shards: dtype, vocabulary, splits, and the mixture when one was set."""

    dtype: str
    vocab_size: int
    splits: dict[str, Split]
    mixture: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @classmethod
    def read(cls, tokens_dir: str | Path) -> TokenIndex:
        return read_record(cls, Path(tokens_dir) / "index.json", "tokenize")


# ------------------------------------------------------------ models/*_summary.json


class RunSummary(Record):
    """Every figure of a training run (train or finetune), as model.train writes it."""

    steps: int
    tokens_seen: int
    final_loss: float | None
    val_loss: float | None
    params: int
    processes: int
    device: str
    peak_source: str = ""
    wall_s: float | None = None
    mfu: float | None = None

    @classmethod
    def read(cls, path: str | Path, stage: str = "train") -> RunSummary:
        return read_record(cls, path, stage)


# ------------------------------------------------------------ reports/eval/results.json


class Score(Record):
    """One benchmark's row: ``status`` "ran" with its figures, or "not run: <why>"."""

    status: str
    score: float | None = None
    n: int | None = None
    bits_per_byte: float | None = None  # the held-out loss row

    @property
    def ran(self) -> bool:
        return self.status == "ran"

    def value(self) -> float | str:
        """The score where it ran, else the reason it did not."""
        return self.score if self.ran and self.score is not None else self.status


class Gate(Record):
    passed: bool
    reasons: list[str]


class ComparisonRow(Record):
    key: str
    benchmark: str
    metric: str
    status: str
    ours: float | None = None


class ChatResults(Record):
    model_dir: str
    benchmarks: dict[str, Score]


class EvalResults(Record):
    """What evaluate measured: every benchmark's row, the comparison with GPT-4, the gate."""

    benchmarks: dict[str, Score]
    comparison: list[ComparisonRow]
    gate: Gate
    chat: ChatResults | None = None

    @classmethod
    def read(cls, eval_dir: str | Path) -> EvalResults:
        return read_record(cls, Path(eval_dir) / "results.json", "evaluate")

    @property
    def val_bpb(self) -> float | None:
        """Held-out bits per byte: the figure the champion rule compares (lower is better)."""
        row = self.benchmarks.get("val_perplexity")
        return row.bits_per_byte if row is not None and row.ran else None

    def scores(self) -> dict[str, float | str]:
        """Every benchmark's score (or why it did not run), the chat model's as ``chat_<name>``."""
        out = {k: v.value() for k, v in self.benchmarks.items()}
        if self.chat is not None:
            out |= {f"chat_{k}": v.value() for k, v in self.chat.benchmarks.items()}
        return out
