"""Training-step throughput: our model vs transformers' LlamaForCausalLM, same config, batch and
optimizer, in one run on the same machine; and our MFU against this device's peak.

CPU (default): fp32, peak = the theoretical fp32 roof of this CPU (cores x clock x vector FLOPs
               per cycle); also shown against the best fp32 matmul timed in the same run.
GPU variant:   .venv/bin/python -m bench.train_throughput --device cuda --dtype bfloat16 --compile --preset 125m
               (peak = the datasheet bf16 FLOP/s of the GPU; runs in a few minutes on an H100).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model.config import ModelConfig
from model.export import hf_config
from model.metrics import device_peak
from model.model import Llama
from tasks.common.env import apply_offline_defaults


def step_fn(model, optim, x, y, hf: bool, autocast):
    def step():
        with autocast:
            if hf:
                logits = model(input_ids=x).logits
                loss = torch.nn.functional.cross_entropy(
                    logits.float().view(-1, logits.size(-1)), y.reshape(-1)
                )
            else:
                _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss

    return step


def timed(step, n_warmup: int, n_steps: int, device) -> float:
    for _ in range(n_warmup):
        step()
    times = []
    for _ in range(n_steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    apply_offline_defaults()
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--compile", action="store_true", help="also time our model under torch.compile"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    cfg = ModelConfig.preset(args.preset, vocab_size=args.vocab, max_seq_len=args.seq)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    tokens = args.batch * args.seq
    fused = device.type == "cuda"

    torch.manual_seed(0)
    ours = Llama(cfg).to(device)
    flops_tok = ours.flops_per_token(args.seq)
    from transformers import LlamaConfig, LlamaForCausalLM

    hcfg = hf_config(cfg, 0, 1, 2)
    hcfg.pop("architectures")
    hcfg.pop("model_type")
    hcfg.pop("torch_dtype")
    hf = LlamaForCausalLM(LlamaConfig(**hcfg, attn_implementation="sdpa")).to(device)
    hf.load_state_dict(
        {("model." + k if k != "lm_head.weight" else k): v for k, v in ours.state_dict().items()},
        strict=False,
    )

    peak, src = device_peak(device)
    print(
        f"model {args.preset}: {ours.num_params() / 1e6:.1f}M params, {flops_tok / 1e6:.1f} MFLOP/token, "
        f"batch {args.batch}x{args.seq}, {args.dtype} on {device}; peak {peak / 1e9:,.0f} GFLOP/s ({src})"
    )
    rows = []
    for name, model, is_hf in (
        ("transformers LlamaForCausalLM", hf, True),
        ("ours (eager)", ours, False),
    ):
        optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        dt = timed(step_fn(model, optim, x, y, is_hf, autocast), args.warmup, args.steps, device)
        rows.append((name, tokens / dt))
    if args.compile:
        torch.manual_seed(0)
        comp = Llama(cfg).to(device)
        for i, block in enumerate(comp.layers):
            comp.layers[i] = torch.compile(block)
        optim = torch.optim.AdamW(comp.parameters(), lr=1e-4, fused=fused)
        step = step_fn(comp, optim, x, y, False, autocast)
        t0 = time.perf_counter()
        step()  # compiles forward and backward
        first = time.perf_counter() - t0
        dt = timed(step, args.warmup + 1, args.steps, device)
        rows.append(("ours (torch.compile per block)", tokens / dt))
        eager_dt = tokens / rows[1][1]
        saved = eager_dt - dt
        print(
            f"compile: first step {first:.1f} s (eager step {eager_dt:.2f} s, compiled {dt:.2f} s): "
            + (
                f"pays for itself after {(first - dt) / saved:.0f} steps"
                if saved > 0
                else "never pays for itself at this shape"
            )
        )
    base = rows[0][1]
    for name, tps in rows:
        print(
            f"{name:<34} {tps:10,.0f} tokens/s  {tps / base:5.2f}x transformers  MFU {100 * tps * flops_tok / peak:5.1f}%"
        )
    best = max(rows[1:], key=lambda r: r[1])
    achieved = best[1] * flops_tok
    matmul = ""
    if device.type == "cpu":  # the practical roof, timed now (the machine's load drifts)
        n = 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        roof = 2 * n**3 / min(timed(lambda: a @ b, 1, 5, device) for _ in range(3))
        matmul = f", {100 * achieved / roof:.1f}% of this run's best fp32 matmul ({roof / 1e9:,.0f} GFLOP/s)"
    print(
        f"best: {best[0]}: {best[1] / base:.2f}x transformers' tokens/s (target >= 1.2x), "
        f"MFU {100 * achieved / peak:.1f}% of the {'theoretical' if device.type == 'cpu' else 'datasheet'} "
        f"peak (target >= 45% on H100){matmul}"
    )


if __name__ == "__main__":
    main()
