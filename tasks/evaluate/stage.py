"""The evaluate stage: GPT-4's own benchmarks on the exported models, offline, every score with n,
its standard error, a 95% interval and the chance level; held-out loss; the release gate.

Each benchmark kind has its module: ``multiple_choice`` (MMLU, HellaSwag, ARC-Challenge,
WinoGrande through lm-eval's task definitions on the data ``tasks.common.benchmarks`` finds),
``humaneval`` (pass@1 in ``sandbox``, for the base and the chat model), ``bpb`` (gold-answer bits
per byte: GSM8K, DROP), ``perplexity`` (held-out loss); ``lm`` is the model as lm-eval sees it,
``report`` writes what the stage leaves behind.

One context length, the model's own, bounds every prompt plus continuation: likelihood requests are
cut from the left by lm-eval and counted, generation goes through ``generate`` (batched, KV cache,
never past the context).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tasks.common import benchmarks as bm
from tasks.common.records import DataCard
from tasks.evaluate.config import EvaluateConfig
from tasks.evaluate.errors import EvaluateError, NothingScored
from tasks.evaluate.sandbox import SandboxUnavailable, check_available

Log = Callable[[str], None]


def _timed(label: str, fn, log: Log, timings: dict | None = None) -> dict:
    """Run one benchmark; a missing dataset makes its row ``not run: <reason>``, not a failure.
    Its wall time goes to ``timings`` (the log and MLflow), not into the row: results.json is a
    DVC output and stays the same for the same model and params."""
    t0 = time.monotonic()
    try:
        out = fn()
    except (bm.DataUnavailable, NothingScored) as exc:
        out = {"status": f"not run: {exc}"}
    seconds = time.monotonic() - t0
    if timings is not None:
        timings[label] = round(seconds, 1)
    log(f"{label}: {describe(out)} ({seconds:.0f} s)")
    return out


def describe(r: dict) -> str:
    if r.get("status") != "ran":
        return r.get("status", "?")
    if "ci95" in r and "chance" in r:
        lo, hi = r["ci95"]
        mark = ", at chance" if r.get("at_chance") else ""
        return (
            f"{r['score']:.1f}% ± {r['stderr']:.1f} (95% CI {lo:.1f}-{hi:.1f}; chance "
            f"{r['chance']:.1f}{mark}), n={r['n']}, {r.get('shots', 0)}-shot"
            + (f", {r['truncated']} truncated" if r.get("truncated") else "")
        )
    if "ci95" in r:
        return (
            f"{r['score']:.3f} bits/byte ± {r['stderr']:.3f} (uniform {r['uniform_baseline']:.3f}), "
            f"n={r['n']}" + (f", {r['truncated']} truncated" if r.get("truncated") else "")
        )
    if "loss" in r:
        return f"loss {r['loss']:.3f} nats/token, {r['bits_per_byte']:.3f} bits/byte"
    return "ran"


def _call(name: str, fn):
    return fn()


def run_evaluate(cfg: EvaluateConfig, log: Log = print, step=_call) -> dict:
    """Every benchmark in ``cfg.benchmarks``, then held-out perplexity, the live reference, the
    chat model's HumanEval and the gate. ``step(name, fn)`` runs each (the flow passes one that
    makes it a Prefect task run)."""
    check_inputs(cfg)
    # lm-eval, torch and transformers load here, when the stage starts, not with the flow module
    from tasks.evaluate.humaneval import run_chat_humaneval
    from tasks.evaluate.live import run_live
    from tasks.evaluate.lm import eval_lm, resolve_device
    from tasks.evaluate.perplexity import heldout_perplexity

    t0 = time.monotonic()
    lm = eval_lm(cfg, log)
    device, dtype, batch = resolve_device(cfg)
    log(
        f"evaluate: {cfg.model_dir} on {device} ({dtype}, batch {batch}), context "
        f"{lm.max_length} tokens; {'full sets' if cfg.full_sets else 'demo limits (evaluate.limits)'}"
    )
    results: dict = {
        "model_dir": cfg.model_dir,
        "context": lm.max_length,
        "device": device,
        "dtype": dtype,
        "full_sets": cfg.full_sets,
        "benchmarks": {},
        "samples": [],
        "timings": {},  # seconds and rates: logged and sent to MLflow, kept out of results.json
    }
    b, timings = results["benchmarks"], results["timings"]
    for name in cfg.benchmarks:
        for key, row in run_benchmark(cfg, lm, name, log, step, timings).items():
            results["samples"] += row.pop("samples", [])
            b[key] = row
    b["val_perplexity"] = step(
        "val_perplexity",
        lambda: _timed("val_perplexity", lambda: heldout_perplexity(cfg, lm), log, timings),
    )
    if cfg.live is not None:
        results["live"] = run_live(cfg, lm.max_length, log)
    chat = cfg.chat_model_dir
    if chat and "humaneval" in cfg.benchmarks and cfg.allow_code_execution:
        he = step(
            "chat_humaneval",
            lambda: _timed("chat_humaneval", lambda: run_chat_humaneval(cfg, log), log, timings),
        )
        results["samples"] += he.pop("samples", [])
        results["chat"] = {"model_dir": chat, "benchmarks": {"humaneval": he}}
    results["gate"] = gate(cfg, results)
    timings["total"] = round(time.monotonic() - t0, 1)
    return results


def check_inputs(cfg: EvaluateConfig) -> None:
    """Before any model loads: the models exist, and generated code can run isolated."""
    if not (Path(cfg.model_dir) / "config.json").exists():
        raise EvaluateError(
            f"no model in {cfg.model_dir}: run the train stage first (python -m flows train)"
        )
    if "humaneval" in cfg.benchmarks and cfg.allow_code_execution:
        try:  # refuse before any model is loaded, not after generating 164 completions
            check_available()
        except SandboxUnavailable as exc:
            raise EvaluateError(str(exc)) from None
        chat = cfg.chat_model_dir
        if chat and not (Path(chat) / "config.json").exists():
            raise EvaluateError(
                f"no chat model in {chat}: run the finetune stage first (python -m flows "
                "finetune), or set evaluate.chat_model_dir=null to evaluate the base only"
            )


def run_benchmark(cfg: EvaluateConfig, lm, name: str, log: Log, step, timings: dict) -> dict:
    """One benchmark's rows (HumanEval gives two: pass@1 and bits per byte), as one step."""
    from tasks.evaluate.bpb import run_gold_bpb
    from tasks.evaluate.humaneval import run_humaneval
    from tasks.evaluate.multiple_choice import run_multiple_choice

    kind = bm.BENCHMARKS[name].kind
    if kind == "humaneval":
        t = time.monotonic()
        rows = step(name, lambda: run_humaneval(cfg, lm, log))
        timings["humaneval"] = round(time.monotonic() - t, 1)
        if lm.gen_seconds:
            timings["humaneval_tokens_per_s"] = round(lm.gen_tokens / lm.gen_seconds, 1)
        for key, r in rows.items():
            log(f"{key}: {describe(r)}")
        return rows
    run = run_multiple_choice if kind == "multiple_choice" else run_gold_bpb
    return {name: step(name, lambda: _timed(name, lambda: run(cfg, lm, name, log), log, timings))}


