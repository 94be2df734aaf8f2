"""The tokenize stage: train a byte-level BPE on data/clean, then encode and pack token shards.

The tokenizer is trained with Hugging Face ``tokenizers`` (GPT-4's split pattern, then byte-level
BPE, special tokens first). For encoding, a tiktoken ``Encoding`` is built from the very same
merges and pattern; it is used only after it reproduced the reference encoder's ids exactly on a
sample of this run's documents, otherwise the stage falls back to ``tokenizers`` and says why.

Each document becomes its ids followed by EOS; documents go to train or val by a stable hash of
their id (never cut), into ``data/tokens/{train,val}/part-*.bin`` (uint16 when the vocabulary fits)
plus ``index.json``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tasks.config import TokenizeConfig
from tasks.runners import MapFn, serial_map
from tasks.storage import atomic_dir
from tasks.summary import headline, write_metrics

# A wide Unicode sample every trained tokenizer must round-trip before any shard is written.
ROUND_TRIP_PROBE = (
    "def f(x):\n\treturn x  # CJK 漢字かなカナ한국어, emoji 🦙🚀👩‍💻, e\u0301 \u00e9 \u200b\r\n"
    "a\u0000b\x07c \u202eRTL\u202c ΑΒΓ кириллица العربية श्रीमान् "
    + "very_long_identifier_" * 20
    + "\n"
)


class TokenizeError(RuntimeError):
    """The stage cannot produce usable token shards; the message says what to change."""


def parquet_parts(in_dir: str | Path) -> list[Path]:
    parts = sorted(Path(in_dir).glob("part-*.parquet"))
    if not parts:
        raise TokenizeError(
            f"no part-*.parquet in {in_dir}: run the ingest stage first (python -m flows.ingest)"
        )
    return parts


def count_docs(parts: Sequence[Path]) -> int:
    """Documents in the parts, from the parquet footers (no data read)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts)


def sample_share(parts: Sequence[Path], max_bytes: int | None) -> float:
    """The share of documents the tokenizer trains on: all of them when the corpus holds at most
    ``max_bytes``, else about ``max_bytes`` worth (read from the ``n_bytes`` column only)."""
    if max_bytes is None:
        return 1.0
    total = sum(pq.read_table(p, columns=["n_bytes"]).column(0).to_numpy().sum() for p in parts)
    return 1.0 if total <= max_bytes else max_bytes / float(total)


def in_sample(sha256: str, share: float) -> bool:
    """A document's place in the sample depends on its content hash only: the same documents
    whatever the part layout, order or number of workers, spread over every part and source."""
    return share >= 1.0 or int(sha256[:16], 16) < share * 2.0**64


def iter_texts(parts: Sequence[Path], share: float = 1.0) -> Iterator[str]:
    """Stream the corpus texts (those in the sample) in order, batch by batch: never the whole
    corpus in memory."""
    for part in parts:
        f = pq.ParquetFile(part)
        for batch in f.iter_batches(columns=["text", "sha256"], batch_size=256):
            if share < 1.0:  # Python strings only for the texts in the sample
                batch = batch.filter([in_sample(h, share) for h in batch.column(1).to_pylist()])
            yield from batch.column(0).to_pylist()


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


