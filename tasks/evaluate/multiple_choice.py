"""MMLU, HellaSwag, ARC-Challenge and WinoGrande through lm-eval's own task definitions, at
GPT-4's shot counts where the prompts fit the model's context and otherwise at the largest count
that does (the report says so)."""

from __future__ import annotations

import math

import numpy as np

from tasks.common import benchmarks as bm
from tasks.evaluate.config import EvaluateConfig
from tasks.evaluate.lm import EvalLM, Log, simple_evaluate, task_manager, tune_lm_eval
from tasks.evaluate.lm_tasks import task_configs
from tasks.evaluate.stats import proportion

FIT_SHARE = 0.8  # a shot count is used when at least this share of its prompts fits the context
FIT_SAMPLE = 64  # items measured to choose it


def _per_task_limit(name: str, limit: int | None) -> int | None:
    if limit is None or name != "mmlu":
        return limit
    return max(1, math.ceil(limit / len(bm.mmlu_subjects())))


def build_tasks(name: str, shots: int) -> dict:
    """lm-eval Task objects of a benchmark at a shot count (``{task name: Task}``)."""
    tune_lm_eval()
    return task_manager().load(task_configs(name, shots))["tasks"]


def prompt_lengths(tasks: dict, shots: int, per_task: int, tok, seed: int) -> list[int]:
    """Tokens of the longest request (prompt + answer) of the first ``per_task`` items of each
    task at this shot count."""

    def n_tok(text: str) -> int:
        return len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    lengths = []
    for task in tasks.values():
        task.set_fewshot_seed(seed)
        for doc in list(task.test_docs())[:per_task]:
            ctx = task.fewshot_context(doc, shots)
            delim = task.config.target_delimiter
            if isinstance(ctx, list):  # WinoGrande: one context per option, one continuation
                lengths.append(max(map(n_tok, ctx)) + n_tok(delim + str(task.doc_to_target(doc))))
            else:
                lengths.append(n_tok(ctx) + max(n_tok(delim + a) for a in task.doc_to_choice(doc)))
    return lengths


def choose_shots(
    name: str, context: int, limit: int | None, tok, seed: int
) -> tuple[int | None, dict]:
    """The largest shot count up to GPT-4's at which FIT_SHARE of the prompts fit the context,
    measured on the first FIT_SAMPLE scored items (MMLU: one per subject). None when even one
    shot does not fit (reported as not run, never quietly zero-shot)."""
    target = bm.BENCHMARKS[name].gpt4_shots
    per_task = 1 if name == "mmlu" else min(FIT_SAMPLE, limit or FIT_SAMPLE)
    seen: dict[int, float] = {}

    def fit(k: int) -> float:
        if k not in seen:
            lengths = np.array(prompt_lengths(build_tasks(name, k), k, per_task, tok, seed))
            seen[k] = float(np.mean(lengths <= context + 1))
        return seen[k]

    lo, hi = 1, target  # binary search: fit() falls as k grows
    if fit(target) >= FIT_SHARE:
        return target, seen
    if fit(1) < FIT_SHARE:
        return None, seen
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fit(mid) >= FIT_SHARE else (lo, mid)
    return lo, seen


def run_multiple_choice(cfg: EvaluateConfig, lm: EvalLM, name: str, log: Log) -> dict:
    b = bm.BENCHMARKS[name]
    bm.check_available(name)
    limit = cfg.limit(name)
    context = lm.max_length
    shots, fits = choose_shots(name, context, limit, lm.tokenizer, cfg.seed)
    if shots is None:
        return {
            "status": f"not run: a 1-shot prompt does not fit the {context}-token context for "
            f"{100 * (1 - fits.get(1, 0)):.0f}% of items (the model's context is set by train.seq_len)"
        }
    lm.reset_counts(b.title)
    res = simple_evaluate(cfg, lm, task_configs(name, shots), _per_task_limit(name, limit))
    samples = [s for t in sorted(res["samples"]) for s in res["samples"][t]]
    hits = np.array([float(s[b.metric]) for s in samples])
    chance = float(np.mean([1 / len(s["arguments"]) for s in samples]))
    if name == "winogrande":  # partial scoring: one request per option, the answer is the option
        chance = 0.5
    truncated = sum(any(tuple(a) in lm.truncated for a in s["arguments"]) for s in samples)
    out = {
        "status": "ran",
        **proportion(hits, chance),
        "shots": shots,
        "gpt4_shots": b.gpt4_shots,
        "metric": b.metric,
        "truncated": truncated,
        "context": context,
        "setting": f"{shots}-shot, lm-eval {b.metric}"
        + (
            f" (GPT-4: {b.gpt4_shots}-shot; more do not fit the {context}-token context)"
            if shots < b.gpt4_shots
            else ""
        ),
        "data": b.data_note,
    }
    return out
