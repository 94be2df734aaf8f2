"""The model as lm-eval sees it: lm-eval's Hugging Face model (``HFLM``) bounded by the model's
context, scoring a question's choices from one pass over their shared context, generating in
batches with a KV cache, and logging labelled progress; and lm-eval itself, tuned to log well.

Imported when the stage starts (lm-eval, torch and transformers load here), not with the flow."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import lm_eval
import lm_eval.tasks
import lm_eval.utils
from lm_eval.models.huggingface import HFLM

from tasks.common.summary import Progress
from tasks.evaluate.config import EvaluateConfig
from tasks.evaluate.errors import EvaluateError
from tasks.evaluate.generate import cache_kwarg, greedy_generate

Log = Callable[[str], None]


class _LmEvalNoise(logging.Filter):
    """Drop lm-eval warnings that mean nothing to a user of this stage: advice for its CLI's
    ``--metadata`` on every custom dataset, and one line per request it cuts to the context (the
    stage counts those and reports the number)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "can be passed to `--metadata`" not in msg and "Truncating" not in msg


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
    return lm_eval.tasks.TaskManager()


def model_context(model_dir: str) -> int:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return int(cfg["max_position_embeddings"])


def tune_lm_eval() -> None:
    """Three changes to how lm-eval runs, none to what it computes (applied when the stage
    starts, not at import):

    - its warnings that mean nothing here are filtered out (``_LmEvalNoise``);
    - its progress bars are unlabelled and become one long line in a log; this stage logs
      labelled progress with rate and ETA instead (``tasks.common.summary.Progress``). tqdm reads its
      TQDM_DISABLE variable only at import, so the bars are turned off in lm-eval's modules;
    - it compiles a Jinja template on every call of ``apply_template`` (each prompt, each shot,
      each choice): 80% of the time spent building few-shot prompts. The compiled templates are
      kept (a template is a pure function of its source)."""
    from importlib import import_module

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


class EvalLM(HFLM):
    """lm-eval's Hugging Face model, bounded by the model's context, with progress in the log:
    likelihoods of one question's choices from one pass over their shared context, and batched
    greedy generation with a KV cache (``tasks.evaluate.generate``)."""

    progress_label = "requests"

    def log(self, msg: str) -> None:  # eval_lm points it at the stage's log
        print(msg)

    def reset_counts(self, label: str) -> None:
        """Counters of what one benchmark cut or skipped, and its progress label."""
        self.progress_label = label
        self.skipped, self.truncated = set(), set()
        self.gen_truncated, self.gen_tokens, self.gen_seconds = 0, 0, 0.0

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


def eval_lm(cfg: EvaluateConfig, log: Log = print) -> EvalLM:
    """The model of ``cfg.model_dir`` as lm-eval sees it, on the device ``cfg`` resolves to."""
    tune_lm_eval()
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
    lm.reset_counts("requests")
    return lm


def simple_evaluate(cfg: EvaluateConfig, lm: EvalLM, tasks: list, limit: int | None) -> dict:
    """lm-eval's own evaluation of ``tasks`` on ``lm``, seeded from params, every sample kept."""
    tune_lm_eval()
    return lm_eval.simple_evaluate(
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
