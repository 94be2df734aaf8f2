"""The model card (the bundle's README.md), one function per section, written from the stages'
records: model, training, data, evaluation, use and limits, how to load, llama.cpp, chat,
lineage, citation."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from tasks.common.records import DataCard, EvalResults, Gate, RunSummary
from tasks.common.summary import mixture_table
from tasks.release.config import ReleaseConfig


@dataclass(frozen=True)
class ReleaseInputs:
    """What a bundle is built from: the upstream stages' records and the model's own configs."""

    results: EvalResults
    card: DataCard
    run: RunSummary
    mixture: dict[str, dict]
    config: dict  # the model's config.json
    chat_template: str | None

    @property
    def gate(self) -> Gate:
        return self.results.gate


def model_card(
    cfg: ReleaseConfig,
    inputs: ReleaseInputs,
    lineage: dict,
    gguf: dict | None = None,
    report: str | None = None,
) -> str:
    """``report``: the evaluation's comparison.md, quoted under Evaluation."""
    sections = (
        front_matter(cfg, inputs),
        title(cfg, inputs),
        details_section(inputs),
        training_section(inputs),
        data_section(inputs),
        evaluation_section(report),
        USE_AND_LIMITS,
        load_section(cfg),
        gguf_section(gguf or {}),
        chat_section(cfg, inputs),
        lineage_section(lineage),
        citation(cfg),
    )
    return "\n".join(line for section in sections for line in section)


def front_matter(cfg: ReleaseConfig, inputs: ReleaseInputs) -> list[str]:
    """The Hub's metadata: license, tags, datasets and the model index of the scores that ran."""
    front = {
        "license": cfg.license.lower(),
        "language": ["en", "code"],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["llmforge", "llama", "causal-lm"],
        "datasets": [s.name for s in inputs.card.sources],
        "model-index": [
            {
                "name": f"{cfg.name}-{cfg.version}",
                "results": [
                    {
                        "task": {"type": "text-generation"},
                        "dataset": {"name": row.benchmark, "type": row.key},
                        "metrics": [{"type": row.metric, "value": round(row.ours, 2)}],
                    }
                    for row in inputs.results.comparison
                    if row.status == "ran" and row.ours is not None
                ],
            }
        ],
    }
    return ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]


def title(cfg: ReleaseConfig, inputs: ReleaseInputs) -> list[str]:
    lines = [f"# {cfg.name} {cfg.version}", ""]
    if not inputs.gate.passed:
        lines += [
            "> **Released despite a failed evaluation gate** (release.allow_failed_gate): "
            + "; ".join(inputs.gate.reasons),
            "",
        ]
    return lines


def details_section(inputs: ReleaseInputs) -> list[str]:
    mc = inputs.config
    return [
        "## Model details",
        "",
        f"- Architecture: Llama-style decoder (`LlamaForCausalLM`), {mc['num_hidden_layers']} "
        f"layers, hidden size {mc['hidden_size']}, {mc['num_attention_heads']} attention heads "
        f"({mc['num_key_value_heads']} key/value heads), SwiGLU, RoPE, RMSNorm",
        f"- Parameters: {inputs.run.params:,}",
        f"- Tokenizer: byte-level BPE, {mc['vocab_size']:,} tokens; context length "
        f"{mc['max_position_embeddings']}",
        "",
    ]


def training_section(inputs: ReleaseInputs) -> list[str]:
    run = inputs.run
    return [
        "## Training",
        "",
        f"- Tokens seen: {run.tokens_seen:,}",
        f"- Steps: {run.steps}; final train loss {run.final_loss}, validation loss {run.val_loss}",
        f"- Hardware: {run.processes} process(es) on {run.device}",
        "",
    ]


