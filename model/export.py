"""Export to a Hugging Face ``LlamaForCausalLM`` folder (config.json, model.safetensors,
generation_config.json, tokenizer files), loadable offline with no custom code, and a check that
transformers computes the same logits as our model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from model.model import Llama, ModelConfig
from tasks.storage import atomic_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


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


def export(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    tol: float = 1e-4,
) -> float:
    """Write the folder atomically; return the max |logit difference| vs transformers."""
    from safetensors.torch import save_file

    tok_dir = Path(tokenizer_dir)
    tok_cfg = json.loads((tok_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok_cfg["added_tokens"]}
    tcfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    bos, eos, pad = ids[tcfg["bos_token"]], ids[tcfg["eos_token"]], ids[tcfg["pad_token"]]
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(
            json.dumps(hf_config(cfg, bos, eos, pad), indent=2, sort_keys=True) + "\n"
        )
        # No length here: a max_length clashes with every generate(max_new_tokens=...) and a
        # max_new_tokens with every caller that passes max_length (lm-eval does); both warn. The
        # context length is the config's max_position_embeddings.
        gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False}
        (tmp / "generation_config.json").write_text(
            json.dumps(gen, indent=2, sort_keys=True) + "\n"
        )
        save_file(
            hf_state_dict(state, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        for name in TOKENIZER_FILES:
            shutil.copy2(tok_dir / name, tmp / name)
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
