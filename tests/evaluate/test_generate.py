"""Evaluation's model paths on a small random Llama: greedy generation (batched, KV cache, never
past the context) and shared-context scoring, each against the plain one-sequence computation."""

from __future__ import annotations

import pytest
import torch

from tasks.evaluate.generate import greedy_generate
from tasks.evaluate.lm import shared_context_lls

CONTEXT = 48


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
    )
    m = LlamaForCausalLM(cfg).eval()
    seen = {"max_pos": -1, "max_len": 0}

    def spy(module, args, kwargs):  # the widest position and sequence the model is ever given
        pos = kwargs.get("position_ids")
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        if pos is not None:
            seen["max_pos"] = max(seen["max_pos"], int(pos.max()))
        seen["max_len"] = max(seen["max_len"], past + ids.shape[1])

    m.register_forward_pre_hook(spy, with_kwargs=True)
    m.seen = seen
    return m


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """One sequence, no cache: the full forward pass at every step."""
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 9, 17, 30, 5, 12, 25, 8, 60, 41][:n]
    return [torch.randint(0, 97, (k,), generator=g).tolist() for k in lengths]


def test_batched_generation_equals_one_sequence_without_cache(model):
    ps = prompts(8)
    keep = CONTEXT - 10
    batched = greedy_generate(
        model, ps, max_new_tokens=10, context=CONTEXT, batch_size=4, pad_id=0, eos_id=None
    )
    single = greedy_generate(
        model, ps, max_new_tokens=10, context=CONTEXT, batch_size=1, pad_id=0, eos_id=None
    )
    assert batched.tokens == single.tokens
    for p, got in zip(ps, batched.tokens, strict=True):
        assert got == reference_greedy(model, p[-keep:], 10)
    assert batched.new_tokens == 80 and batched.truncated == 0


def test_generation_never_exceeds_the_context(model):
    ps = prompts(10)  # two of them (60 and 41 tokens) are longer than the 32 tokens left
    model.seen.update(max_pos=-1, max_len=0)
    out = greedy_generate(
        model, ps, max_new_tokens=16, context=CONTEXT, batch_size=3, pad_id=0, eos_id=None
    )
    assert out.truncated == 2
    assert all(len(t) == 16 for t in out.tokens)
    assert model.seen["max_len"] <= CONTEXT and model.seen["max_pos"] <= CONTEXT - 1
    with pytest.raises(ValueError, match="leaves no room"):
        greedy_generate(
            model, ps, max_new_tokens=CONTEXT, context=CONTEXT, batch_size=1, pad_id=0, eos_id=None
        )


def test_stop_condition_and_eos_end_a_row_early(model):
    ps = prompts(4)
    free = greedy_generate(
        model, ps, max_new_tokens=12, context=CONTEXT, batch_size=4, pad_id=0, eos_id=None
    )
    stop_tok = free.tokens[1][2]
    out = greedy_generate(
        model,
        ps,
        max_new_tokens=12,
        context=CONTEXT,
        batch_size=4,
        pad_id=0,
        eos_id=None,
        stop=lambda toks: toks[-1] == stop_tok,
    )
    for full, cut in zip(free.tokens, out.tokens, strict=True):
        k = full.index(stop_tok) + 1 if stop_tok in full else len(full)
        assert cut == full[:k]  # the other rows go on unchanged after one leaves the batch
    eos = greedy_generate(
        model, ps, max_new_tokens=12, context=CONTEXT, batch_size=4, pad_id=0, eos_id=stop_tok
    )
    assert eos.tokens[1] == free.tokens[1][:2]  # EOS itself is not part of the completion


def test_shared_context_scores_equal_one_forward_per_choice(model):
    ctx = prompts(1, seed=3)[0] + prompts(1, seed=4)[0]
    conts = [[5], [7, 8, 9], [11, 12], [40, 41, 42, 43, 44]]
    got = shared_context_lls(model, conts, ctx, pad_id=0)
    with torch.inference_mode():
        for (ll, greedy), c in zip(got, conts, strict=True):
            seq = torch.tensor([ctx + c])
            logp = torch.log_softmax(model(input_ids=seq[:, :-1]).logits[0].float(), -1)
            rows = logp[len(ctx) - 1 :]
            want = float(rows.gather(1, torch.tensor(c)[:, None]).sum())
            assert ll == pytest.approx(want, abs=1e-4)
            assert greedy == bool((rows.argmax(-1) == torch.tensor(c)).all())
