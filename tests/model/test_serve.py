"""model.serve for real: lm-eval's local-completions against it gives the direct scores."""

import contextlib
import json
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import eval_fields, free_port, running_server

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def serve_tiny_model(root: Path, max_steps: int, *server_args: str, seq_len: int = 32):
    """Train a tiny model under ``root`` and serve it with ``model.serve``; yields (model, port)."""
    from tests.conftest import build_tokens
    from tests.train.test_stage import params_file, run_train

    data = build_tokens(root / "d")
    run_train(
        params_file(
            root / "t", data, max_steps=max_steps, seq_len=seq_len, global_batch_tokens=4 * seq_len
        )
    )
    model = root / "t" / "hf"
    port = free_port()
    cmd = [sys.executable, "-m", "model.serve", "--model", str(model), "--port", str(port)]
    with running_server(
        [*cmd, *server_args], f"http://127.0.0.1:{port}/v1/models", root / "serve.log", timeout=120
    ):
        yield model, port


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    # A 1024-token context holds HumanEval's prompts and solutions in a 512-token vocabulary.
    with serve_tiny_model(tmp_path_factory.mktemp("serve"), 4, seq_len=1024) as (model, port):
        yield model, f"http://127.0.0.1:{port}/v1"


def post(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_completions_and_chat(served):
    _, base = served
    out = post(
        f"{base}/completions", {"prompt": "def add(a, b):", "max_tokens": 5, "temperature": 0}
    )
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] == 5
    echo = post(
        f"{base}/completions",
        {"prompt": "def add(a, b):", "max_tokens": 0, "echo": True, "logprobs": 1},
    )
    lp = echo["choices"][0]["logprobs"]
    assert echo["choices"][0]["text"] == "def add(a, b):" and lp["token_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    # a base model has no chat template: a 400 that points at the chat model
    # (tests/test_chat.py serves one)
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as err:
        post(
            f"{base}/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        )
    assert err.value.code == 400 and "no chat template" in err.value.read().decode()


def test_local_completions_scores_equal_direct(served):
    """lm-eval's API model through model.serve gives the bits per byte the stage measures
    directly: the server's log-probabilities are the model's."""
    from lm_eval import simple_evaluate

    from tasks.evaluate.bpb import bpb_from_lls
    from tasks.evaluate.config import EvaluateConfig
    from tasks.evaluate.humaneval import humaneval_tasks
    from tasks.evaluate.lm import eval_lm, model_context
    from tasks.evaluate.lm import simple_evaluate as stage_evaluate

    model, base = served
    cfg = EvaluateConfig(model_dir=str(model), allow_code_execution=False, batch_size=1)

    def bpb(res):
        s = res["samples"]["llmforge_humaneval_bpb"]
        lls = [x["filtered_resps"][0][0] for x in s]
        return bpb_from_lls(lls, [x["doc"]["canonical_solution"] for x in s])[0]["score"]

    direct = stage_evaluate(cfg, eval_lm(cfg, print), humaneval_tasks(cfg), 4)
    remote = simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{base}/completions",
            "model": "llmforge",
            "tokenizer": str(model),
            "tokenizer_backend": "huggingface",
            "num_concurrent": 1,
            "max_retries": 1,
            "max_length": model_context(str(model)),
        },
        tasks=humaneval_tasks(cfg),
        num_fewshot=0,
        limit=4,
        bootstrap_iters=0,
        log_samples=True,
    )
    a, b = bpb(direct), bpb(remote)
    assert a > 0 and abs(a - b) < 1e-4 * a, (a, b)


def test_live_reference_column_beside_ours(served, tmp_path):
    from tasks.evaluate.config import EvaluateConfig, LiveConfig
    from tasks.evaluate.report import write_report
    from tasks.evaluate.stage import run_evaluate

    model, base = served
    cfg = EvaluateConfig(
        **eval_fields(model, model.parent.parent / "d" / "data", tmp_path / "eval"),
        benchmarks=["humaneval"],
        max_gen_toks=8,
        live=LiveConfig(base_url=base, model="llmforge", label="served-copy"),
    )
    results = run_evaluate(cfg, log=lambda m: None)
    write_report(results, cfg.out_dir)
    live = results["live"]
    assert live["status"] == "ran"
    ours_bpb = results["benchmarks"]["humaneval_bpb"]["score"]
    assert abs(live["benchmarks"]["humaneval_bpb"]["score"] - ours_bpb) < 1e-4 * ours_bpb
    assert live["benchmarks"]["humaneval"]["score"] == results["benchmarks"]["humaneval"]["score"]
    report = (tmp_path / "eval" / "comparison.md").read_text()
    assert "| served-copy (live) |" in report
    he = next(line for line in report.splitlines() if line.startswith("| HumanEval |"))
    assert he.count("0.0") >= 2 and "| 67.0 |" in he


def test_unreachable_live_endpoint_is_reported_not_fatal(served, tmp_path):
    from tasks.evaluate.config import EvaluateConfig, LiveConfig
    from tasks.evaluate.live import run_live

    model, _ = served
    cfg = EvaluateConfig(
        model_dir=str(model),
        limits={"humaneval": 1},
        allow_code_execution=False,
        live=LiveConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", model="x"),
    )
    out = run_live(cfg, 1024, log=lambda m: None)
    assert out["status"].startswith("not run:")
