"""Greedy decoding for evaluation: batched, with the KV cache, never past the model's context.

Prompts are sorted by length and decoded in batches (left-padded, positions counted from each
row's first real token). Each step feeds one token per live row through the cache; rows that hit
EOS or a stop condition leave the batch (their cache rows are dropped), so one long completion does
not make the others pay. A prompt longer than ``context - max_new_tokens`` keeps its last tokens
and is counted as truncated: prompt plus completion never exceed the context.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tasks.common.summary import Progress


@dataclass
class Generation:
    tokens: list[list[int]]  # the completion of each prompt, in the prompts' order
    truncated: int  # prompts cut from the left to fit the context
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def cache_kwarg(model) -> str:
    """The name a Hugging Face model's forward takes its KV cache by: ``cache`` in transformers 5,
    ``past_key_values`` in 4.x."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    context: int,
    batch_size: int,
    pad_id: int,
    eos_id: int | None,
    stop: Callable[[list[int]], bool] | None = None,
    progress: Progress | None = None,
) -> Generation:
    """Greedy completions of token-id prompts with a Hugging Face causal LM."""
    import torch
    from transformers import DynamicCache

    if max_new_tokens >= context:
        raise ValueError(
            f"max_new_tokens {max_new_tokens} leaves no room in a {context}-token context"
        )
    keep = context - max_new_tokens
    cut = [list(p[-keep:]) if len(p) > keep else list(p) for p in prompts]
    truncated = sum(len(p) > keep for p in prompts)
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(cut)), key=lambda i: (-len(cut[i]), i))
    device = next(model.parameters()).device
    cache_kw = cache_kwarg(model)
    t0, n_new = time.monotonic(), 0
    with torch.inference_mode():
        for b0 in range(0, len(order), batch_size):
            rows = order[b0 : b0 + batch_size]
            width = max(len(cut[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                if cut[i]:
                    ids[r, width - len(cut[i]) :] = torch.tensor(cut[i])
                    mask[r, width - len(cut[i]) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache()
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_kw: cache}
            ).logits[:, -1]
            live = list(range(len(rows)))  # batch row -> index into rows
            last = pos[:, -1]
            for step in range(max_new_tokens):
                nxt = logits.argmax(-1)
                still = []
                for r, tok in enumerate(nxt.tolist()):
                    i = rows[live[r]]
                    n_new += 1
                    if tok == eos_id:
                        continue
                    out[i].append(tok)
                    if not (stop is not None and stop(out[i])):
                        still.append(r)
                if not still or step == max_new_tokens - 1:
                    break
                if len(still) < len(live):
                    sel = torch.tensor(still, device=device)
                    cache.batch_select_indices(sel)
                    nxt, mask, last = nxt[sel], mask[sel], last[sel]
                    live = [live[r] for r in still]
                mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
                last = last + 1
                logits = model(
                    input_ids=nxt[:, None],
                    attention_mask=mask,
                    position_ids=last[:, None],
                    **{cache_kw: cache},
                ).logits[:, -1]
            if progress is not None:
                progress.advance(len(rows), f", {n_new / (time.monotonic() - t0):.0f} tokens/s")
    return Generation(out, truncated, n_new, time.monotonic() - t0)
