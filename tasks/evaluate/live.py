"""A live reference: the same HumanEval tasks against an OpenAI-compatible endpoint, through
lm-eval's API models."""

from __future__ import annotations

import os

import numpy as np

from tasks.evaluate.bpb import bpb_from_lls
from tasks.evaluate.config import EvaluateConfig
from tasks.evaluate.humaneval import humaneval_tasks
from tasks.evaluate.lm import Log, task_manager
from tasks.evaluate.stats import proportion


def run_live(cfg: EvaluateConfig, context: int, log: Log = print) -> dict:
    """HumanEval (pass@1, and bits per byte where the API gives logprobs) on the live endpoint."""

    from lm_eval import simple_evaluate

    live = cfg.live
    out: dict = {
        "label": live.label,
        "model": live.model,
        "base_url": live.base_url,
        "benchmarks": {},
    }
    tasks = humaneval_tasks(cfg)
    if live.api == "chat":
        tasks = [t for t in tasks if t["output_type"] == "generate_until"]
    endpoint = "chat/completions" if live.api == "chat" else "completions"
    args = {
        "base_url": f"{live.base_url.rstrip('/')}/{endpoint}",
        "model": live.model,
        "num_concurrent": 1,
        "max_retries": 2,
        "max_length": context,
    }
    if live.api == "completions":
        args |= {"tokenizer": live.tokenizer or cfg.model_dir, "tokenizer_backend": "huggingface"}
    else:
        args |= {"tokenizer_backend": None}
    old_key = os.environ.get("OPENAI_API_KEY")
    if os.environ.get(live.api_key_env):  # lm-eval reads OPENAI_API_KEY; the value is never logged
        os.environ["OPENAI_API_KEY"] = os.environ[live.api_key_env]
    try:
        res = simple_evaluate(
            model="local-chat-completions" if live.api == "chat" else "local-completions",
            model_args=args,
            tasks=tasks,
            task_manager=task_manager(),
            num_fewshot=0,
            limit=cfg.limit("humaneval"),
            confirm_run_unsafe_code=cfg.allow_code_execution,
            bootstrap_iters=0,
            apply_chat_template=live.api == "chat",
            log_samples=True,
        )
    except Exception as exc:  # unreachable endpoint, bad key, unsupported API
        out["status"] = f"not run: {type(exc).__name__}: {str(exc)[:300]}"
        log(f"live reference {live.label}: {out['status']}")
        return out
    finally:
        if old_key is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = old_key
    out["status"] = "ran"
    smp = res["samples"]
    if "llmforge_humaneval" in smp:
        out["benchmarks"]["humaneval"] = {
            "status": "ran",
            **proportion(np.array([float(s["pass_at_1"]) for s in smp["llmforge_humaneval"]]), 0.0),
        }
    if "llmforge_humaneval_bpb" in smp:
        s = smp["llmforge_humaneval_bpb"]
        stats, _ = bpb_from_lls(
            [x["filtered_resps"][0][0] for x in s], [x["doc"]["canonical_solution"] for x in s]
        )
        out["benchmarks"]["humaneval_bpb"] = {"status": "ran", **stats}
    log(f"live reference {live.label}: { {k: v['score'] for k, v in out['benchmarks'].items()} }")
    return out
