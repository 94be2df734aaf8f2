"""Export to a Hugging Face ``LlamaForCausalLM`` folder (config.json, model.safetensors,
generation_config.json, tokenizer files), loadable offline with no custom code, and a check that
transformers computes the same logits as our model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from model.config import ModelConfig
from model.model import Llama
from tasks.common.chat import CHAT_TEMPLATE, END
from tasks.common.storage import atomic_dir


class ExportCheckError(RuntimeError):
    pass


def hf_config(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k == "lm_head.weight":
            if cfg.tie_embeddings:
                continue  # tied: transformers re-ties it to model.embed_tokens.weight
            out[k] = v
        else:
            out[f"model.{k}"] = v
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(out.items())}


def from_hf(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our model's config and state dict from one of our exports (the inverse of the above): the
    finetune stage starts from the base model this way."""
    from safetensors.torch import load_file

    folder = Path(folder)
    c = json.loads((folder / "config.json").read_text())
    cfg = ModelConfig(
        vocab_size=c["vocab_size"],
        n_layer=c["num_hidden_layers"],
        n_head=c["num_attention_heads"],
        n_kv_head=c["num_key_value_heads"],
        d_model=c["hidden_size"],
        ffn_hidden=c["intermediate_size"],
        max_seq_len=c["max_position_embeddings"],
        rope_theta=c["rope_theta"],
        norm_eps=c["rms_norm_eps"],
        tie_embeddings=c["tie_word_embeddings"],
        init_std=c["initializer_range"],
    )
    state = {
        k.removeprefix("model."): v for k, v in load_file(folder / "model.safetensors").items()
    }
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return cfg, state


def export(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    tol: float = 1e-4,
    chat: bool = False,
) -> float:
    """Write the folder atomically; return the max |logit difference| vs transformers. A chat
    model's tokenizer carries the chat template (tasks/common/chat.py), ends a sequence at ``<|end|>``
    (config, generation config and tokenizer agree) and parses special tokens in text, as
    ``apply_chat_template`` needs; a base model's tokenizer splits them into bytes."""
    from safetensors.torch import save_file

    tok_dir = Path(tokenizer_dir)
    tok_cfg = json.loads((tok_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok_cfg["added_tokens"]}
    tcfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    smap = json.loads((tok_dir / "special_tokens_map.json").read_text())
    bos, eos, pad = ids[tcfg["bos_token"]], ids[tcfg["eos_token"]], ids[tcfg["pad_token"]]
    stop: int | list[int] = eos
    if chat:
        tcfg |= {"chat_template": CHAT_TEMPLATE, "eos_token": END, "split_special_tokens": False}
        smap |= {"eos_token": END}
        eos, stop = ids[END], [ids[END], eos]
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(
            json.dumps(hf_config(cfg, bos, eos, pad), indent=2, sort_keys=True) + "\n"
        )
        # No length here: a max_length clashes with every generate(max_new_tokens=...) and a
        # max_new_tokens with every caller that passes max_length (lm-eval does); both warn. The
        # context length is the config's max_position_embeddings.
        gen = {"bos_token_id": bos, "eos_token_id": stop, "pad_token_id": pad, "do_sample": False}
        (tmp / "generation_config.json").write_text(
            json.dumps(gen, indent=2, sort_keys=True) + "\n"
        )
        save_file(
            hf_state_dict(state, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        shutil.copy2(tok_dir / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "special_tokens_map.json").write_text(
            json.dumps(smap, indent=2, sort_keys=True) + "\n"
        )
        # One context length: the tokenizer's model_max_length is the model's, so truncation and
        # length warnings agree with max_position_embeddings.
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(tcfg | {"model_max_length": cfg.max_seq_len}, indent=2, sort_keys=True)
            + "\n"
        )
        diff = compare_with_transformers(state, cfg, tmp)
        if diff > tol:
            raise ExportCheckError(
                f"exported model disagrees with ours: max |logit diff| {diff:.2e} > {tol:.0e}"
            )
    return diff


@torch.no_grad()
def compare_with_transformers(
    state: dict[str, torch.Tensor], cfg: ModelConfig, folder: Path, seed: int = 0
) -> float:
    from transformers import LlamaForCausalLM

    ours = Llama(cfg)
    ours.load_state_dict({k: v.float() for k, v in state.items()})
    ours.eval()
    hf = LlamaForCausalLM.from_pretrained(str(folder), local_files_only=True)
    hf.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (2, min(64, cfg.max_seq_len)), generator=g)
    return float((ours(x) - hf(x).logits).abs().max())
