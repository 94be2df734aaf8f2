"""The tokenize stage on a small clean corpus built by the ingest logic itself."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.ingest.config import DataConfig, SourceConfig
from tasks.ingest.stage import run_ingest
from tasks.tokenize.config import TokenizeConfig
from tasks.tokenize.corpus import TokenizeError
from tasks.tokenize.stage import run_tokenize
from tasks.tokenize.tokenizer import ROUND_TRIP_PROBE, EncoderSpec, encode_batch, train_tokenizer
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
    run_ingest(cfg, out_dir=str(tmp / "clean"), log=lambda m: None)
    return tmp


def tcfg(base: Path, name: str = "run", **kw) -> TokenizeConfig:
    return TokenizeConfig(
        in_dir=str(base / "clean"),
        tokenizer_dir=str(base / name / "tokenizer"),
        tokens_dir=str(base / name / "tokens"),
        metrics_file=str(base / name / "metrics.json"),
        **{"vocab_size": 1024, "val_fraction": 0.2, **kw},
    )


def corpus_texts(cfg: TokenizeConfig) -> list[str]:
    return [
        t
        for p in sorted(Path(cfg.in_dir).glob("part-*.parquet"))
        for t in pq.read_table(p).column("text").to_pylist()
    ]


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
            assert tok.decode(toks.tolist(), skip_special_tokens=False) == text
            assert not special_ids & set(toks.tolist()), (kind, text)


def test_fast_encoder_equals_reference_on_corpus(run):
    cfg, summary = run
    assert summary.index["encoder"] == "tiktoken", summary.encoder_reason
    texts = corpus_texts(cfg)
    path = str(Path(cfg.tokenizer_dir) / "tokenizer.json")
    fast = encode_batch(EncoderSpec("tiktoken", path), cfg, texts)
    ref = encode_batch(EncoderSpec("tokenizers", path), cfg, texts)
    assert [a.tolist() for a in fast] == [b.tolist() for b in ref]


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
    from tasks.tokenize.corpus import is_val

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
        assert hf(text, add_special_tokens=False)["input_ids"] == ids.tolist()
        assert hf.decode(ids.tolist()) == text


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
    from tasks.common.config import ConfigError
    from tasks.params import params_from_dict

    with pytest.raises(ConfigError, match="vocab_size 260 is too small"):
        params_from_dict({"tokenize": {"vocab_size": 260}})


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Short strings over the characters where split patterns disagree if they ever do: every
    kind of whitespace, letters from several scripts, digits, punctuation and apostrophes."""
    import random

    alphabet = list(" \t\n\r\x0b\x0c\u00a0\u2003\u3000aZéß漢かйا5٣²'’.,;(){}_-#\"e\u0301🦙")
    alphabet += ["'s", "'LL", "'ve", "  ", "\r\n", "    ", "abc", "123456"]
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randint(1, 24))) for _ in range(n)]


def test_split_pattern_splits_exactly_like_gpt4s(run):
    """Our default pattern is GPT-4's, rewritten for speed: same pieces in Hugging Face's engine
    (Oniguruma) and same ids in tiktoken's (fancy-regex), on code, Unicode and random strings."""
    from tokenizers import Regex, pre_tokenizers

    from tasks.tokenize.config import GPT4_SPLIT_PATTERN, SPLIT_PATTERN
    from tasks.tokenize.tokenizer import tiktoken_encoding

    cfg, _ = run
    assert cfg.split_pattern == SPLIT_PATTERN != GPT4_SPLIT_PATTERN
    texts = UNICODE + corpus_texts(cfg)[:40] + random_texts(5000)

    def pieces(pattern: str) -> list[list[str]]:
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        return [[p for p, _ in split.pre_tokenize_str(t)] for t in texts]

    assert pieces(SPLIT_PATTERN) == pieces(GPT4_SPLIT_PATTERN)
    path = Path(cfg.tokenizer_dir) / "tokenizer.json"
    ours, gpt4 = tiktoken_encoding(path, SPLIT_PATTERN), tiktoken_encoding(path, GPT4_SPLIT_PATTERN)
    assert ours.encode_ordinary_batch(texts) == gpt4.encode_ordinary_batch(texts)


