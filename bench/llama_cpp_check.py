"""The release's GGUF files in llama.cpp itself: tokenization and greedy output compared with ours.

    .venv/bin/python -m bench.llama_cpp_check --bin /path/to/llama.cpp/build/bin [--bundle release/<name>]

Needs a llama.cpp build with the ``llama-tokenize`` and ``llama-simple`` tools (for example from
the ``llama-cpp-python`` source distribution: ``cmake -B build && cmake --build build --target
llama-tokenize llama-simple``, about 20 minutes on 2 cores). For each GGUF in the bundle it prints
how many sample texts llama.cpp tokenizes exactly as our tokenizer does, and for how many tokens
llama.cpp's greedy continuation of a few prompts equals transformers' greedy output of the
bundle's safetensors."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from tasks.common.env import apply_offline_defaults

PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef main(", "class Stack:\n    def __init__(self"]


def llama_ids(binary: Path, gguf: Path, text: str) -> list[int]:
    out = subprocess.run(
        [
            str(binary / "llama-tokenize"),
            "-m",
            str(gguf),
            "-p",
            text,
            "--ids",
            "--no-escape",
            "--log-disable",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def llama_greedy(binary: Path, gguf: Path, prompt: str, n: int) -> str:
    out = subprocess.run(
        [str(binary / "llama-simple"), "-m", str(gguf), "-n", str(n), prompt],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out


def main() -> None:
    apply_offline_defaults()
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.release.gguf import sample_texts

    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, type=Path, help="llama.cpp's build/bin folder")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("-n", type=int, default=64, help="tokens to generate per prompt")
    args = ap.parse_args()
    bundle = args.bundle or sorted(p for p in Path("release").iterdir() if p.is_dir())[-1]
    ours = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    ours.encode_special_tokens = True
    tok = AutoTokenizer.from_pretrained(bundle, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(bundle, local_files_only=True).eval()
    texts = [t for t in sample_texts() if "<|" not in t] + PROMPTS
    for gguf in sorted(bundle.glob("*.gguf")):
        same = sum(llama_ids(args.bin, gguf, t) == ours.encode(t).ids for t in texts)
        print(f"{gguf.name}: tokenization equal to ours on {same}/{len(texts)} texts")
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=args.n, do_sample=False, eos_token_id=None)
            reference = tok.decode(gen[0, ids.shape[1] :])
            theirs = llama_greedy(args.bin, gguf, prompt, args.n)
            # llama-simple prints the prompt, then the continuation, then its timings.
            body = theirs.split(prompt, 1)[-1]
            agree = 0
            ref_ids = gen[0, ids.shape[1] :].tolist()
            for k in range(len(ref_ids), 0, -1):
                if body.startswith(tok.decode(ref_ids[:k])):
                    agree = k
                    break
            print(
                f"  greedy {prompt!r}: first {agree}/{len(ref_ids)} tokens equal to transformers'"
            )
            if agree < len(ref_ids):
                print(f"    ours:   {reference[:120]!r}\n    theirs: {body[:120]!r}")


if __name__ == "__main__":
    main()
