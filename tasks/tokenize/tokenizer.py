"""The tokenizer: a byte-level BPE trained with Hugging Face ``tokenizers`` (GPT-4's split pattern,
then byte-level BPE, special tokens first), saved so that ``AutoTokenizer`` loads it offline; and
the fast encoder, a tiktoken ``Encoding`` built from the very same merges and pattern, used only
after it reproduced the reference encoder's ids exactly on a sample of this run's documents."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from tasks.tokenize.config import TokenizeConfig
from tasks.tokenize.corpus import TokenizeError, count_docs, iter_texts, parquet_parts, sample_share

# A wide Unicode sample every trained tokenizer must round-trip before any shard is written.
ROUND_TRIP_PROBE = (
    "def f(x):\n\treturn x  # CJK 漢字かなカナ한국어, emoji 🦙🚀👩‍💻, e\u0301 \u00e9 \u200b\r\n"
    "a\u0000b\x07c \u202eRTL\u202c ΑΒΓ кириллица العربية श्रीमान् "
    + "very_long_identifier_" * 20
    + "\n"
)


def train_tokenizer(cfg: TokenizeConfig):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    parts = parquet_parts(cfg.in_dir)
    n_docs = count_docs(parts)
    if n_docs == 0:
        raise TokenizeError(f"the corpus in {cfg.in_dir} is empty: nothing to train a tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(cfg.split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=cfg.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    share = sample_share(parts, cfg.train_max_bytes)
    tok.train_from_iterator(iter_texts(parts, share), trainer=trainer, length=round(n_docs * share))
    tok.encode_special_tokens = True  # "<|eos|>" written in a document is text, not the EOS token
    ids = tok.encode(ROUND_TRIP_PROBE, add_special_tokens=False).ids
    if tok.decode(ids, skip_special_tokens=False) != ROUND_TRIP_PROBE:
        raise TokenizeError(
            "the trained tokenizer does not round-trip the Unicode probe; check tokenize.split_pattern"
        )
    return tok


def save_tokenizer(tok, cfg: TokenizeConfig, out_dir: str | Path) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``: what
    ``AutoTokenizer.from_pretrained`` reads offline in transformers 4.x and 5.x."""
    out = Path(out_dir)
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": cfg.bos_token, "eos_token": cfg.eos_token, "pad_token": cfg.pad_token}
    vocab = tok.get_vocab()
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "unk_token": None,
        "additional_special_tokens": cfg.additional_special_tokens,
        # A decoder takes ids and a mask; without this, transformers 4.x's fast tokenizer also
        # returns token_type_ids, and generate(**tok(text, return_tensors="pt")) fails.
        "model_input_names": ["input_ids", "attention_mask"],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "added_tokens_decoder": {
            str(vocab[t]): {
                "content": t,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": True,
            }
            for t in cfg.special_tokens
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    smap = {**specials, "additional_special_tokens": cfg.additional_special_tokens}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, sort_keys=True) + "\n")


def _bytes_decoder() -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    # ByteLevel maps each byte to a printable character; alphabet() lists them, and the GPT-2
    # table assigns them in this order: printable bytes as themselves, the rest from U+0100 up.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    assert set(table) == set(ByteLevel.alphabet())
    return table


def tiktoken_encoding(tokenizer_json: str | Path, pat_str: str):
    """A tiktoken ``Encoding`` with the trained merges as ranks (a token's id is its merge order)."""
    import tiktoken

    data = json.loads(Path(tokenizer_json).read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    dec = _bytes_decoder()
    specials = {t["content"]: t["id"] for t in data["added_tokens"]}
    ranks = {
        bytes(dec[c] for c in token): idx for token, idx in vocab.items() if token not in specials
    }
    return tiktoken.Encoding(
        name=f"llmforge-{hashlib.sha256(Path(tokenizer_json).read_bytes()).hexdigest()[:12]}",
        pat_str=pat_str,
        mergeable_ranks=ranks,
        special_tokens=specials,
    )


@dataclass(frozen=True)
class EncoderSpec:
    kind: str  # "tiktoken" or "tokenizers"
    tokenizer_json: str


@lru_cache(maxsize=4)
def _load(spec: EncoderSpec, pat_str: str):
    if spec.kind == "tiktoken":
        return tiktoken_encoding(spec.tokenizer_json, pat_str)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(spec.tokenizer_json)
    tok.encode_special_tokens = True
    return tok


def encode_batch(spec: EncoderSpec, cfg: TokenizeConfig, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids (uint32 arrays; special tokens are never produced from text).

    tiktoken writes the ids straight into a numpy buffer: no Python int per token.
    """
    enc = _load(spec, cfg.split_pattern)
    if spec.kind == "tiktoken":
        return [_tiktoken_ids(enc, t) for t in texts]
    return [np.array(e.ids, np.uint32) for e in enc.encode_batch(texts, add_special_tokens=False)]


def _tiktoken_ids(enc, text: str) -> np.ndarray:
    try:
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except UnicodeEncodeError:
        # Lone surrogates have no UTF-8 form: tiktoken's own encode() replaces them with U+FFFD;
        # do the same here and let the round-trip check count the document.
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(fixed, allowed_special=set(), disallowed_special=())


def decode_bytes(spec: EncoderSpec, cfg: TokenizeConfig, ids: np.ndarray) -> bytes:
    enc = _load(spec, cfg.split_pattern)
    if spec.kind == "tiktoken":
        return enc.decode_bytes(ids.tolist())
    return enc.decode(ids.tolist(), skip_special_tokens=False).encode("utf-8", "surrogatepass")


def choose_encoder(tokenizer_json: str, cfg: TokenizeConfig) -> tuple[EncoderSpec, str]:
    """The fast encoder if it gives exactly the reference ids on a sample of this corpus."""
    reference = EncoderSpec("tokenizers", tokenizer_json)
    if not cfg.fast_encoder:
        return reference, "fast encoder disabled (tokenize.fast_encoder: false)"
    fast = EncoderSpec("tiktoken", tokenizer_json)
    # Every step-th document (the probe first), read as a stream that stops once the sample is full.
    parts = parquet_parts(cfg.in_dir)
    step = max(1, (1 + count_docs(parts)) // cfg.check_docs)
    texts = itertools.chain([ROUND_TRIP_PROBE], iter_texts(parts))
    sample = list(itertools.islice(texts, 0, step * (cfg.check_docs + 1), step))
    try:
        got = encode_batch(fast, cfg, sample)
    except Exception as exc:  # a pattern tiktoken's regex engine rejects, say
        return reference, f"tiktoken could not be built or run ({type(exc).__name__}: {exc})"
    want = encode_batch(reference, cfg, sample)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if not np.array_equal(a, b):
            return (
                reference,
                f"tiktoken differs from tokenizers on sample document {i}; using tokenizers",
            )
    return fast, f"tiktoken matches tokenizers exactly on {len(sample)} sample documents"