def test_reference_encoder_when_fast_is_off_gives_the_same_shards(run, clean_dir):
    cfg, summary = run
    slow = run_tokenize(tcfg(clean_dir, "ref", fast_encoder=False), log=lambda m: None)
    assert slow.index["encoder"] == "tokenizers" and "disabled" in slow.encoder_reason
    for split in ("train", "val"):
        for sh in summary.index["splits"][split]["shards"]:
            a = Path(cfg.tokens_dir, sh["path"]).read_bytes()
            assert a == Path(clean_dir, "ref", "tokens", sh["path"]).read_bytes()


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        # tiktoken drops text its pattern does not match; tokenizers keeps it as a piece.
        (r"\p{L}+|\p{N}+", "differs from tokenizers"),
        # \X (a grapheme cluster) exists in Oniguruma, not in tiktoken's engine.
        (r"\p{L}+|\X", "could not be built or run"),
    ],
)
def test_falls_back_to_reference_when_tiktoken_disagrees(clean_dir, pattern, reason):
    cfg = tcfg(clean_dir, "odd", split_pattern=pattern)
    summary = run_tokenize(cfg, log=lambda m: None)
    assert summary.index["encoder"] == "tokenizers" and reason in summary.encoder_reason
    assert summary.index["not_round_trip"] == 0
    # The shards decode back to the documents, each followed by EOS.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(cfg.tokenizer_dir) / "tokenizer.json"))
    eos = summary.index["eos_id"]
    docs = []
    for split in ("train", "val"):
        for sh in summary.index["splits"][split]["shards"]:
            arr = np.fromfile(Path(cfg.tokens_dir, sh["path"]), dtype=np.uint16).tolist()
            while arr:
                end = arr.index(eos)
                docs.append(tok.decode(arr[:end], skip_special_tokens=False))
                arr = arr[end + 1 :]
    assert sorted(docs) == sorted(corpus_texts(cfg))


