"""An OpenAI-compatible server for an exported model: ``/v1/completions`` (with ``echo`` and
``logprobs``, as lm-eval's ``local-completions`` needs for likelihood tasks), ``/v1/chat/completions``
and ``/v1/models``, on FastAPI and uvicorn. Greedy decoding; binds 127.0.0.1 by default.

    python -m model.serve --model models/hf [--host 127.0.0.1] [--port 8000] [--max-queue 8]

Hostile or careless requests get a 4xx that names the field, never a dropped connection: request
bodies are validated by pydantic and capped in size; a prompt plus ``max_tokens`` must fit the
model's context; generation runs on one worker thread behind a bounded queue, and a full queue
answers 429 at once; each generation stops at ``--request-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tasks.common.env import apply_offline_defaults

MAX_PROMPTS = 64  # prompts in one completions request (lm-eval batches token-id prompts)


class Request(BaseModel):
    # Clients send more fields than we use (temperature, seed, top_p...); those are ignored, but
    # every field we read is checked strictly: "abc" is not a number and -1 is not a length.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int = Field(default=16, ge=0)
    stop: str | list[str] | None = Field(default=None)


class CompletionRequest(Request):
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Request):
    messages: list[Message] = Field(min_length=1, max_length=256)


class RequestError(ValueError):
    """A well-formed request the model cannot serve (too long for its context...): HTTP 400."""


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_queue: int = 8  # requests waiting or running; more are answered 429
    request_timeout_s: float = 60.0


class Engine:
    def __init__(self, model_dir: str, timeout_s: float = 60.0, context: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=False
        )
        self.model.eval()
        self.name = model_dir
        # Prompt + max_tokens must fit here: the trained context unless the caller raises it
        # (rotary embeddings run past it, with quality the caller has chosen to accept).
        self.context = context or int(self.model.config.max_position_embeddings)
        self.timeout_s = timeout_s
        self.lock = threading.Lock()

    def ids(self, prompt) -> list[int]:
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise RequestError(f"prompt: token id {bad[0]} is outside the vocabulary")
            return list(prompt)
        return self.tok(prompt, add_special_tokens=False)["input_ids"]

    def check_fits(self, ids: list[int], max_tokens: int) -> None:
        if len(ids) + max_tokens > self.context:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                f"context of {self.context} tokens; shorten the prompt or lower max_tokens"
            )

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt of a chat request: the model's own chat template, as vLLM and transformers
        apply it. A base model has none; a reserved token typed in a turn would forge a turn
        boundary, so it is refused rather than passed to the template."""
        if not self.tok.chat_template:
            raise RequestError(
                f"{self.name} has no chat template (a base model): use /v1/completions, or serve "
                "the chat model (the finetune stage's export, models/chat)"
            )
        from tasks.common.chat import reserved_in

        token = reserved_in(messages, self.tok.all_special_tokens)
        if token:
            raise RequestError(f"messages: a turn contains the reserved token {token!r}")
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(out["input_ids"])

    @property
    def stop_ids(self) -> list[int]:
        """The end-of-turn ids of the generation config (a chat model: ``<|end|>`` and EOS)."""
        eos = self.model.generation_config.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    @torch.no_grad()
    def complete(
        self,
        prompt,
        max_tokens: int,
        stop: list[str],
        echo: bool,
        logprobs: int | None,
        stop_ids: list[int] | None = None,
    ) -> tuple[dict, int, int]:
        ids = self.ids(prompt)
        self.check_fits(ids, max_tokens)
        if not ids and (echo or max_tokens):
            raise RequestError("prompt: empty")
        with self.lock:
            out = (
                self.model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=self.tok.pad_token_id,
                    eos_token_id=stop_ids or None,
                    max_time=self.timeout_s,
                )
                if max_tokens > 0
                else torch.tensor([ids])
            )
            full = out[0].tolist()
            lp = (
                torch.log_softmax(self.model(torch.tensor([full])).logits[0].float(), dim=-1)
                if logprobs is not None
                else None
            )
        gen = full[len(ids) :]
        ended = bool(gen) and gen[-1] in (stop_ids or [])
        text = self.tok.decode(gen[:-1] if ended else gen)
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        finish = "stop" if ended else "length"
        if cut >= 0:
            text, finish = text[:cut], "stop"
        choice = {
            "index": 0,
            "text": (self.tok.decode(ids) if echo else "") + text,
            "finish_reason": finish,
        }
        if lp is not None:
            span = range(0 if echo else len(ids), len(full))
            k = max(1, logprobs)
            token_lp, top = [], []
            for i in span:
                if i == 0:
                    token_lp.append(None)
                    top.append(None)
                    continue
                token_lp.append(float(lp[i - 1, full[i]]))
                vals, idx = lp[i - 1].topk(k)
                top.append(
                    {self.tok.decode([int(j)]): float(v) for v, j in zip(vals, idx, strict=True)}
                )
            choice["logprobs"] = {
                "tokens": [self.tok.decode([full[i]]) for i in span],
                "token_logprobs": token_lp,
                "top_logprobs": top,
            }
        return choice, len(ids), len(gen)


