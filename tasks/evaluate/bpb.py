"""Bits per byte of gold answers (GSM8K, DROP, HumanEval's canonical solutions): progress measures
that move long before a small model gets an answer right; and the untrained (uniform) baseline."""

from __future__ import annotations

import math

import numpy as np

from tasks.common import benchmarks as bm
from tasks.evaluate.config import EvaluateConfig
from tasks.evaluate.errors import NothingScored
from tasks.evaluate.lm import EvalLM, Log
from tasks.evaluate.stats import ratio_bpb


def uniform_bpb(tok, texts: list[str]) -> float:
    """Bits per byte of a model that puts equal mass on every token: an untrained model's score."""
    n_tok = sum(len(tok(t, add_special_tokens=False, verbose=False)["input_ids"]) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return math.log2(len(tok)) * n_tok / n_bytes


def bpb_from_lls(lls: list[float], texts: list[str]) -> tuple[dict, int]:
    keep = [i for i, ll in enumerate(lls) if not math.isnan(ll)]
    if not keep:
        raise NothingScored(f"all {len(lls)} answers are longer than the model's context")
    nats = np.array([-lls[i] for i in keep])
    n_bytes = np.array([len(texts[i].encode("utf-8")) for i in keep], dtype=float)
    return ratio_bpb(nats, n_bytes), len(lls) - len(keep)


def run_gold_bpb(cfg: EvaluateConfig, lm: EvalLM, name: str, log: Log) -> dict:
    from lm_eval.api.instance import Instance

    b = bm.BENCHMARKS[name]
    pairs = bm.gold_requests(name, cfg.limit(name))
    lm.reset_counts(f"{b.title} gold bits/byte")
    reqs = [
        Instance(request_type="loglikelihood", doc={}, arguments=(c, a), idx=i)
        for i, (c, a) in enumerate(pairs)
    ]
    lls = [float(r[0]) for r in lm.loglikelihood(reqs, disable_tqdm=True)]
    answers = [a for _, a in pairs]
    stats, skipped = bpb_from_lls(lls, answers)
    return {
        "status": "ran",
        **stats,
        "uniform_baseline": uniform_bpb(lm.tokenizer, answers),
        "shots": b.gpt4_shots,
        "truncated": sum(p in lm.truncated for p in pairs),
        "skipped": skipped,
        "context": lm.max_length,
        "setting": "bits per byte of the gold answers (lower is better); a progress measure, "
        "not GPT-4's metric",
        "data": b.data_note,
    }