def gate(cfg: EvaluateConfig, results: dict) -> dict:
    g, b, reasons = cfg.gate, results["benchmarks"], []
    ppl = b.get("val_perplexity", {})
    if g.max_val_loss is not None:
        if ppl.get("status") != "ran":
            reasons.append("held-out loss not measured")
        elif ppl["loss"] > g.max_val_loss:
            reasons.append(f"held-out loss {ppl['loss']:.3f} > max_val_loss {g.max_val_loss}")
    if g.min_humaneval_bpb_gain is not None:
        h = b.get("humaneval_bpb", {})
        if h.get("status") != "ran":
            reasons.append("HumanEval bits per byte not measured")
        elif h["uniform_baseline"] - h["score"] < g.min_humaneval_bpb_gain:
            reasons.append(
                f"HumanEval bits/byte {h['score']:.3f} is not {g.min_humaneval_bpb_gain} below the untrained baseline {h['uniform_baseline']:.3f}"
            )
    if g.require_decontamination:
        card = DataCard.find(cfg.data_dir)
        done = set(card.decontamination.benchmarks) if card else set()
        for name in cfg.benchmarks:
            src = bm.BENCHMARKS[name].decontam
            if src and src not in done:
                reasons.append(
                    f"the training corpus was not decontaminated against {bm.BENCHMARKS[name].title} "
                    f"(data.decontam_benchmarks: add {src}; {cfg.data_dir}/card.json)"
                )
    return {"passed": not reasons, "reasons": reasons}