def is_val(doc_id: str, fraction: float) -> bool:
    """Stable split by document id: the same document is always on the same side."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) < fraction * 2**32


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


@dataclass
class PartResult:
    name: str
    tokens: dict[str, int]
    docs: dict[str, int]
    bytes: dict[str, int]
    not_round_trip: int
    counts: np.ndarray  # token id histogram over train+val, for vocabulary usage
    # each train document, in order: its length in tokens (EOS included), source and draw
    train_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    train_sources: list[str] = field(default_factory=list)
    train_draws: np.ndarray = field(default_factory=lambda: np.zeros(0))


def encode_part(
    part: str, out_dir: str, spec: EncoderSpec, cfg: TokenizeConfig, vocab_size: int, eos_id: int
) -> PartResult:
    """Encode one parquet part into ``out_dir/{train,val}/<part>.bin``."""
    table = pq.read_table(part, columns=["id", "text", "source"])
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    split_of = ["val" if is_val(i, cfg.val_fraction) else "train" for i in ids]
    name = Path(part).stem + ".bin"
    res = pack_texts(name, texts, split_of, spec, cfg, out_dir, vocab_size, eos_id)
    train = [i for i, s in enumerate(split_of) if s == "train"]
    sources = table.column("source").to_pylist()
    res.train_sources = [sources[i] for i in train]
    res.train_draws = np.array([mixture_draw(ids[i]) for i in train])
    return res


def mixture_draw(doc_id: str) -> float:
    """A document's place in [0, 1) for the mixture's down- and upsampling (independent of the
    train/val split's hash)."""
    return int(hashlib.sha256(f"mixture\0{doc_id}".encode()).hexdigest()[:13], 16) / 16**13


def pack_texts(
    name: str,
    texts: list[str],
    split_of: list[str],
    spec: EncoderSpec,
    cfg: TokenizeConfig,
    out_dir: str,
    vocab_size: int,
    eos_id: int,
) -> PartResult:
    """Encode ``texts``, append EOS to each, check each round-trips, write ``out_dir/<split>/name``."""
    zero = {"train": 0, "val": 0}
    res = PartResult(name, dict(zero), dict(zero), dict(zero), 0, np.zeros(vocab_size, np.int64))
    eos = np.array([eos_id], np.uint32)
    pieces: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    lengths = []
    for text, ids, split in zip(texts, encode_batch(spec, cfg, texts), split_of, strict=True):
        data = text.encode("utf-8", "surrogatepass")
        if decode_bytes(spec, cfg, ids) != data:
            res.not_round_trip += 1
        pieces[split] += (ids, eos)
        if split == "train":
            lengths.append(len(ids) + 1)
        res.docs[split] += 1
        res.bytes[split] += len(data)
    for split, chunks in pieces.items():
        arr = np.concatenate(chunks or [np.zeros(0, np.uint32)]).astype(token_dtype(vocab_size))
        res.tokens[split] = len(arr)
        res.counts += np.bincount(arr, minlength=vocab_size)[:vocab_size]
        path = Path(out_dir) / split / res.name
        path.parent.mkdir(parents=True, exist_ok=True)
        arr.tofile(path)
    res.train_lengths = np.array(lengths, np.int64)
    return res


# --- Weighted source mixture of the train split -------------------------------------------------


def mixture_shares(mixture: dict, natural: dict[str, float]) -> dict[str, float]:
    """Target share of the training tokens per source: sources without a weight keep their natural
    share; the weighted ones divide the rest in proportion to their weights."""
    total = sum(natural.values())
    fixed = {s: n / total for s, n in natural.items() if s not in mixture}
    rest = 1.0 - sum(fixed.values())
    wsum = sum(m.weight for m in mixture.values())
    return {**fixed, **{s: rest * m.weight / wsum for s, m in mixture.items()}}


def mixture_epochs(mixture: dict, natural: dict[str, float], unit: str) -> dict[str, float]:
    """Passes over each source that realise the target shares with the train split's size kept;
    a weight on a source with nothing in the split, or one its cap cannot meet, is an error."""
    empty = [s for s in mixture if natural.get(s, 0) <= 0]
    if empty:
        raise TokenizeError(
            f"tokenize.mixture weights {', '.join(map(repr, empty))}, which yielded no training "
            f"documents (sources in the corpus: {', '.join(sorted(natural)) or 'none'}); fix the "
            "name or remove the weight"
        )
    total = sum(natural.values())
    shares = mixture_shares(mixture, natural)
    epochs = {s: shares[s] * total / n for s, n in natural.items()}
    for s, m in mixture.items():
        if epochs[s] > m.max_epochs * (1 + 1e-9):
            raise TokenizeError(
                f"tokenize.mixture.{s}: weight {m.weight} asks for {100 * shares[s]:.1f}% of the "
                f"training {unit}, {epochs[s]:.2f} passes over a source that holds "
                f"{100 * natural[s] / total:.1f}% of them, over its cap max_epochs {m.max_epochs}; "
                f"raise max_epochs to {math.ceil(epochs[s] * 100) / 100} or lower the weight"
            )
    return epochs


def check_mixture(cfg: TokenizeConfig, parts: Sequence[Path]) -> None:
    """Before any work: the mixture's sources exist and its caps can be met (train-split bytes
    stand in for tokens; the realised shares use tokens)."""
    if not cfg.mixture:
        return
    natural: dict[str, float] = {}
    for p in parts:
        t = pq.read_table(p, columns=["id", "source", "n_bytes"])
        ids, src, n = (t.column(c).to_pylist() for c in ("id", "source", "n_bytes"))
        for i, s, b in zip(ids, src, n, strict=True):
            if not is_val(i, cfg.val_fraction):
                natural[s] = natural.get(s, 0) + b
    mixture_epochs(cfg.mixture, natural, "bytes")


def assign_copies(results: list[PartResult], mixture: dict) -> tuple[list[np.ndarray], dict]:
    """How many times each train document enters the packed split, and the mixture report.

    A source with e passes gives every document floor(e) copies, and one more to its documents
    in the order of their draws until the fractional pass's token budget is filled: deterministic,
    spread over every part, within one document of the target."""
    lengths = np.concatenate([r.train_lengths for r in results])
    sources = np.array([s for r in results for s in r.train_sources], dtype=object)
    draws = np.concatenate([r.train_draws for r in results])
    natural = {s: float(lengths[sources == s].sum()) for s in sorted(set(sources.tolist()))}
    epochs = mixture_epochs(mixture, natural, "tokens")
    copies = np.zeros(len(lengths), np.int64)
    for s, e in epochs.items():
        idx = np.flatnonzero(sources == s)
        base = math.floor(e + 1e-12)
        copies[idx] = base
        budget = (e - base) * natural[s]
        order = idx[np.argsort(draws[idx], kind="stable")]
        before = np.cumsum(lengths[order]) - lengths[order]
        copies[order[before < budget - 0.5]] += 1
    total = float((lengths * copies).sum())
    shares = mixture_shares(mixture, natural)
    report = {}
    for s in natural:
        got = float((lengths * copies)[sources == s].sum())
        m = mixture.get(s)
        report[s] = {
            "weight": m.weight if m else None,
            "max_epochs": m.max_epochs if m else None,
            "natural_tokens": int(natural[s]),
            "natural_share": round(natural[s] / sum(natural.values()), 4),
            "target_share": round(shares[s], 4),
            "realised_tokens": int(got),
            "realised_share": round(got / total, 4) if total else 0.0,
            "epochs": round(got / natural[s], 4),
        }
    cuts = np.cumsum([len(r.train_lengths) for r in results])[:-1]
    return np.split(copies, cuts), report


def mixture_table(mixture: dict) -> list[str]:
    """The training mixture's target and realised shares (tokenize.mixture), when one was set: the model card's
    and the tokenize run's Prefect artifact."""
    if not mixture:
        return []
    rows = [
        "Training mixture (share of training tokens, `tokenize.mixture`):",
        "",
        "| source | natural | target | realised | passes | cap |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s, r in mixture.items():
        rows.append(
            f"| {s} | {100 * r['natural_share']:.1f}% | {100 * r['target_share']:.1f}% | "
            f"{100 * r['realised_share']:.1f}% | {r['epochs']:.2f} | {r['max_epochs'] or '-'} |"
        )
    return [*rows, ""]


def mix_part(path: str, lengths: np.ndarray, copies: np.ndarray, dtype: str) -> int:
    """Rewrite one part's train tokens as the mixture asks: pass k holds, in order, the documents
    with at least k copies (the loader visits windows in a shuffled order anyway)."""
    arr = np.fromfile(path, dtype=dtype)
    starts = np.cumsum(lengths) - lengths
    out = [
        arr[a : a + n]
        for k in range(1, int(copies.max(initial=0)) + 1)
        for a, n, c in zip(starts, lengths, copies, strict=True)
        if c >= k
    ]
    mixed = np.concatenate(out) if out else np.zeros(0, dtype)
    tmp = Path(path).with_suffix(".mixing")
    mixed.tofile(tmp)
    os.replace(tmp, path)
    return len(mixed)


@dataclass
class TokenizeSummary:
    index: dict
    metrics: dict
    seconds: dict[str, float]
    encoder_reason: str


def run_tokenize(
    cfg: TokenizeConfig, map_fn: MapFn = serial_map, log: Callable[[str], None] = print
) -> TokenizeSummary:
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    parts = parquet_parts(cfg.in_dir)
    check_mixture(cfg, parts)  # a weight that cannot be met fails here, before any work
    tok = train_tokenizer(cfg)
    seconds["train_tokenizer"] = time.perf_counter() - t0
    vocab_size = tok.get_vocab_size()
    eos_id = tok.token_to_id(cfg.eos_token)
    with atomic_dir(cfg.tokenizer_dir) as tdir:
        save_tokenizer(tok, cfg, tdir)
    tokenizer_json = str(Path(cfg.tokenizer_dir) / "tokenizer.json")
    tok_hash = hashlib.sha256(Path(tokenizer_json).read_bytes()).hexdigest()

    t1 = time.perf_counter()
    spec, reason = choose_encoder(tokenizer_json, cfg)
    seconds["check_encoder"] = time.perf_counter() - t1
    log(f"encoder: {spec.kind} ({reason})")

    t2 = time.perf_counter()
    with atomic_dir(cfg.tokens_dir) as tmp:
        results: list[PartResult] = map_fn(
            encode_part,
            [
                dict(
                    part=str(p),
                    out_dir=str(tmp),
                    spec=spec,
                    cfg=cfg,
                    vocab_size=vocab_size,
                    eos_id=eos_id,
                )
                for p in parts
            ],
            "tokenize: encode+pack",
            [p.stat().st_size for p in parts],
            lambda r: sum(r.docs.values()),
        )
        seconds["encode_pack"] = time.perf_counter() - t2
        mixture = None
        if cfg.mixture:
            t3 = time.perf_counter()
            copies, mixture = assign_copies(results, cfg.mixture)
            dtype = np.dtype(token_dtype(vocab_size)).name
            jobs = [
                dict(
                    path=str(tmp / "train" / r.name), lengths=r.train_lengths, copies=c, dtype=dtype
                )
                for r, c in zip(results, copies, strict=True)
            ]
            sizes = [int(r.train_lengths.sum()) for r in results]
            for r, c, n in zip(
                results, copies, map_fn(mix_part, jobs, "tokenize: mix", sizes), strict=True
            ):
                r.tokens["train"], r.docs["train"] = n, int(c.sum())
            seconds["mix"] = time.perf_counter() - t3
            for s, m in mixture.items():
                log(
                    f"mixture: {s} {100 * m['realised_share']:.1f}% of training tokens (target "
                    f"{100 * m['target_share']:.1f}%, natural {100 * m['natural_share']:.1f}%), "
                    f"{m['epochs']:.2f} passes"
                )
        index = build_index(results, cfg, vocab_size, eos_id, tok_hash, spec.kind, reason)
        if mixture is not None:
            index["mixture"] = mixture
        if index["splits"]["train"]["tokens"] == 0:
            raise TokenizeError(
                "no training tokens: the corpus is empty or tokenize.val_fraction is too high"
            )
        (tmp / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    metrics = index_metrics(index)
    write_metrics(cfg.metrics_file, headline("tokenize", metrics))
    return TokenizeSummary(index, metrics, seconds, reason)


def build_index(
    results: list[PartResult],
    cfg: TokenizeConfig,
    vocab_size: int,
    eos_id: int,
    tok_hash: str,
    kind: str,
    reason: str,
) -> dict:
    splits = {}
    for split in ("train", "val"):
        splits[split] = {
            "tokens": sum(r.tokens[split] for r in results),
            "docs": sum(r.docs[split] for r in results),
            "bytes": sum(r.bytes[split] for r in results),
            "shards": [
                {"path": f"{split}/{r.name}", "tokens": r.tokens[split], "docs": r.docs[split]}
                for r in results
            ],
        }
    counts = sum((r.counts for r in results), np.zeros(vocab_size, dtype=np.int64))
    counts[eos_id] = 0
    docs = sum(s["docs"] for s in splits.values())
    content_tokens = sum(s["tokens"] for s in splits.values()) - docs  # EOS excluded
    return {
        "dtype": np.dtype(token_dtype(vocab_size)).name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer_sha256": tok_hash,
        "encoder": kind,
        "val_fraction": cfg.val_fraction,
        "splits": splits,
        "bytes_per_token": round(
            sum(s["bytes"] for s in splits.values()) / max(content_tokens, 1), 4
        ),
        "vocab_used": int((counts > 0).sum()),
        "not_round_trip": sum(r.not_round_trip for r in results),
    }


def index_metrics(index: dict) -> dict:
    return {
        "train_tokens": index["splits"]["train"]["tokens"],
        "val_tokens": index["splits"]["val"]["tokens"],
        "train_docs": index["splits"]["train"]["docs"],
        "val_docs": index["splits"]["val"]["docs"],
        "bytes_per_token": index["bytes_per_token"],
        "vocab_usage": round(index["vocab_used"] / index["vocab_size"], 4),
        "not_round_trip": index["not_round_trip"],
        **{  # target vs realised share of each source (MLflow metric names: no ':' or '/')
            f"mix.{re.sub(r'[^A-Za-z0-9_.-]', '_', s)}.{k}": v
            for s, r in index.get("mixture", {}).items()
            for k in ("target_share", "realised_share", "epochs")
            for v in [r[k]]
        },
    }
