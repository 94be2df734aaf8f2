"""GGUF for llama.cpp (and the tools built on it: Ollama, LM Studio, llama-cpp-python), written
with the ``gguf`` package from the exported Hugging Face folder, and read back before it counts.

What llama.cpp's own converter (``convert_hf_to_gguf.py``) would write for a LlamaForCausalLM,
without its vocabulary-hash check (it only knows tokenizers it has seen, and ours is trained here):
- tensors under GGUF's names; the query and key projections permuted from Hugging Face's
  rotate-half layout to GGML's interleaved rotary layout (the converter's ``permute``);
- f16 matrices (or q8_0 blocks) and f32 norms, as the converter does;
- the tokenizer as a byte-level BPE ("gpt2") with the ``llama-bpe`` pre-tokenizer: Llama 3's split
  regex, which splits exactly as our GPT-4-style pattern does. A tokenizer trained with another
  split pattern has no llama.cpp pre-tokenizer, and no GGUF is written for it.

The read-back (``check_gguf``) compares every tensor with the safetensors (undoing the
permutation) and rebuilds a tokenizer from the GGUF's tokens and merges alone, which must give
our tokenizer's ids on a sample of texts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from tasks.tokenize.config import GPT4_SPLIT_PATTERN, SPLIT_PATTERN

# The split patterns known to equal llama.cpp's `llama-bpe` pre-tokenizer.
LLAMA_BPE_PATTERNS = frozenset({SPLIT_PATTERN, GPT4_SPLIT_PATTERN})


class GGUFError(RuntimeError):
    pass


class NoPreTokenizer(GGUFError):
    """llama.cpp has no pre-tokenizer for the tokenizer's split pattern: no GGUF can be written."""


def _split_pattern(tokenizer: dict) -> str | None:
    pre = tokenizer.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split":
            return p["pattern"].get("Regex")
    return None


def gguf_pre_tokenizer(tokenizer: dict) -> str:
    """llama.cpp's name for our pre-tokenizer, or GGUFError saying why there is none."""
    pattern = _split_pattern(tokenizer)
    if pattern not in LLAMA_BPE_PATTERNS:
        raise NoPreTokenizer(
            "the tokenizer's split pattern has no llama.cpp pre-tokenizer (only the default "
            "tokenize.split_pattern maps to llama-bpe); no GGUF was written"
        )
    return "llama-bpe"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rotate-half (Hugging Face) -> interleaved (GGML) rows of a q or k projection."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    m = _LAYER.match(hf_name)
    if not m or m.group(2) not in _NAMES:
        raise GGUFError(f"no GGUF name for tensor {hf_name}")
    return f"blk.{m.group(1)}.{_NAMES[m.group(2)]}"


