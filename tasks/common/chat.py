"""The chat format: role and turn tokens (reserved when the tokenizer is trained), the Jinja chat
template written into the chat model's ``tokenizer_config.json``, and the one renderer that turns
a conversation into token ids and a loss mask for fine-tuning.

A conversation renders as::

    <|bos|><|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n

(the system turn is optional). ``add_generation_prompt`` appends ``<|assistant|>\\n``; generation
stops at ``<|end|>``. Contents are stripped, as Llama 3's template does, so that the newline after
a role token is always a token of its own and the ids below equal what transformers' and vLLM's
``apply_chat_template`` produce from the template (tests/test_chat.py checks it).

Only the assistant's content and its ``<|end|>`` carry loss. Contents are encoded with special
tokens split into bytes: a ``<|end|>`` typed by a user is text, never a turn boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROLES = ("system", "user", "assistant")
END = "<|end|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", END)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] | trim) + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


# The request that asks for a function's body, in the corpus-derived conversations and in the chat
# model's HumanEval (the problem's prompt as the user turn)
COMPLETE_REQUEST = "Complete this Python function:\n\n"


def problem(messages: object, max_chars: int = 1_000_000) -> str:
    """Why ``messages`` is not a usable training conversation ("" when it is): it must be a list
    of ``{"role", "content"}`` turns with known roles, an optional system turn first, then user
    and assistant turns alternating, ending with a non-empty assistant turn."""
    if not isinstance(messages, list) or not messages:
        return "no messages: expected a non-empty list of {role, content} turns"
    turns = list(messages)
    if isinstance(turns[0], dict) and turns[0].get("role") == "system":
        turns = turns[1:]
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"turn {i}: not an object with role and content"
        role, content = m.get("role"), m.get("content")
        if role is None:
            return f"turn {i}: missing role"
        if role not in ROLES:
            return f"turn {i}: unknown role {role!r} (known: {', '.join(ROLES)})"
        if not isinstance(content, str):
            return f"turn {i}: content is not a string"
        if len(content) > max_chars:
            return f"turn {i}: longer than {max_chars} characters"
        if role == "assistant" and not content.strip():
            return f"turn {i}: empty assistant turn"
        if role == "system" and i:
            return f"turn {i}: a system turn may only come first"
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            return (
                f"turns must alternate user/assistant; found {m['role']!r} where {want!r} belongs"
            )
    if not turns or turns[-1]["role"] != "assistant":
        return "no assistant turn to learn from at the end"
    return ""


def reserved_in(messages: Sequence[dict], reserved: Sequence[str]) -> str | None:
    """The first reserved special token written inside a turn's content, if any."""
    for m in messages:
        for t in reserved:
            if t in m.get("content", ""):
                return t
    return None


class Renderer:
    """Conversations -> token ids and loss masks with a ``tokenizers.Tokenizer`` that holds the
    chat tokens (``tokenizer.json`` of the tokenize stage)."""

    def __init__(self, tokenizer, bos_token: str):
        self.tok = tokenizer
        self.tok.encode_special_tokens = True  # contents never produce special tokens

        def tid(t: str) -> int:
            i = tokenizer.token_to_id(t)
            if i is None:
                raise ValueError(
                    f"the tokenizer has no {t!r} token: retrain it (the tokenize stage reserves "
                    f"{', '.join(CHAT_TOKENS)})"
                )
            return i

        self.bos = tid(bos_token)
        self.role = {r: tid(f"<|{r}|>") for r in ROLES}
        self.end = tid(END)
        (self.nl,) = tokenizer.encode("\n", add_special_tokens=False).ids

    def render(
        self, messages: Sequence[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """(ids, mask): ``mask[j]`` is True where token ``j`` is a training target (assistant
        content and its ``<|end|>``)."""
        ids, mask = [self.bos], [False]
        for m in messages:
            body = self.tok.encode(m["content"].strip(), add_special_tokens=False).ids
            learn = m["role"] == "assistant"
            ids += [self.role[m["role"]], self.nl, *body, self.end, self.nl]
            mask += [False, False, *([learn] * len(body)), learn, False]
        if add_generation_prompt:
            ids += [self.role["assistant"], self.nl]
            mask += [False, False]
        return ids, mask


def pack_rows(
    rendered: Sequence[tuple[list[int], list[bool]]], width: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """One conversation per row, right-padded to ``width`` tokens (padding carries no loss and,
    attention being causal, never influences the real tokens before it)."""
    ids = np.full((len(rendered), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(rendered), width), dtype=bool)
    for r, (i, m) in enumerate(rendered):
        ids[r, : len(i)] = i
        mask[r, : len(m)] = m
    return ids, mask
