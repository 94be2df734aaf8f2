"""The ``tokenize`` section: data/clean -> a byte-level BPE tokenizer and packed token shards."""

from __future__ import annotations

from pydantic import Field, model_validator

from tasks.common.chat import CHAT_TOKENS
from tasks.common.config import Section, follows
from tasks.ingest.config import DataConfig

# GPT-4's (cl100k) pre-tokenisation pattern as OpenAI publishes it: words with their leading space
# or punctuation, numbers in groups of up to 3, punctuation runs, newline runs, other whitespace.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# The same splits on every input (tests/tokenize/test_stage.py checks it against the original),
# written for tiktoken's regex engine (fancy-regex), which runs any part without look-around on
# the regex crate's automata and the rest on a slower backtracking VM:
# - the possessive `?+` and `++` become `?` and `+`: the optional class excludes letters and the
#   repeated class excludes \r\n, so backtracking into them can never produce another match;
# - the five alternatives before the look-ahead are grouped, so the VM hands them to the automata
#   in one call instead of trying them one by one;
# - the final `\s+` becomes `\s`: it is reached only by a single whitespace character before a
#   non-space (any longer run is taken by `\s+(?!\S)`).
SPLIT_PATTERN = (
    r"""(?:'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n])|\s+(?!\S)|\s"""
)


class MixtureWeight(Section):
    """One source's place in the training mixture (``tokenize.mixture.<source name>``)."""

    weight: float = Field(
        description="target share of the training tokens, relative to the other weights"
    )
    max_epochs: float = Field(
        default=1.0, description="repetition cap: at most this many passes over the source"
    )


class TokenizeConfig(Section):
    """The tokenize stage: data/clean -> a byte-level BPE tokenizer and packed token shards."""

    SECTION = "tokenize"

    in_dir: str = follows(DataConfig, "out_dir", "the cleaned corpus")
    tokenizer_dir: str = Field(
        default="data/tokenizer",
        description="tokenizer.json and its configs, loadable with AutoTokenizer",
    )
    tokens_dir: str = Field(
        default="data/tokens",
        description="packed token shards: {train,val}/part-*.bin and index.json",
    )
    metrics_file: str = Field(
        default="metrics/tokenize.json", description="headline numbers for `dvc metrics show`"
    )
    vocab_size: int = Field(default=8192, ge=1, description="tokens in the vocabulary")
    min_frequency: int = Field(default=2, ge=1, description="BPE: least count of a merged pair")
    bos_token: str = Field(default="<|bos|>", description="beginning of a sequence")
    eos_token: str = Field(default="<|eos|>", description="end of a document")
    pad_token: str = Field(default="<|pad|>", description="padding")
    extra_special_tokens: list[str] = Field(
        default_factory=lambda: ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"],
        description="special tokens after BOS/EOS/PAD (fill-in-the-middle for code); the chat "
        "tokens follow them in every tokenizer",
    )
    split_pattern: str = Field(
        default=SPLIT_PATTERN,
        description="pre-tokenisation regex: GPT-4's split pattern, in a form that splits "
        "identically and runs twice as fast in tiktoken (tasks/tokenize/config.py)",
    )
    train_max_bytes: int | None = Field(
        default=32_000_000,
        ge=1,
        description="BPE trains on at most this much text, a sample by document hash over every "
        "part and source; null: all of it. 32 MB: on 339 MB of site-packages code an 8k "
        "vocabulary trained 4x faster than on 100 MB and compressed 0.6% worse; raise it for "
        "larger vocabularies",
    )
    val_fraction: float = Field(
        default=0.05, gt=0, lt=1, description="documents held out, by a hash of their id"
    )
    workers: int = Field(default=2, ge=1, description="processes for the per-part tasks")
    mixture: dict[str, MixtureWeight] = Field(
        default_factory=dict,
        description="weighted source mixture of the train split, by source name (the data "
        "card's names): a target share of the training tokens and a repetition cap each; "
        "sources left out keep their natural share; {}: every source in proportion to its size",
    )
    fast_encoder: bool = Field(
        default=True,
        description="encode with tiktoken built from our merges, used only when it matches "
        "tokenizers exactly on a sample",
    )
    check_docs: int = Field(
        default=128, ge=1, description="documents compared, fast encoder vs reference, each run"
    )

    @property
    def additional_special_tokens(self) -> list[str]:
        """The extra tokens, then the chat format's role and turn tokens (tasks/common/chat.py),
        reserved in every tokenizer so that a base model can be fine-tuned into a chat model."""
        return [*self.extra_special_tokens, *CHAT_TOKENS]

    @property
    def special_tokens(self) -> list[str]:
        return [self.bos_token, self.eos_token, self.pad_token, *self.additional_special_tokens]

    @model_validator(mode="after")
    def _check(self) -> TokenizeConfig:
        for name, m in self.mixture.items():
            if m.weight < 0:
                raise ValueError(
                    f"mixture source {name!r}: weight {m.weight} is negative; a weight is a share "
                    "of the training tokens, 0 or more"
                )
            if not m.max_epochs >= 1:
                raise ValueError(
                    f"mixture source {name!r}: max_epochs {m.max_epochs} is below 1; it caps how "
                    "many times the source may be repeated (1: never)"
                )
        if self.mixture and not sum(m.weight for m in self.mixture.values()) > 0:
            raise ValueError(
                "the mixture's weights sum to 0: give at least one source a positive weight, or "
                "remove tokenize.mixture to keep every source's natural share"
            )
        specials = self.special_tokens
        if len(set(specials)) != len(specials):
            raise ValueError(f"special tokens must be distinct: {specials}")
        if self.vocab_size < 256 + len(specials) + 1:
            raise ValueError(
                f"vocab_size {self.vocab_size} is too small: 256 byte tokens + {len(specials)} "
                f"special tokens need at least {256 + len(specials) + 1}"
            )
        return self