def gguf_tensors(folder: str | Path) -> dict[str, np.ndarray]:
    """The Hugging Face folder's weights as GGUF name -> f32 array in GGUF's layout (q/k
    permuted): what ``write_gguf`` writes and ``check_gguf`` compares with; compute it once."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    out = {}
    for name, w in load_file(str(folder / "model.safetensors")).items():
        w = w.astype(np.float32)
        if name.endswith("q_proj.weight"):
            w = permute(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = permute(w, config["num_key_value_heads"])
        out[gguf_name(name)] = w
    return out


def write_gguf(
    folder: str | Path,
    out_path: str | Path,
    name: str,
    kind: str,
    tensors: dict[str, np.ndarray],
) -> Path:
    """Write ``out_path`` (``kind``: f16 or q8_0) from the Hugging Face folder ``folder`` and its
    ``gguf_tensors``."""
    import gguf

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    pre = gguf_pre_tokenizer(tok)
    arch = "llama"
    w = gguf.GGUFWriter(str(out_path), arch)
    w.add_name(name)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    w.add_file_type(file_type)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_vocab_size(config["vocab_size"])

    # Tokenizer: every id in order (BPE vocabulary and added tokens), its merges, its specials.
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(config["vocab_size"])):
        raise GGUFError("the tokenizer's ids are not 0..vocab_size-1 without gaps")
    special = {t["content"] for t in tok["added_tokens"] if t.get("special")}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in by_id])
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in by_id]
    )
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_token_merges(merges)
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_pad_token_id(config["pad_token_id"])
    w.add_add_bos_token(bool(tok_cfg.get("add_bos_token", False)))
    w.add_add_eos_token(bool(tok_cfg.get("add_eos_token", False)))
    if tok_cfg.get("chat_template"):  # llama.cpp applies it in llama-cli and llama-server
        w.add_chat_template(tok_cfg["chat_template"])

    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    for gname, arr in tensors.items():
        if arr.ndim == 1:  # norms stay f32, as the converter keeps them
            w.add_tensor(gname, arr)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, arr.astype(np.float16))
        elif arr.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:  # rows that do not fill whole q8_0 blocks: f16, as the converter falls back
            w.add_tensor(gname, arr.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out_path)


def sample_texts() -> list[str]:
    """Texts for the tokenizer round trip: code and prose from the standard library, and the
    corners of the split pattern (contractions, digit runs, blank lines, CRLF, tabs, non-Latin)."""
    import argparse
    import email
    import json as json_module

    texts = [
        Path(m.__file__).read_text(encoding="utf-8")[:6000] for m in (argparse, email, json_module)
    ]
    return texts + [
        "It's a dog's life: they'll say we've done what I'd done, and THEY'RE right.",
        "x = 1234567 + 89\n\n\n    return x\r\n\tpass  \n",
        "Ünïcödé, 日本語のテキスト, Ελληνικά, emoji 🙂 and <|eos|> as plain text",
    ]


def check_gguf(
    gguf_path: str | Path, folder: str | Path, texts: list[str], expected: dict[str, np.ndarray]
) -> dict:
    """Read ``gguf_path`` back and compare it with the Hugging Face folder: every tensor against
    ``expected`` (its ``gguf_tensors``: name, shape, values: exact for f16, exactly the
    quantizer's blocks for q8_0) and the tokenizer (ids of ``texts`` from a tokenizer rebuilt out
    of the GGUF's tokens and merges alone). Returns the figures; GGUFError names the first
    difference."""
    import gguf
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    reader = gguf.GGUFReader(str(gguf_path))
    seen, worst = set(), 0.0
    for t in reader.tensors:
        if t.name not in expected:
            raise GGUFError(f"{gguf_path}: unexpected tensor {t.name}")
        want = expected[t.name]
        got = (
            gguf.quants.dequantize(t.data, t.tensor_type)
            if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            else np.asarray(t.data, dtype=np.float32)
        ).reshape(want.shape)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            ok = np.array_equal(got, want)
        elif t.tensor_type == gguf.GGMLQuantizationType.F16:
            ok = np.array_equal(got, want.astype(np.float16).astype(np.float32))
        else:  # q8_0: exactly the blocks the quantizer makes of the safetensors' values
            ok = np.array_equal(
                got,
                gguf.quants.dequantize(
                    gguf.quants.quantize(want, t.tensor_type), t.tensor_type
                ).reshape(want.shape),
            )
            worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)))
        if not ok:
            raise GGUFError(f"{gguf_path}: tensor {t.name} differs from the safetensors")
        seen.add(t.name)
    if seen != set(expected):
        raise GGUFError(f"{gguf_path}: tensors missing: {', '.join(sorted(set(expected) - seen))}")

    def field(key: str):
        return reader.fields[key].contents()

    tokens = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    if field("llama.context_length") != config["max_position_embeddings"]:
        raise GGUFError(f"{gguf_path}: context length differs from config.json")
    # A tokenizer from the GGUF alone: its vocabulary and merges, Llama 3's split regex
    # (llama-bpe), byte-level bytes; it must give our tokenizer's ids.
    llama3 = (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
        r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    rebuilt = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
    rebuilt.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(llama3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    rebuilt.decoder = decoders.ByteLevel()
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ours.encode_special_tokens = True
    for text in texts:
        a, b = ours.encode(text).ids, rebuilt.encode(text).ids
        if a != b:
            raise GGUFError(
                f"{gguf_path}: the GGUF's tokenizer splits {text[:40]!r} differently "
                f"({len(b)} ids vs our {len(a)})"
            )
    return {
        "tensors": len(seen),
        "tokens": len(tokens),
        "texts_checked": len(texts),
        "q8_0_max_relative_error": round(worst, 5),
    }
