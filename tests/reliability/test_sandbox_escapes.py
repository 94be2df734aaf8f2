"""Generated code against the sandbox: each program tries one escape and the check looks from the
outside whether it got through (a file written, a secret read, a connection made, a process left)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tasks.evaluate.sandbox import run_python

SECRET = "canary-sandbox-env-93c1"


def _alive_with(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    hits: list = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                hits.append(srv.accept())
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()[1], hits
    stop.set()
    srv.close()


def test_sandbox_escapes(tmp_path, monkeypatch, listener, figure):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    port, hits = listener
    outside = Path("/tmp") / f"llmforge-outside-{os.getpid()}"
    repo_file = Path(__file__).resolve()
    marker = f"llmforge-orphan-{os.getpid()}"
    escapes = {
        # name: (program, check from outside that returns True when the escape worked; None: the
        # program itself asserts its escape, so passing means it got through)
        "write /tmp outside": (
            f"open({str(outside)!r}, 'w').write('x')",
            lambda: outside.exists(),
        ),
        "read /etc/shadow": ("print(open('/etc/shadow').read()); raise SystemExit(0)", None),
        "read the repository": (f"open({str(repo_file)!r}).read()", None),
        "read parent environ via /proc": (
            "import glob\n"
            "found = [p for p in glob.glob('/proc/*/environ') "
            f"if {SECRET!r}.encode() in open(p, 'rb').read()]\n"
            "assert found",
            None,
        ),
        "inherit the environment": (f"import os; assert {SECRET!r} in str(os.environ)", None),
        "socket connect": (
            f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)",
            lambda: bool(hits),
        ),
        "raw _socket connect": (
            f"import _socket; s = _socket.socket(); s.settimeout(2); s.connect(('127.0.0.1', {port}))",
            lambda: bool(hits),
        ),
        "fork bomb": (
            "import os, time\n"
            "n = 0\n"
            "try:\n"
            "    for _ in range(100000):\n"
            "        if os.fork() == 0:\n"
            "            time.sleep(30); os._exit(0)\n"
            "        n += 1\n"
            "except OSError:\n"
            "    pass\n"
            "assert n >= 200, n",
            None,
        ),
        "setsid child outlives the sandbox": (
            "import os, subprocess, sys\n"
            f"subprocess.Popen(['/bin/sh', '-c', 'exec -a {marker} sleep 60'], start_new_session=True)\n"
            "import time; time.sleep(30)",
            lambda: bool(_alive_with(marker)),
        ),
    }
    got_through = []
    for name, (code, check) in escapes.items():
        t = time.monotonic()
        result = run_python(code, timeout_s=4, memory_mb=256)
        time.sleep(0.3)
        escaped = check() if check is not None else result.passed
        assert time.monotonic() - t < 15, name
        if escaped:
            got_through.append(f"{name}: {result.reason}")
    outside.unlink(missing_ok=True)
    figure("sandbox escapes", f"{len(got_through)}/{len(escapes)}")
    assert got_through == []
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET  # the caller's environment is intact


def test_refused_without_isolation(tmp_path, monkeypatch):
    """No unshare, no execution: evaluate refuses rather than run code unisolated."""
    import tasks.evaluate.sandbox as sandbox
    from tasks.evaluate.config import EvaluateConfig
    from tasks.evaluate.errors import EvaluateError
    from tasks.evaluate.stage import run_evaluate

    sandbox._probe.cache_clear()
    monkeypatch.setenv("PATH", "/nonexistent")
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="unshare"):
            sandbox.run_python("print(1)")
        (tmp_path / "config.json").write_text("{}")  # refused before the model is even loaded
        with pytest.raises(EvaluateError, match="allow_code_execution=false"):
            run_evaluate(EvaluateConfig(model_dir=str(tmp_path)))
    finally:
        sandbox._probe.cache_clear()
