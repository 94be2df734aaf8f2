"""The finetune stage's checks before anything starts: the merged run config is valid, the base
model and the tokenizer exist, the conversations fit the base model's context. The data lives in
``tasks.finetune.conversations``; the run is the train stage's (``tasks.train.launch``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.finetune.conversations import FinetuneError

if TYPE_CHECKING:
    from tasks.params import Params


def check_inputs(params: Params) -> None:
    """Before any flow, run or process starts: the base model and the tokenizer exist, and the
    conversations' rows fit the base model's context (the run config was checked as params
    loaded)."""
    run = params.finetune.train_config(params.train)
    base = Path(params.finetune.base_model_dir) / "config.json"
    if not base.exists():
        raise FinetuneError(
            f"{base} not found: the finetune stage starts from the base model; run the train "
            "stage first (python -m flows train)"
        )
    context = json.loads(base.read_text())["max_position_embeddings"]
    if run.seq_len > context:
        raise FinetuneError(
            f"finetune.run.seq_len {run.seq_len} is longer than the base model's context "
            f"({context} tokens, {base}); lower finetune.run.seq_len to at most {context}"
        )
    tok = Path(params.train.tokenizer_dir) / "tokenizer.json"
    if not tok.exists():
        raise FinetuneError(f"{tok} not found: run the tokenize stage first")
