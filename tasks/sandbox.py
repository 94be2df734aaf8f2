"""Run untrusted (model-generated) Python in a sandboxed subprocess.

Limits: wall-clock timeout (the process group is killed), address space and CPU time (rlimits), file
size, no inherited environment (so no secrets), a fresh temporary working directory, isolated mode
(``python -I``), and no network: a new network namespace when ``unshare`` is permitted here, and
in any case the socket module's connecting calls are disabled before the code runs.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache

_PRELUDE = """\
import socket as _s
def _blocked(*a, **k):
    raise OSError("network access is disabled in the sandbox")
for _n in ("connect", "connect_ex", "sendto", "bind"):
    setattr(_s.socket, _n, _blocked)
_s.create_connection = _blocked
_s.getaddrinfo = _blocked
del _s, _blocked, _n
"""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    reason: str  # "passed", "failed: <last line>", "timed out", "memory limit"


@lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """``unshare -n`` (or ``-rn`` without root) when this machine allows new network namespaces."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    for flags in (("-n",), ("-rn",)):
        try:
            ok = (
                subprocess.run([exe, *flags, "true"], capture_output=True, timeout=10).returncode
                == 0
            )
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return (exe, *flags)
    return ()


def _limits(memory_mb: int, cpu_s: int) -> None:
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(code: str, timeout_s: float = 10.0, memory_mb: int = 512) -> SandboxResult:
    with tempfile.TemporaryDirectory(prefix="llmforge-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w") as f:
            f.write(_PRELUDE + "\n" + code + "\n")
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": tmp,
        }
        cmd = [*_unshare_prefix(), sys.executable, "-I", path]
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=tmp,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=lambda: _limits(memory_mb, int(timeout_s) + 1),
            )
        except OSError as exc:
            return SandboxResult(False, f"failed: could not start ({exc})")
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return SandboxResult(False, "timed out")
        if proc.returncode == 0:
            return SandboxResult(True, "passed")
        text = err.decode("utf-8", "replace").strip().splitlines()
        last = text[-1] if text else f"exit {proc.returncode}"
        if "MemoryError" in last or proc.returncode in (-9,) and not text:
            return SandboxResult(False, "memory limit")
        return SandboxResult(False, f"failed: {last[:200]}")
