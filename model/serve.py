"""An OpenAI-compatible server for an exported model: ``/v1/completions`` (with ``echo`` and
``logprobs``, as lm-eval's ``local-completions`` needs for likelihood tasks), ``/v1/chat/completions``
and ``/v1/models``. Greedy decoding on one model, one request at a time; binds 127.0.0.1 by default.

    python -m model.serve --model models/hf [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tasks.env import apply_offline_defaults

apply_offline_defaults()

import torch  # noqa: E402


class Engine:
    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=False
        )
        self.model.eval()
        self.name = model_dir
        self.lock = threading.Lock()

    def ids(self, prompt) -> list[int]:
        return (
            list(prompt)
            if isinstance(prompt, list)
            else self.tok(prompt, add_special_tokens=False)["input_ids"]
        )

    @torch.no_grad()
    def complete(
        self, prompt, max_tokens: int, stop: list[str], echo: bool, logprobs: int | None
    ) -> dict:
        ids = self.ids(prompt)
        with self.lock:
            out = (
                self.model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=self.tok.pad_token_id,
                    eos_token_id=None,
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
        text = self.tok.decode(gen)
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        finish = "length"
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


def make_handler(engine: Engine):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # quiet: one line per request is enough
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                return self._send(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": engine.name, "object": "model", "owned_by": "llmforge"}],
                    },
                )
            self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            try:
                req = json.loads(
                    self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}"
                )
            except json.JSONDecodeError as exc:
                return self._send(400, {"error": {"message": f"invalid JSON: {exc}"}})
            stop = req.get("stop") or []
            stop = [stop] if isinstance(stop, str) else stop
            max_tokens = int(req.get("max_tokens", 16))
            try:
                if self.path.rstrip("/") == "/v1/completions":
                    prompts = req.get("prompt", "")
                    if isinstance(prompts, str) or (
                        isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
                    ):
                        prompts = [prompts]
                    choices, n_in, n_out = [], 0, 0
                    for i, p in enumerate(prompts):
                        c, a, b = engine.complete(
                            p, max_tokens, stop, bool(req.get("echo")), req.get("logprobs")
                        )
                        c["index"] = i
                        choices.append(c)
                        n_in, n_out = n_in + a, n_out + b
                    return self._send(
                        200, response("cmpl", "text_completion", engine.name, choices, n_in, n_out)
                    )
                if self.path.rstrip("/") == "/v1/chat/completions":
                    # No chat template is trained into a base model: the transcript is plain text.
                    prompt = (
                        "".join(f"{m['role']}: {m['content']}\n" for m in req.get("messages", []))
                        + "assistant:"
                    )
                    c, a, b = engine.complete(prompt, max_tokens, stop, False, None)
                    choice = {
                        "index": 0,
                        "message": {"role": "assistant", "content": c["text"]},
                        "finish_reason": c["finish_reason"],
                    }
                    return self._send(
                        200, response("chatcmpl", "chat.completion", engine.name, [choice], a, b)
                    )
            except Exception as exc:  # a bad request must not take the server down
                return self._send(400, {"error": {"message": f"{type(exc).__name__}: {exc}"}})
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    return Handler


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="OpenAI-compatible server for an exported model.")
    ap.add_argument("--model", default="models/hf")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    engine = Engine(args.model)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(engine))
    print(
        f"serving {args.model} on http://{args.host}:{args.port}/v1 (completions, chat/completions, models)",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
