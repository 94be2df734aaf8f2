"""The ``release`` section: a verifiable open-source bundle of the base model and of the chat model,
optionally uploaded to S3 and registered in MLflow."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.common.config import Section, follows
from tasks.evaluate.config import EvaluateConfig
from tasks.finetune.config import FinetuneConfig
from tasks.ingest.config import DataConfig
from tasks.tokenize.config import TokenizeConfig
from tasks.train.config import TrainConfig


class ReleaseConfig(Section):
    """The release stage: a verifiable open-source bundle, optionally uploaded and registered."""

    SECTION = "release"

    name: str = Field(
        default="llmforge-demo",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="the bundle's name: release/<name>-<version>/",
    )
    version: str = Field(
        default="0.1.0", pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", description="its version"
    )
    license: Literal["Apache-2.0"] = Field(default="Apache-2.0", description="the model's license")
    model_dir: str = follows(TrainConfig, "export_dir", "the base model")
    train_summary: str = follows(TrainConfig, "summary_file", "the base model's run")
    chat_model_dir: str | None = follows(
        FinetuneConfig,
        "export_dir",
        "the chat model: a second bundle, <name>-chat-<version>, registered as "
        "<registered_model>-chat; null: the base model only",
    )
    chat_summary: str = follows(FinetuneConfig, "summary_file", "the chat model's run")
    eval_dir: str = follows(EvaluateConfig, "out_dir", "the evaluation report")
    data_dir: str = follows(DataConfig, "out_dir", "the corpus: its card.json")
    tokens_dir: str = follows(TokenizeConfig, "tokens_dir", "the token shards: their index.json")
    out_dir: str = Field(default="release", description="where bundles and tarballs are written")
    gguf: list[Literal["f16", "q8_0"]] = Field(
        default_factory=lambda: ["f16", "q8_0"],
        description="GGUF files for llama.cpp in the bundle, read back and checked against the "
        "safetensors before they count; []: none",
    )
    allow_failed_gate: bool = Field(
        default=False,
        description="release despite a failed evaluation gate (the model card says so)",
    )
    s3_uri: str | None = Field(
        default=None, description="s3://bucket/prefix to upload the bundle and tarball to"
    )
    register_model: bool = Field(
        default=True,
        description="register a version in the MLflow Model Registry (aliases candidate and, "
        "when it beats the current one, champion)",
    )
    registered_model: str = Field(default="llmforge", description="the registered model's name")
    hub_token_env: str = Field(
        default="HF_TOKEN",
        description="the variable holding a Hugging Face token (reserved for a Hub push); a "
        "secret itself is never a param",
    )

    def chat(self) -> ReleaseConfig:
        """The same release for the chat model: its folder, run summary, name and registry."""
        return self.model_copy(
            update={
                "model_dir": self.chat_model_dir,
                "train_summary": self.chat_summary,
                "name": f"{self.name}-chat",
                "registered_model": f"{self.registered_model}-chat",
                "chat_model_dir": None,
            }
        )