def test_text_that_does_not_round_trip_is_counted(run, tmp_path):
    """A lone surrogate has no UTF-8 form: the document is encoded as tiktoken does (U+FFFD) and
    counted, not silently passed off as intact."""
    from tasks.tokenize.stage import pack_texts

    cfg, summary = run
    spec = EncoderSpec("tiktoken", str(Path(cfg.tokenizer_dir) / "tokenizer.json"))
    texts = ["fine text", "broken \ud800 surrogate", ROUND_TRIP_PROBE]
    res = pack_texts(
        "p.bin", texts, ["train"] * 3, spec, cfg, str(tmp_path), 1024, summary.index["eos_id"]
    )
    assert res.not_round_trip == 1 and res.docs["train"] == 3
    assert (tmp_path / "train" / "p.bin").stat().st_size == res.tokens["train"] * 2


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two sources of similar size: stdlib files and generated code (small documents, so that a
    share is met to within a fraction of a point)."""
    import random

    from tests.ingest.test_stage import fake_code

    tmp = tmp_path_factory.mktemp("mix")
    rng = random.Random(3)
    (tmp / "gen").mkdir()
    for i in range(300):
        (tmp / "gen" / f"g{i:03d}.py").write_text(fake_code(rng, rng.randint(2_000, 6_000)))
    cfg = DataConfig(
        sources=[
            SourceConfig(uri="stdlib", name="stdlib", max_docs=250),
            SourceConfig(uri=str(tmp / "gen"), name="generated"),
        ],
        metrics_file=str(tmp / "m.json"),
        max_chars=12_000,
        part_max_bytes=400_000,
    )
    run_ingest(cfg, out_dir=str(tmp / "clean"), log=lambda m: None)
    return tmp


def test_weighted_mixture_realises_its_shares_within_the_cap(two_sources):
    from tasks.tokenize.config import MixtureWeight

    plain = run_tokenize(tcfg(two_sources, "plain", vocab_size=512), log=lambda m: None)
    mix = {
        "generated": MixtureWeight(weight=0.8, max_epochs=3),
        "stdlib": MixtureWeight(weight=0.2),
    }
    mixed = run_tokenize(tcfg(two_sources, "mixed", vocab_size=512, mixture=mix), log=print)
    m = mixed.index["mixture"]
    print({s: (r["natural_share"], r["realised_share"], r["epochs"]) for s, r in m.items()})
    for source, weight in (("generated", 0.8), ("stdlib", 0.2)):
        assert m[source]["target_share"] == pytest.approx(weight)
        assert abs(m[source]["realised_share"] - weight) <= 0.02, m
    # generated is upsampled by repetition within its cap; stdlib downsampled, never repeated
    assert 1 < m["generated"]["epochs"] <= 3 and m["stdlib"]["epochs"] < 1, m
    # the split's size is kept (to within a document), the val split is untouched
    natural = plain.index["splits"]["train"]["tokens"]
    assert abs(mixed.index["splits"]["train"]["tokens"] - natural) < 0.01 * natural
    for f in sorted((two_sources / "plain" / "tokens" / "val").iterdir()):
        assert f.read_bytes() == (two_sources / "mixed" / "tokens" / "val" / f.name).read_bytes()
    # the train stream holds only train documents: its token histogram is made of theirs
    plain_train = np.concatenate(
        [np.fromfile(f, np.uint16) for f in sorted((two_sources / "plain/tokens/train").iterdir())]
    )
    mixed_train = np.concatenate(
        [np.fromfile(f, np.uint16) for f in sorted((two_sources / "mixed/tokens/train").iterdir())]
    )
    assert set(np.unique(mixed_train)) <= set(np.unique(plain_train))
    # what the model card prints, and what MLflow gets
    from tasks.common.summary import mixture_table

    card = "\n".join(mixture_table(m))
    g = m["generated"]
    assert f"| generated | {100 * g['natural_share']:.1f}% | 80.0% | " in card and "| 3.0 |" in card
    assert mixed.metrics["mix.generated.realised_share"] == g["realised_share"]

    # a cap the weight cannot be met within: refused before any work, naming the source
    capped = {**mix, "generated": MixtureWeight(weight=0.8, max_epochs=1.2)}
    with pytest.raises(
        TokenizeError, match=r"tokenize.mixture.generated: weight 0.8 .*max_epochs 1.2"
    ):
        run_tokenize(tcfg(two_sources, "capped", vocab_size=512, mixture=capped))
    assert not (two_sources / "capped").exists()
    with pytest.raises(TokenizeError, match="'github', which yielded no training documents"):
        run_tokenize(tcfg(two_sources, "x", mixture={"github": MixtureWeight(weight=1)}))


@pytest.mark.parametrize(
    "mixture, message",
    [
        ({"a": {"weight": -0.2}}, "mixture source 'a': weight -0.2 is negative"),
        (
            {"a": {"weight": float("inf")}},
            r"tokenize.mixture.a.weight: input should be a finite number",
        ),
        (
            {"a": {"weight": float("nan")}},
            r"tokenize.mixture.a.weight: input should be a finite number",
        ),
        ({"a": {"weight": 0.5, "max_epochs": 0.5}}, "max_epochs 0.5 is below 1"),
        ({"a": {"weight": 0}, "b": {"weight": 0}}, "weights sum to 0"),
    ],
)
def test_bad_mixture_params_are_refused_with_the_source_named(mixture, message):
    from tasks.common.config import ConfigError
    from tasks.params import params_from_dict

    with pytest.raises(ConfigError, match=message):
        params_from_dict({"tokenize": {"mixture": mixture}})
