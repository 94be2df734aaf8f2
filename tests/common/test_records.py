"""The records stages hand each other read back through their typed readers, from real stage
outputs; a missing or foreign file fails at the read, naming the file and the stage to run."""

from __future__ import annotations

import json

import pytest

from tasks.common.records import DataCard, EvalResults, RecordError, RunSummary, TokenIndex
from tests.conftest import build_tokens


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tokens(tmp_path_factory.mktemp("records"))


def test_the_data_card_and_token_index_read_back_from_the_stages(data):
    card = DataCard.read(data / "clean")
    written = json.loads((data / "clean" / "card.json").read_text())
    assert [s.name for s in card.sources] == [s["name"] for s in written["sources"]]
    assert sum(s.docs_out for s in card.sources) == written["totals"]["docs_out"] > 0
    assert card.decontamination.benchmarks == written["decontamination"]["benchmarks"]
    assert DataCard.find(data / "nowhere") is None
    index = TokenIndex.read(data / "tokens")
    assert index.splits["train"].tokens == sum(s.tokens for s in index.splits["train"].shards)
    assert index.dtype == "uint16" and index.mixture == {}


def test_a_run_summary_reads_back_from_a_training_run(eval_model):
    model_dir, _ = eval_model
    run = RunSummary.read(model_dir.parent / "train_summary.json")
    assert run.steps == 2 and run.tokens_seen == 2 * 4096 and run.params > 0
    assert run.device == "cpu" and run.processes == 1


def test_missing_or_foreign_records_name_the_file_and_the_stage(tmp_path):
    with pytest.raises(RecordError, match=r"results\.json not found: run the evaluate stage"):
        EvalResults.read(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"dtype": "uint16"}))
    with pytest.raises(RecordError, match=r"index\.json is not a TokenIndex .*rerun the tokenize"):
        TokenIndex.read(tmp_path)
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(RecordError, match=r"card\.json is not a DataCard"):
        DataCard.read(tmp_path)


def test_eval_results_give_scores_or_the_reason_and_the_champion_figure():
    results = EvalResults.model_validate(
        {
            "benchmarks": {
                "mmlu": {"status": "ran", "score": 27.5, "n": 171},
                "drop": {"status": "not run: no data"},
                "val_perplexity": {"status": "ran", "bits_per_byte": 2.54},
            },
            "comparison": [{"key": "mmlu", "benchmark": "MMLU", "metric": "acc", "status": "ran"}],
            "gate": {"passed": True, "reasons": []},
            "chat": {"model_dir": "m", "benchmarks": {"humaneval": {"status": "ran", "score": 0}}},
        }
    )
    assert results.val_bpb == 2.54
    assert results.scores() == {
        "mmlu": 27.5,
        "drop": "not run: no data",
        "val_perplexity": "ran",
        "chat_humaneval": 0,
    }