def response(prefix: str, kind: str, model: str, choices: list, n_in: int, n_out: int) -> dict:
    """The OpenAI response envelope around ``choices``, with token usage."""
    return {
        "id": f"{prefix}-{time.time_ns()}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
    }


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def completions(engine: Engine, req: CompletionRequest) -> dict:
    prompts = req.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"prompt: at most {MAX_PROMPTS} prompts per request")
    choices, n_in, n_out = [], 0, 0
    for i, p in enumerate(prompts or [""]):
        c, a, b = engine.complete(p, req.max_tokens, _stops(req.stop), req.echo, req.logprobs)
        c["index"] = i
        choices.append(c)
        n_in, n_out = n_in + a, n_out + b
    return response("cmpl", "text_completion", engine.name, choices, n_in, n_out)


def chat(engine: Engine, req: ChatRequest) -> dict:
    ids = engine.chat_ids([m.model_dump() for m in req.messages])
    c, a, b = engine.complete(ids, req.max_tokens, _stops(req.stop), False, None, engine.stop_ids)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": c["text"]},
        "finish_reason": c["finish_reason"],
    }
    return response("chatcmpl", "chat.completion", engine.name, [choice], a, b)


def _error(status: int, message: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind}}, status_code=status, headers=headers
    )


def make_app(engine: Engine, limits: Limits | None = None):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    limits = limits or Limits()
    app = FastAPI(title="llmforge model server", docs_url=None, redoc_url=None)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
    state = {"pending": 0}

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(x) for x in e["loc"] if x != "body") or "body"
            parts.append(f"{loc}: {e['msg']}")
        return _error(400, "; ".join(parts))

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    async def run(fn, req):
        if state["pending"] >= limits.max_queue:
            return _error(
                429, f"busy: {limits.max_queue} requests queued; retry", {"Retry-After": "1"}
            )
        state["pending"] += 1
        loop = asyncio.get_running_loop()
        future = worker.submit(fn, engine, req)
        # The count drops when the work ends, not when a client gives up waiting.
        future.add_done_callback(
            lambda _: loop.call_soon_threadsafe(state.__setitem__, "pending", state["pending"] - 1)
        )
        try:
            # Generation itself stops at the timeout (max_time); this bounds the wait in the queue.
            return await asyncio.wait_for(
                asyncio.wrap_future(future), timeout=2 * limits.request_timeout_s
            )
        except RequestError as exc:
            return _error(400, str(exc))
        except TimeoutError:
            return _error(503, f"timed out after {2 * limits.request_timeout_s:g} s in the queue")

    @app.post("/v1/completions")
    async def post_completions(req: CompletionRequest):
        return await run(completions, req)

    @app.post("/v1/chat/completions")
    async def post_chat(req: ChatRequest):
        return await run(chat, req)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": engine.name, "object": "model", "owned_by": "llmforge"}],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok", "pending": state["pending"]}

    return BodyLimit(app, limits.max_body_bytes)


class BodyLimit:
    """ASGI wrapper: a body over ``max_bytes`` (declared or streamed in chunks) is answered 413
    before it is read into memory."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _error(413, f"request body over {self.max_bytes} bytes")(
                scope, receive, send
            )
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _error(413, f"request body over {self.max_bytes} bytes")(scope, receive, send)


class _TooLarge(Exception):
    pass


def main(argv: list[str] | None = None) -> None:
    apply_offline_defaults()  # before transformers loads the model: offline unless opted in
    import uvicorn

    ap = argparse.ArgumentParser(description="OpenAI-compatible server for an exported model.")
    ap.add_argument("--model", default="models/hf")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-queue", type=int, default=Limits.max_queue)
    ap.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    ap.add_argument("--request-timeout", type=float, default=Limits.request_timeout_s)
    ap.add_argument(
        "--context",
        type=int,
        default=None,
        help="longest prompt + max_tokens served (default: the model's max_position_embeddings)",
    )
    args = ap.parse_args(argv)
    engine = Engine(args.model, args.request_timeout, args.context)
    limits = Limits(args.max_body_bytes, args.max_queue, args.request_timeout)
    print(
        f"serving {args.model} on http://{args.host}:{args.port}/v1 (completions, chat/completions, "
        f"models); context {engine.context} tokens, queue {limits.max_queue}",
        flush=True,
    )
    uvicorn.run(
        make_app(engine, limits),
        host=args.host,
        port=args.port,
        backlog=2048,
        timeout_keep_alive=5,
        log_level="warning",
        h11_max_incomplete_event_size=64 * 1024,
    )


if __name__ == "__main__":
    main()
