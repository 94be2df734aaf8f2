"""The finetune stage's data: conversations -> ``data/sft`` (rendered, one per row, with loss
masks), and the plumbing around the trainer run.

Conversations come from the sources in ``finetune.sources``: ``uri: corpus`` derives them from the
cleaned corpus, deterministically and with no download (a Python function's signature and
docstring as the request, the function as the answer; the function without its docstring as the
request, the docstring's summary as the answer), from training-split documents only; any other
uri is read like an ingest source, records holding a ``messages`` list. Every conversation is
checked (tasks/common/chat.py), decontaminated against the evaluation sets like the corpus,
deduplicated, split into train and val by hash and rendered; what fails is quarantined with its
reason and counted, and the stage goes on.
"""

from __future__ import annotations

import ast
import hashlib
import json
import textwrap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.common.chat import COMPLETE_REQUEST, Renderer, pack_rows, problem
from tasks.common.errors import UserError
from tasks.common.storage import S3Settings, atomic_dir, sha256_file
from tasks.finetune.config import ChatSourceConfig, FinetuneConfig
from tasks.tokenize.corpus import is_val, parquet_parts

if TYPE_CHECKING:
    from tasks.params import Params

EXPLAIN = "What does this Python function do?\n\n"


class FinetuneError(UserError):
    """No usable conversations, or inputs missing: the message says what to change."""


