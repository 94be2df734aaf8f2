"""The tokenize stage on a small clean corpus built by the ingest logic itself."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.config import DataConfig, SourceConfig, TokenizeConfig
from tasks.ingest import finalize, plan_shards, process_shard
from tasks.tokenize import (
    ROUND_TRIP_PROBE,
    EncoderSpec,
    TokenizeError,
    encode_batch,
    run_tokenize,
    train_tokenizer,
)
from tests.conftest import make_corpus

UNICODE = [
    ROUND_TRIP_PROBE,
    "漢字 かな カナ 한국어 中文字符测试",
    "emoji 🦙🚀👩‍💻🏳️‍🌈 and flags 🇫🇷",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",
    "tabs\tand\ttabs\r\nCRLF\r\nlines\rCR",
    "controls \x01\x02\x1b[31m \x7f",
    "a_very_long_identifier_" * 40,
    "<|eos|> <|bos|> <|pad|> <|fim_prefix|> written as plain text",
]


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    """A clean corpus: the fixture corpus plus 120 stdlib files, through the real ingest logic."""
    tmp = tmp_path_factory.mktemp("tok")
    make_corpus(tmp / "corpus")
    cfg = DataConfig(
        sources=[
            SourceConfig(uri=str(tmp / "corpus"), name="fixture"),
            SourceConfig(uri="stdlib", max_docs=120),
        ],
        metrics_file=str(tmp / "m.json"),
        min_chars=50,
        part_max_bytes=300_000,
    )
    finalize([process_shard(s, cfg) for s in plan_shards(cfg)], cfg, out_dir=str(tmp / "clean"))
    return tmp


def tcfg(base: Path, **kw) -> TokenizeConfig:
    return TokenizeConfig(
        in_dir=str(base / "clean"),
        tokenizer_dir=str(base / kw.pop("name", "run") / "tokenizer"),
        tokens_dir=str(base / kw.get("tokens", "run") / "tokens"),
        metrics_file=str(base / "run" / "metrics.json"),
        **{"vocab_size": 1024, "val_fraction": 0.2, **kw},
    )


@pytest.fixture(scope="module")
def run(clean_dir):
    cfg = tcfg(clean_dir)
    return cfg, run_tokenize(cfg, log=lambda m: None)


def test_round_trip_and_no_special_tokens_from_text(run):
    cfg, _ = run
    spec = EncoderSpec("tiktoken", str(Path(cfg.tokenizer_dir) / "tokenizer.json"))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(spec.tokenizer_json)
    special_ids = {tok.token_to_id(t) for t in cfg.special_tokens}
    for kind in ("tiktoken", "tokenizers"):
        ids = encode_batch(EncoderSpec(kind, spec.tokenizer_json), cfg, UNICODE)
        for text, toks in zip(UNICODE, ids, strict=True):
            assert tok.decode(toks, skip_special_tokens=False) == text
            assert not special_ids & set(toks), (kind, text)


def test_fast_encoder_equals_reference_on_corpus(run):
    cfg, summary = run
    assert summary.index["encoder"] == "tiktoken", summary.encoder_reason
    texts = [
        t
        for p in sorted(Path(cfg.in_dir).glob("part-*.parquet"))
        for t in pq.read_table(p).column("text").to_pylist()
    ]
    path = str(Path(cfg.tokenizer_dir) / "tokenizer.json")
    assert encode_batch(EncoderSpec("tiktoken", path), cfg, texts) == encode_batch(
        EncoderSpec("tokenizers", path), cfg, texts
    )


def test_index_consistent_with_files_and_split_by_document(run):
    cfg, summary = run
    index = json.loads((Path(cfg.tokens_dir) / "index.json").read_text())
    assert index == summary.index
    assert index["dtype"] == "uint16" and index["vocab_size"] == 1024
    tok_file = Path(cfg.tokenizer_dir) / "tokenizer.json"
    assert index["tokenizer_sha256"] == hashlib.sha256(tok_file.read_bytes()).hexdigest()
    for split in ("train", "val"):
        s = index["splits"][split]
        assert s["tokens"] == sum(sh["tokens"] for sh in s["shards"])
        total_eos = 0
        for sh in s["shards"]:
            path = Path(cfg.tokens_dir) / sh["path"]
            assert path.stat().st_size == sh["tokens"] * 2
            arr = np.fromfile(path, dtype=np.uint16)
            total_eos += int((arr == index["eos_id"]).sum())
            assert len(arr) == 0 or arr[-1] == index["eos_id"]  # documents are never cut
        assert total_eos == s["docs"]
    assert index["splits"]["val"]["docs"] > 0 and index["splits"]["train"]["docs"] > 0
    # Each document lands wholly in one split: the per-split doc counts add up to the corpus.
    n_docs = sum(
        pq.ParquetFile(p).metadata.num_rows for p in Path(cfg.in_dir).glob("part-*.parquet")
    )
    assert index["splits"]["train"]["docs"] + index["splits"]["val"]["docs"] == n_docs
    assert index["not_round_trip"] == 0


def test_val_and_train_share_no_document(run):
    from tasks.tokenize import is_val

    cfg, _ = run
    ids = [
        i
        for p in Path(cfg.in_dir).glob("part-*.parquet")
        for i in pq.read_table(p).column("id").to_pylist()
    ]
    val = {i for i in ids if is_val(i, cfg.val_fraction)}
    assert val and val != set(ids)
    assert all(is_val(i, cfg.val_fraction) == (i in val) for i in ids)  # stable


def test_autotokenizer_loads_offline_and_matches(run):
    from transformers import AutoTokenizer

    cfg, _ = run
    hf = AutoTokenizer.from_pretrained(cfg.tokenizer_dir, local_files_only=True)
    assert hf.eos_token == "<|eos|>" and hf.bos_token == "<|bos|>" and hf.pad_token == "<|pad|>"
    assert hf.convert_tokens_to_ids("<|eos|>") == run[1].index["eos_id"]
    path = str(Path(cfg.tokenizer_dir) / "tokenizer.json")
    ours = encode_batch(EncoderSpec("tiktoken", path), cfg, UNICODE[:-1])
    for text, ids in zip(UNICODE[:-1], ours, strict=True):
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == text


def test_training_is_deterministic(run, tmp_path):
    cfg, _ = run
    train_tokenizer(cfg).save(str(tmp_path / "again.json"))
    assert (tmp_path / "again.json").read_bytes() == Path(
        cfg.tokenizer_dir, "tokenizer.json"
    ).read_bytes()


def test_bad_input_fails_before_shards(tmp_path):
    (tmp_path / "clean").mkdir()
    with pytest.raises(TokenizeError, match="run the ingest stage first"):
        run_tokenize(tcfg(tmp_path), log=lambda m: None)
    assert not (tmp_path / "run" / "tokens").exists()
    from tasks.config import ConfigError, params_from_dict

    with pytest.raises(ConfigError, match="vocab_size 260 is too small"):
        params_from_dict({"tokenize": {"vocab_size": 260}})
