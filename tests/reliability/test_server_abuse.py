"""model.serve against careless and hostile clients: malformed fields get a 4xx naming them,
oversized bodies and prompts are refused at once, and a burst of concurrent clients gets answers
(200 or 429), never reset connections."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from tests.model.test_serve import serve_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ("--max-queue", "4", "--request-timeout", "20")
    with serve_tiny_model(tmp_path_factory.mktemp("abuse"), 2, *args) as (_, port):
        yield port


def call(port: int, path: str, body: bytes | str | dict, headers: dict | None = None, timeout=60):
    if isinstance(body, dict | list):
        body = json.dumps(body)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(
        "POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, (json.loads(data) if data.startswith(b"{") else data)


def test_malformed_requests_get_a_clear_4xx(server, figure):
    cases = {
        "JSON array body": ("[1, 2]", None),
        "not JSON": ("{oops", None),
        "max_tokens a string": ({"prompt": "x", "max_tokens": "abc"}, "max_tokens"),
        "max_tokens null": ({"prompt": "x", "max_tokens": None}, "max_tokens"),
        "max_tokens negative": ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        "max_tokens past the context": ({"prompt": "x", "max_tokens": 2000}, "context"),
        "logprobs huge": ({"prompt": "x", "logprobs": 10**6}, "logprobs"),
        "prompt a number": ({"prompt": 5}, "prompt"),
        "token id out of vocabulary": ({"prompt": [10**9], "max_tokens": 1}, "vocabulary"),
        "100k-token prompt": ({"prompt": "def f(x): " * 25_000, "max_tokens": 1}, "context"),
        "chat without messages": ({"messages": []}, "messages"),
        "chat with a bad role": ({"messages": [{"role": "root", "content": "x"}]}, "role"),
    }
    clear = 0
    for name, (body, word) in cases.items():
        path = "/v1/chat/completions" if "chat" in name else "/v1/completions"
        t = time.monotonic()
        status, out = call(server, path, body)
        took = time.monotonic() - t
        assert 400 <= status < 500, (name, status, out)
        assert took < 10, (name, took)
        message = out["error"]["message"]
        assert word is None or word in message, (name, message)
        clear += 1
    figure("server: malformed requests answered 4xx with the field named", f"{clear}/{len(cases)}")
    status, out = call(server, "/v1/completions", {"prompt": "def", "max_tokens": 2})
    assert status == 200 and out["usage"]["completion_tokens"] == 2  # still serving


def test_body_caps(server, figure):
    status, _ = call(server, "/v1/completions", b"{" + b" " * (10 << 20) + b"}")
    assert status == 413
    # A lying Content-Length: refused at once, not waited on.
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}")
        t = time.monotonic()
        reply = s.recv(200)
        assert reply.startswith(b"HTTP/1.1 4") and time.monotonic() - t < 5
    figure("server: 10 MB body and Content-Length -1", "refused (413, 400)")


def test_burst_of_concurrent_clients_gets_answers(server, figure):
    n = 200
    results: list = []

    def client():
        try:
            results.append(
                call(server, "/v1/completions", {"prompt": "def f", "max_tokens": 4}, timeout=120)[
                    0
                ]
            )
        except OSError as exc:  # a reset or refused connection
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    resets = [r for r in results if not isinstance(r, int)]
    ok, busy = results.count(200), results.count(429)
    figure("server", f"{n} concurrent, {len(resets)} resets ({ok} answered 200, {busy} told 429)")
    assert len(results) == n and resets == [] and ok >= 1 and ok + busy == n