def function_conversations(text: str, max_chars: int) -> list[list[dict]]:
    """Conversations about the documented functions of one Python module (none when it does not
    parse): complete a function from its signature and docstring, and summarise a function."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or len(node.body) < 2:
            continue
        doc = ast.get_docstring(node)
        first = node.body[0]
        if not doc or not isinstance(first, ast.Expr) or node.end_lineno is None:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        source = textwrap.dedent("".join(lines[start - 1 : node.end_lineno])).strip()
        if len(source) > max_chars or first.end_lineno is None:
            continue
        header = textwrap.dedent("".join(lines[start - 1 : first.end_lineno])).strip()
        bare = textwrap.dedent(
            "".join(lines[start - 1 : first.lineno - 1] + lines[first.end_lineno : node.end_lineno])
        ).strip()
        summary = doc.strip().split("\n\n")[0].strip()
        out.append(
            [
                {"role": "user", "content": COMPLETE_REQUEST + header},
                {"role": "assistant", "content": source},
            ]
        )
        if len(summary) >= 20:
            out.append(
                [
                    {"role": "user", "content": EXPLAIN + bare},
                    {"role": "assistant", "content": summary},
                ]
            )
    return out


def corpus_conversations(params: Params) -> Iterator[tuple[str, object]]:
    """(uri, messages) derived from the training-split documents of the cleaned corpus."""
    import pyarrow.parquet as pq

    for part in parquet_parts(params.finetune.corpus_dir):
        f = pq.ParquetFile(part)
        for batch in f.iter_batches(columns=["id", "text", "uri"], batch_size=256):
            for doc_id, text, uri in zip(*(c.to_pylist() for c in batch.columns), strict=True):
                if is_val(doc_id, params.tokenize.val_fraction):
                    continue
                for k, conv in enumerate(
                    function_conversations(text, params.finetune.max_answer_chars)
                ):
                    yield f"{uri}#conversation{k}", conv


def read_conversations(
    src: ChatSourceConfig, idx: int, params: Params, s3: S3Settings | None
) -> Iterator[tuple[str, object]]:
    """(uri, messages or a reason it could not be read) from one source."""
    from tasks.ingest.sources import Bad, read_item, source_items

    if src.uri == "corpus":
        yield from corpus_conversations(params)
        return
    for item in source_items(idx, src, s3, structured=True):
        for raw in read_item(item, src, params.data, s3, structured=True):
            yield raw.uri, (raw.reason if isinstance(raw, Bad) else raw.data)


def conversation_id(messages: list[dict]) -> str:
    """Content hash of a conversation (roles and stripped contents): the dedup key and the
    split and sampling draw."""
    norm = [[m["role"], m["content"].strip()] for m in messages]
    return hashlib.sha256(json.dumps(norm, ensure_ascii=False).encode()).hexdigest()


@dataclass
class SftSummary:
    read: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # split -> conversations
    quarantined: Counter = field(default_factory=Counter)  # reason -> count
    duplicates: int = 0
    sampled_out: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    assistant_tokens: int = 0
    tokens: int = 0
    rejected: list[dict] = field(default_factory=list)  # quarantine.jsonl: uri, source, reason

    def reject(self, uri: str, source: str, reason: str) -> None:
        self.quarantined[_reason_kind(reason)] += 1
        self.rejected.append({"uri": uri, "source": source, "reason": reason})

    def as_dict(self) -> dict:
        return {
            "conversations_read": self.read,
            "train_conversations": self.kept.get("train", 0),
            "val_conversations": self.kept.get("val", 0),
            "duplicates": self.duplicates,
            "sampled_out": self.sampled_out,
            "quarantined": sum(self.quarantined.values()),
            "quarantine_reasons": dict(sorted(self.quarantined.items())),
            "by_source": self.by_source,
            "tokens": self.tokens,
            "assistant_tokens": self.assistant_tokens,
        }


def _reason_kind(reason: str) -> str:
    """The reason without the turn number and details, for counting."""
    if reason.startswith("turn "):
        reason = reason.split(": ", 1)[1]
    return reason.split(" (")[0].split(": ")[0]


def prepare_conversations(params: Params, log=print) -> SftSummary:
    """Read, check, decontaminate, dedupe, sample, split and render every conversation into
    ``finetune.sft_dir`` (atomically): ``{split}_ids.npy`` and ``{split}_mask.npy`` (rows of
    ``seq_len + 1``), ``index.json``, ``quarantine.jsonl``."""
    from tokenizers import Tokenizer

    cfg, run = params.finetune, params.finetune.train_config(params.train)
    tok_path = Path(run.tokenizer_dir) / "tokenizer.json"
    if not tok_path.exists():
        raise FinetuneError(f"{tok_path} not found: run the tokenize stage first")
    renderer = Renderer(Tokenizer.from_file(str(tok_path)), params.tokenize.bos_token)
    summary = SftSummary()
    kept = collect(params, summary)
    rows = render_rows(sample_corpus(kept, cfg, summary), renderer, run.seq_len + 1, cfg, summary)
    if not rows["train"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in summary.quarantined.most_common(3)) or "none"
        raise FinetuneError(
            f"no usable conversations for fine-tuning: {summary.read} read, "
            f"{sum(summary.quarantined.values())} quarantined ({reasons}), {summary.duplicates} "
            "duplicates. Check finetune.sources (records need a 'messages' list of "
            "{role, content} turns ending with an assistant turn) and finetune.run.seq_len"
        )
    summary.kept = {k: len(v) for k, v in rows.items()}
    pad_id = renderer.tok.token_to_id(params.tokenize.pad_token)
    index = {
        "kind": "conversations",
        "vocab_size": renderer.tok.get_vocab_size(),
        "tokenizer_sha256": sha256_file(tok_path),
        "seq_len": run.seq_len,
        "pad_id": pad_id,
        "splits": {},
        "summary": summary.as_dict(),
    }
    write_sft(cfg.sft_dir, rows, run.seq_len + 1, pad_id, index, summary.rejected)
    log(
        f"conversations: {summary.read} read, {summary.kept['train']} train + "
        f"{summary.kept['val']} val kept, {sum(summary.quarantined.values())} quarantined, "
        f"{summary.duplicates} duplicates, {summary.sampled_out} left out of the sample"
    )
    return summary


Kept = dict[str, list[tuple[str, list[dict]]]]  # source label -> (conversation id, messages)


def collect(params: Params, summary: SftSummary) -> Kept:
    """Every source's conversations that are well formed, not contaminated (decontaminated like
    the corpus, against data.decontam_benchmarks) and not duplicates, in source order."""
    from tasks.ingest.decontam import benchmark_index
    from tasks.ingest.dedup import ngram_hashes, token_hashes

    n = params.data.decontam_ngram
    bench = benchmark_index(tuple(params.data.decontam_benchmarks), n)
    s3 = S3Settings.from_infra(params.infra)
    seen: set[str] = set()
    kept: Kept = {}
    for idx, src in enumerate(params.finetune.sources):
        n_src = 0
        for uri, messages in read_conversations(src, idx, params, s3):
            summary.read += 1
            reason = messages if isinstance(messages, str) else problem(messages)
            if not reason:
                text = "\n".join(m["content"] for m in messages)
                hits = bench.hits(ngram_hashes(token_hashes(text), n))
                reason = f"contaminated: shares a {n}-gram with {hits[0]}" if hits else ""
            if reason:
                summary.reject(uri, src.label, reason)
                continue
            cid = conversation_id(messages)
            if cid in seen:
                summary.duplicates += 1
                continue
            seen.add(cid)
            kept.setdefault(src.label, []).append((cid, messages))
            n_src += 1
        summary.by_source[src.label] = n_src
    return kept


def sample_corpus(kept: Kept, cfg: FinetuneConfig, summary: SftSummary) -> Kept:
    """The corpus yields more than a demo needs: ``max_conversations`` of it, a sample by hash,
    the same on every run. Other sources are kept whole."""
    out: Kept = {}
    for label, convs in kept.items():
        if any(s.uri == "corpus" and s.label == label for s in cfg.sources):
            convs = sorted(convs)
            if cfg.max_conversations is not None and len(convs) > cfg.max_conversations:
                summary.sampled_out += len(convs) - cfg.max_conversations
                convs = convs[: cfg.max_conversations]
        out[label] = convs
    return out


def render_rows(
    kept: Kept, renderer: Renderer, width: int, cfg: FinetuneConfig, summary: SftSummary
) -> dict[str, list]:
    """Each conversation's ids and loss mask, in its split (by hash); one longer than ``width``
    tokens is quarantined."""
    rows: dict[str, list] = {"train": [], "val": []}
    for label, convs in kept.items():
        for cid, messages in convs:
            ids, mask = renderer.render(messages)
            if len(ids) > width:
                summary.reject(
                    cid,
                    label,
                    f"longer than the context: {len(ids)} tokens > finetune.run.seq_len + 1 = "
                    f"{width}",
                )
                continue
            split = "val" if is_val(cid, cfg.val_fraction) else "train"
            rows[split].append((ids, mask))
            summary.tokens += len(ids)
            summary.assistant_tokens += sum(mask)
    return rows


def write_sft(
    sft_dir: str, rows: dict[str, list], width: int, pad_id: int, index: dict, rejected: list
) -> None:
    """``sft_dir``, whole or not at all: the packed rows and masks per split, the index and the
    quarantine."""
    with atomic_dir(sft_dir) as tmp:
        for split, rendered in rows.items():
            ids, mask = pack_rows(rendered, width, pad_id)
            np.save(tmp / f"{split}_ids.npy", ids)
            np.save(tmp / f"{split}_mask.npy", mask)
            index["splits"][split] = {
                "ids": f"{split}_ids.npy",
                "mask": f"{split}_mask.npy",
                "rows": len(rendered),
                "tokens": int(ids.size),
                "assistant_tokens": int(mask.sum()),
            }
        (tmp / "quarantine.jsonl").write_text(
            "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in rejected)
        )
        (tmp / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