def data_section(inputs: ReleaseInputs) -> list[str]:
    card = inputs.card
    lines = [
        "## Data",
        "",
        "| source | license | documents in | documents out | quarantined | filtered | duplicates "
        "| contaminated |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in card.sources:
        lines.append(
            f"| {s.name} | {s.license} | {s.docs_in:,} | {s.docs_out:,} | {s.quarantined:,} | "
            f"{sum(s.filtered.values()):,} | {s.exact_duplicates + s.near_duplicates:,} | "
            f"{s.contaminated:,} |"
        )
    dec = card.decontamination
    removed = {k: v for k, v in sorted(card.filters.items()) if v}
    pii = {k: v for k, v in sorted(card.pii_replaced.items()) if v}
    return [
        *lines,
        "",
        "| filter | documents removed |",
        "|---|---:|",
        *(f"| {k.replace('_', ' ')} | {v:,} |" for k, v in removed.items()),
        *([] if removed else ["| (none) | 0 |"]),
        "",
        *mixture_table(inputs.mixture),
        "Personal data replaced by placeholders: "
        + (", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in pii.items()) or "none found")
        + f". Decontamination against {', '.join(dec.benchmarks) or 'nothing'} "
        f"({dec.ngram}-grams): {len(dec.hits)} document(s) removed.",
        "",
    ]


def evaluation_section(report: str | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if report:
        body = report.split("\n", 2)[2]  # drop the report's own title
        lines += [body.replace("## ", "### "), "![comparison](comparison.png)", ""]
    return lines


USE_AND_LIMITS = (
    "## Intended use",
    "",
    "Research and experimentation with a small model trained by the llmforge pipeline; not for "
    "production use.",
    "",
    "## Limitations",
    "",
    "A small model trained briefly: it does not approach GPT-4 on any benchmark above; it can "
    "produce incorrect, insecure or licensed code; benchmarks marked *not run* were not measured.",
    "",
)


def load_section(cfg: ReleaseConfig) -> list[str]:
    folder = f"{cfg.name}-{cfg.version}"
    return [
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tok = AutoTokenizer.from_pretrained("{folder}")',
        f'model = AutoModelForCausalLM.from_pretrained("{folder}")  # no trust_remote_code needed',
        "```",
        "",
    ]


def lineage_section(lineage: dict) -> list[str]:
    return [
        "## Lineage",
        "",
        f"- Git commit: `{lineage['git_commit']}`",
        f"- MLflow run: `{lineage['mlflow_run_id']}`",
        *(
            f"- DVC `{stage}`: " + ", ".join(f"`{k}` {v}" for k, v in outs.items())
            for stage, outs in lineage["dvc"].items()
        ),
        "- Params: see `manifest.json`",
        "",
    ]


def citation(cfg: ReleaseConfig) -> list[str]:
    return [
        "## Citation",
        "",
        "```bibtex",
        f"@misc{{{cfg.name.replace('-', '_')}_{cfg.version.replace('.', '_')},",
        f"  title = {{{cfg.name} {cfg.version}}},",
        "  note = {Trained and released with llmforge},",
        "}",
        "```",
        "",
    ]


def chat_section(cfg: ReleaseConfig, inputs: ReleaseInputs) -> list[str]:
    """How to chat with a chat model: its template in transformers and vLLM, and how it ends."""
    if not inputs.chat_template:
        return []
    chat = inputs.results.chat.benchmarks.get("humaneval") if inputs.results.chat else None
    score = (
        f" HumanEval through the template: pass@1 {chat.score:.1f}% (n={chat.n})."
        if chat is not None and chat.ran
        else ""
    )
    folder = f"{cfg.name}-{cfg.version}"
    return [
        "## Chat",
        "",
        "Fine-tuned from the base model on conversations (the finetune stage), with the chat "
        "template in `tokenizer_config.json`: `<|user|>`, `<|assistant|>` and `<|system|>` "
        "open a turn and `<|end|>` closes it; generation stops there (`eos_token_id` in "
        "`config.json` and `generation_config.json`)." + score,
        "",
        "```python",
        'msgs = [{"role": "user", "content": "Complete this Python function:\\n\\ndef add(a, b):"}]',
        "inputs = tok.apply_chat_template(",
        '    msgs, add_generation_prompt=True, return_dict=True, return_tensors="pt"',
        ")",
        "out = model.generate(**inputs, max_new_tokens=128)  # stops at <|end|>",
        "```",
        "",
        f"vLLM serves it with no extra flags: `vllm serve {folder}` answers "
        "`/v1/chat/completions` with this template; so does `python -m model.serve --model "
        f"{folder}` from llmforge. The template parses special tokens in message text (as every "
        "Hugging Face chat template does): a server should refuse messages that contain "
        "`<|end|>` or a role token, as model.serve does.",
        "",
    ]


def gguf_section(gguf: dict) -> list[str]:
    """How to run the bundle's GGUF files in llama.cpp (or why there are none)."""
    files = sorted(gguf.get("files", {}))
    if not files:
        return (
            ["## llama.cpp", "", f"No GGUF in this release: {gguf['skipped']}.", ""]
            if gguf.get("skipped")
            else []
        )
    smallest = next((f for f in files if f.endswith("-q8_0.gguf")), files[0])
    return [
        "## llama.cpp",
        "",
        f"GGUF files: {', '.join(f'`{f}`' for f in files)} (written with the `gguf` package, "
        "read back and compared with the safetensors and the tokenizer before release).",
        "",
        "```bash",
        f'llama-cli -m {smallest} -p "def fibonacci(n):" -n 64 --temp 0',
        "```",
        "",
    ]
