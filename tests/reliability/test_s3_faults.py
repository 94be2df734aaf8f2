"""S3 faults between boto3 and moto's server: a small proxy on 127.0.0.1 injects 500s, 503
SlowDown, connection resets and silence. Under the retry budget (infra.s3_max_attempts) a call
succeeds; over it, or against an endpoint that never answers, it fails fast with a message naming
the endpoint; an interrupted multipart upload leaves no object and no incomplete upload."""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest

from tasks.common.infra import InfraConfig
from tasks.common.storage import S3Settings, StorageError, list_s3, read_bytes, upload_file
from tests.conftest import free_port

pytestmark = pytest.mark.integration


class FaultProxy:
    """Forwards to ``upstream``; ``plan(method, path) -> fault or None`` picks a fault per request:
    ``500``, ``slowdown`` (503 SlowDown), ``reset`` (RST, no answer)."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.plan = lambda method, path: None
        self.seen: Counter = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy.plan(self.command, self.path)
                proxy.seen[(self.command, fault)] += 1
                if fault == "reset":
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault in ("500", "slowdown"):
                    code, err = (500, "InternalError") if fault == "500" else (503, "SlowDown")
                    xml = f"<Error><Code>{err}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = self.headers["Host"]
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def settings(url: str, attempts: int = 4) -> S3Settings:
    d = InfraConfig()
    return S3Settings(url, "us-east-1", attempts, d.s3_connect_timeout_s, d.s3_read_timeout_s)


@pytest.fixture
def proxied(s3_server, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    bucket = f"faults-{tmp_path.name.lower().replace('_', '-')}"[:60]
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="doc.txt", Body=b"hello from s3")
    proxy = FaultProxy(s3_server)
    yield proxy, bucket, s3
    proxy.close()


def failing_first(n: int, fault: str, method: str = "GET"):
    count = Counter()

    def plan(m, path):
        if m != method:
            return None
        count[m] += 1
        return fault if count[m] <= n else None

    return plan


@pytest.mark.parametrize("fault", ["500", "slowdown", "reset"])
def test_faults_under_the_budget_succeed_over_it_fail_clearly(proxied, fault, figure):
    proxy, bucket, _ = proxied
    s3 = settings(proxy.url, attempts=4)
    proxy.plan = failing_first(3, fault)
    assert read_bytes(f"s3://{bucket}/doc.txt", s3) == b"hello from s3"
    proxy.plan = failing_first(4, fault)
    t = time.monotonic()
    with pytest.raises(StorageError) as err:
        read_bytes(f"s3://{bucket}/doc.txt", s3)
    figure(f"s3 {fault}: 3 faults under a 4-attempt budget", "ok; 4 faults: clear error")
    assert f"s3://{bucket}/doc.txt" in str(err.value)
    assert time.monotonic() - t < 30


def test_infra_endpoint_is_used(proxied, monkeypatch):
    proxy, bucket, _ = proxied
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    infra = InfraConfig(s3_endpoint_url=proxy.url, s3_max_attempts=2)
    found = list(list_s3(f"s3://{bucket}/", S3Settings.from_infra(infra)))
    assert [o.uri for o in found] == [f"s3://{bucket}/doc.txt"]
    assert proxy.seen[("GET", None)] >= 1  # the request went to infra's endpoint, not AWS


def test_silent_endpoint_fails_within_30s_naming_it(figure, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # infra's endpoint, not the env's
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts connections (the kernel does), never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    t = time.monotonic()
    with pytest.raises(StorageError) as err:
        list(list_s3("s3://any-bucket/x/", S3Settings.from_infra(InfraConfig(s3_endpoint_url=url))))
    took = time.monotonic() - t
    silent.close()
    figure("s3 silent endpoint: failed after s", f"{took:.1f} (limit 30)")
    assert took < 30 and url in str(err.value) and "did not answer" in str(err.value)


def test_interrupted_multipart_upload_leaves_nothing(proxied, tmp_path, figure):
    proxy, bucket, s3 = proxied
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (10 << 20))  # over boto3's 8 MiB multipart threshold: 2 parts
    proxy.plan = lambda m, path: "reset" if m == "PUT" and "partNumber=" in path else None
    with pytest.raises(StorageError):
        upload_file(big, f"s3://{bucket}/release/big.bin", settings(proxy.url, attempts=2))
    objects = s3.list_objects_v2(Bucket=bucket, Prefix="release/").get("KeyCount", 0)
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    figure(
        "s3 interrupted multipart: objects, incomplete uploads left", f"{objects}, {len(uploads)}"
    )
    assert objects == 0 and uploads == []
    proxy.plan = lambda m, path: None
    upload_file(big, f"s3://{bucket}/release/big.bin", settings(proxy.url))
    assert s3.head_object(Bucket=bucket, Key="release/big.bin")["ContentLength"] == 10 << 20
