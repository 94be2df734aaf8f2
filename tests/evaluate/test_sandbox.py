import os
import socket
import threading
import time

from tasks.evaluate.sandbox import run_python


def test_passing_and_failing_code():
    assert run_python("assert 1 + 1 == 2").passed
    r = run_python("assert 1 + 1 == 3")
    assert not r.passed and "AssertionError" in r.reason


def test_infinite_loop_is_killed_within_the_limit():
    t = time.monotonic()
    r = run_python("while True:\n    pass", timeout_s=2)
    assert not r.passed and r.reason == "timed out"
    assert time.monotonic() - t < 10


def test_memory_bomb_is_stopped():
    t = time.monotonic()
    r = run_python("x = bytearray(4 * 1024**3)", memory_mb=256, timeout_s=10)
    assert not r.passed and r.reason == "memory limit"
    assert time.monotonic() - t < 10


def test_network_is_blocked():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(srv.accept()), daemon=True).start()
    code = f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
    r = run_python(code, timeout_s=5)
    assert not r.passed
    time.sleep(0.5)
    assert accepted == []
    srv.close()


def test_no_secrets_inherited(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-secret-123")
    assert run_python("import os\nassert 'AWS_SECRET_ACCESS_KEY' not in os.environ").passed
    assert run_python(
        "import os\nassert os.getcwd().startswith('/tmp') or 'sandbox' in os.getcwd()"
    ).passed
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "canary-secret-123"
