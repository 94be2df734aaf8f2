"""Held-out loss: the model on the val token shards, in nats and bits per token and bits per byte."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tasks.evaluate.config import EvaluateConfig
from tasks.evaluate.lm import EvalLM


def heldout_perplexity(cfg: EvaluateConfig, lm: EvalLM) -> dict:
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
