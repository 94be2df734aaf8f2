"""One run of the GPU check: the real trainer (model/trainer.py) for a few hundred steps of one
preset and one parallelism on the packed demo shards, under torchrun. Prints one JSON line:
tokens/s, MFU against the device's bf16 peak, peak memory, and the per-step losses (which
bench/gpu_check.sh compares between DDP and FSDP2).

    torchrun --standalone --nproc_per_node=1 -m bench.gpu_check --preset 350m --parallel fsdp

On a CPU (``--device cpu``) it runs the same path in fp32, which is how the test suite keeps this
script working on machines without a GPU."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.trainer import Trainer
from tasks.params import load_params


def report(path: str, tol: float = 0.05) -> int:
    """The results as a table, and DDP vs FSDP2 per preset: the same per-step losses within
    ``tol`` (bf16 and compiled kernels are not bitwise deterministic). Exit status 1 if not."""
    rows = [
        json.loads(line) for line in Path(path).read_text().splitlines() if line.startswith("{")
    ]
    print(
        f"{'preset':<7} {'parallel':<8} {'params':>8} {'tokens/s':>11} {'MFU':>7} {'peak mem':>9}  peak"
    )
    for r in rows:
        mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "-"
        print(
            f"{r['preset']:<7} {r['parallel']:<8} {r['params_m']:>7}M {r['tokens_per_s']:>11,} "
            f"{100 * r['mfu']:>6.1f}% {mem:>9}  {r['peak']}"
        )
    ok = True
    for preset in dict.fromkeys(r["preset"] for r in rows):
        runs = {r["parallel"]: r["losses"] for r in rows if r["preset"] == preset}
        if {"ddp", "fsdp"} <= runs.keys():
            diff = max(abs(a - b) for a, b in zip(runs["ddp"], runs["fsdp"], strict=True))
            same = diff <= tol
            ok &= same
            print(
                f"{preset}: DDP vs FSDP2 losses at {len(runs['ddp'])} log steps: max |diff| "
                f"{diff:.2e} ({'equal' if same else 'DIFFERENT'} within {tol}); "
                f"last {runs['ddp'][-1]:.4f} vs {runs['fsdp'][-1]:.4f}"
            )
    return 0 if ok else 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1, help="micro-steps per step, per process")
    ap.add_argument("--tokens", default="data/tokens")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--compile", default="true", choices=["true", "false"])
    ap.add_argument("--report", help="print the table and the DDP/FSDP2 check of a results file")
    args = ap.parse_args()

    if args.report:
        sys.exit(report(args.report))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {
            "tokens_dir": args.tokens,
            "ckpt_dir": f"{tmp}/ckpt",
            "log_file": f"{tmp}/log.jsonl",
            "preset": args.preset,
            "parallel": args.parallel,
            "device": args.device,
            "dtype": "bfloat16" if args.device == "cuda" else "float32",
            "compile": args.compile,
            "seq_len": args.seq,
            "micro_batch": args.micro_batch,
            "global_batch_tokens": args.seq * args.micro_batch * args.accum * world,
            "max_steps": args.steps,
            "warmup_steps": max(args.steps // 10, 1),
            "lr": 6e-4,
            "log_every": max(args.steps // 10, 1),
            "eval_every": 10**9,
            "ckpt_every": 10**9,  # one checkpoint, at the end: the save path runs too
            "keep_last": 1,
        }
        params = load_params("params.yaml", [f"train.{k}={v}" for k, v in overrides.items()])
        rank0 = int(os.environ.get("RANK", "0")) == 0
        log = (lambda m: print(m, file=sys.stderr, flush=True)) if rank0 else (lambda m: None)
        t0 = time.perf_counter()
        trainer = Trainer(params.train, log)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = trainer.fit()
        wall = time.perf_counter() - t0
        records = [json.loads(x) for x in Path(f"{tmp}/log.jsonl").read_text().splitlines()]
    timed = records[1:] or records  # the first interval holds the compile
    tps = sum(r["tokens_per_s"] for r in timed) / len(timed)
    out = {
        "preset": args.preset,
        "parallel": args.parallel,
        "processes": world,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": str(trainer.dtype).removeprefix("torch."),
        "compiled": trainer.compiled,
        "params_m": round(result.n_params / 1e6, 1),
        "steps": result.steps,
        "tokens_per_s": round(tps),
        "mfu": round(sum(r["mfu"] for r in timed) / len(timed), 4),
        "peak": result.peak_source,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if args.device == "cuda"
        else None,
        "wall_s": round(wall, 1),
        "losses": [round(r["loss"], 5) for r in records],
    }
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
