"""Unit tests of model/model.py: shapes, causality, grouped-query attention and rotary embeddings
against transformers' Llama, on the debug model (seconds on a CPU)."""

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.export import hf_config, hf_state_dict
from model.model import Llama, apply_rope, rope_cache

VOCAB, T = 97, 16


@pytest.fixture
def cfg() -> ModelConfig:
    return ModelConfig.preset("debug", vocab_size=VOCAB, max_seq_len=T)


@pytest.fixture
def model(cfg) -> Llama:
    torch.manual_seed(0)
    return Llama(cfg).eval()


def tokens(batch: int = 2, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_loss(model, cfg):
    x, y = tokens(), tokens(seed=1)
    logits, loss = model(x, y)
    assert logits.shape == (2, T, VOCAB) and loss.dim() == 0
    assert loss.item() == pytest.approx(
        F.cross_entropy(logits.view(-1, VOCAB), y.view(-1)).item(), rel=1e-6
    )
    # A fresh model predicts near-uniformly: its loss on unrelated targets is close to ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.2
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(tokens(length=T + 1))


def test_presets_are_shapes_and_the_context_comes_from_the_run():
    for name in ("debug", "tiny", "small", "125m", "350m", "1b"):
        assert ModelConfig.preset(name, vocab_size=VOCAB, max_seq_len=777).max_seq_len == 777
    assert ModelConfig.preset("125m", vocab_size=VOCAB, max_seq_len=T).n_layer == 12
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        ModelConfig.preset("huge", vocab_size=VOCAB, max_seq_len=T)


@torch.no_grad()
def test_causal_mask_future_tokens_change_nothing_before_them(model):
    x = tokens()
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % VOCAB
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


@torch.no_grad()
def test_grouped_query_attention_matches_per_head_reference(model, cfg):
    attn = model.layers[0].self_attn
    assert cfg.n_kv_head < cfg.n_head  # the debug model is a GQA model
    x = torch.randn(1, T, cfg.d_model, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_cache(cfg, T)
    hd, group = cfg.head_dim, cfg.n_head // cfg.n_kv_head
    q = attn.q_proj(x).view(1, T, cfg.n_head, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, T, cfg.n_kv_head, hd).transpose(1, 2)
    v = attn.v_proj(x).view(1, T, cfg.n_kv_head, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(cfg.n_head):  # query head h reads key/value head h // group
        scores = q[0, h] @ k[0, h // group].T / hd**0.5
        heads.append(scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[0, h // group])
    ref = attn.o_proj(torch.cat(heads, dim=-1).unsqueeze(0))
    assert torch.allclose(attn(x, cos, sin), ref, atol=1e-5)


@torch.no_grad()
def test_rope_equals_transformers(cfg):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf = LlamaConfig(**hf_config(cfg, 1, 2, 0))
    q = torch.randn(2, cfg.n_head, T, cfg.head_dim)
    k = torch.randn(2, cfg.n_kv_head, T, cfg.head_dim)
    cos_hf, sin_hf = LlamaRotaryEmbedding(hf)(q, torch.arange(T).expand(2, T))
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    cos, sin = rope_cache(cfg, T)
    assert torch.allclose(apply_rope(q, cos, sin), q_hf, atol=1e-6)
    assert torch.allclose(apply_rope(k, cos, sin), k_hf, atol=1e-6)


@torch.no_grad()
def test_whole_model_equals_transformers_llama(model, cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**hf_config(cfg, 1, 2, 0))).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model.state_dict(), cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: re-tied by transformers
    hf.tie_weights()
    x = tokens()
    assert (model(x) - hf(x).logits).abs().max() < 1e-5


def test_flops_per_token_counts_matmul_weights_once(cfg):
    m = Llama(cfg)
    n = m.num_params()  # tied: the embedding and lm_head are one tensor, counted once
    attn = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
    assert m.flops_per_token(T) == 6 * n + attn
    untied = Llama(
        ModelConfig.preset("debug", vocab_size=VOCAB, max_seq_len=T, tie_embeddings=False)
    )
    assert untied.num_params() == n + VOCAB * cfg.d_model
    assert untied.flops_per_token(T) == 6 * (untied.num_params() - VOCAB * cfg.d_model) + attn
