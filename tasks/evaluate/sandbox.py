"""Run untrusted (model-generated) Python isolated from the machine.

The program runs in new Linux namespaces made with ``unshare`` (util-linux): a PID namespace (it
sees only its own processes, so no other process's ``/proc/<pid>/environ``; when it ends, every
process it started dies with it, ``setsid`` or not), a network namespace with no interface up, and
a mount namespace whose root is an empty tmpfs holding only read-only system folders (``/usr``,
``/lib``..., the interpreter's own prefix), a private ``/tmp`` and its working folder. No home, no
repository, no ``/etc/shadow``. As root it also drops to ``nobody``; otherwise a user namespace maps
the caller. Limits: wall clock (the whole process tree is killed), CPU time, address space, file
size, open files and a process count. The environment is empty but for PATH and LANG.

Where namespaces cannot be made (a locked-down container), :func:`check_available` says so and
callers refuse to execute code: there is no best-effort fallback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

NOBODY = 65534
MAX_PROCS = 32  # processes the program may have at once (a fork bomb stops there)

# Runs as PID 1 of the new namespaces, before the program: build the root, drop privileges, exec.
_BOOTSTRAP = r"""
import ctypes, json, os, resource, sys
c = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: s.encode() if s else None
    if libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)):
        e = ctypes.get_errno()
        raise OSError(e, "mount %s on %s: %s" % (src, dst, os.strerror(e)))
def bind(src, dst, writable=False):
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    mount(src, dst, None, BIND | REC)
    if not writable:
        try:
            mount(None, dst, None, BIND | REMOUNT | RDONLY | NOSUID | NODEV)
        except OSError:  # a source mounted noexec keeps that flag locked in a user namespace
            mount(None, dst, None, BIND | REMOUNT | RDONLY | NOSUID | NODEV | NOEXEC)
root = c["root"]
mount(None, "/", None, REC | PRIVATE)
mount("tmpfs", root, "tmpfs", NOSUID | NODEV, "size=1m,mode=755")
for d in c["ro"]:
    if os.path.islink(d):
        os.makedirs(os.path.dirname(root + d), exist_ok=True)
        os.symlink(os.readlink(d), root + d)
    elif os.path.exists(d):
        bind(d, root + d)
for dev in ("null", "zero", "random", "urandom"):
    bind("/dev/" + dev, root + "/dev/" + dev, writable=True)
os.makedirs(root + "/proc")
mount("proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)
os.makedirs(root + "/tmp")
mount("tmpfs", root + "/tmp", "tmpfs", NOSUID | NODEV, "size=16m,mode=1777")
bind(c["work"], root + "/sandbox", writable=True)
mount(None, root, None, BIND | REMOUNT | RDONLY | NOSUID | NODEV)
os.chroot(root)
os.chdir("/sandbox")
if c["drop"]:
    os.setgroups([])
    os.setgid(c["drop"])
    os.setuid(c["drop"])
for name, value in c["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
os.execve(c["python"], [c["python"], "-I", "program.py"], c["env"])
"""


class SandboxUnavailable(RuntimeError):
    """No isolation can be made on this machine; code is not executed."""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    reason: str  # "passed", "failed: <last line>", "timed out", "memory limit"


def _python() -> str:
    """The real interpreter (not a venv's link, whose folder is not mounted in the sandbox)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _read_only_paths() -> list[str]:
    prefix = os.path.realpath(sys.base_prefix)
    paths = ["/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache"]
    if not any(prefix == p or prefix.startswith(p + "/") for p in paths):
        paths.append(prefix)
    return paths


def _unshare_cmd() -> list[str]:
    exe = shutil.which("unshare")
    if not exe:
        raise SandboxUnavailable("the unshare command (util-linux) is not installed")
    flags = ["--fork", "--pid", "--mount", "--net", "--ipc", "--uts", "--kill-child"]
    if os.geteuid() != 0:
        flags += ["--user", "--map-root-user"]
    return [exe, *flags]


def _processes_of(uid: int) -> int:
    n = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            for line in status.read_text().splitlines():
                if line.startswith("Uid:"):
                    n += int(line.split()[1]) == uid
                    break
        except (OSError, ValueError, IndexError):
            continue
    return n


def _launch(code: str, timeout_s: float, memory_mb: int) -> tuple[int | None, str]:
    """(exit status or None on timeout, stderr) of ``code`` in the sandbox."""
    with tempfile.TemporaryDirectory(prefix="llmforge-sandbox-") as tmp:
        work, root = Path(tmp, "work"), Path(tmp, "root")
        work.mkdir()
        root.mkdir()
        (work / "program.py").write_text(code + "\n")
        drop = NOBODY if os.geteuid() == 0 else 0
        if drop:
            os.chown(work, NOBODY, -1)
        uid = drop or os.getuid()
        cpu = int(timeout_s) + 1
        conf = {
            "root": str(root),
            "work": str(work),
            "ro": _read_only_paths(),
            "python": _python(),
            "drop": drop,
            "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"},
            "limits": {
                "RLIMIT_AS": memory_mb << 20,
                "RLIMIT_CPU": cpu,
                "RLIMIT_FSIZE": 16 << 20,
                "RLIMIT_CORE": 0,
                "RLIMIT_NOFILE": 256,
                # Counted per user across the machine: what the user runs already, plus ours.
                "RLIMIT_NPROC": _processes_of(uid) + MAX_PROCS,
            },
        }
        cmd = [*_unshare_cmd(), _python(), "-I", "-c", _BOOTSTRAP, json.dumps(conf)]
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=tmp,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise SandboxUnavailable(f"could not start unshare: {exc}") from exc
        try:
            _, err = proc.communicate(timeout=timeout_s)
            return proc.returncode, err.decode("utf-8", "replace")
        except subprocess.TimeoutExpired:
            # unshare dies, its child (PID 1 of the namespace) gets SIGKILL through --kill-child,
            # and with it every process of the namespace.
            os.killpg(proc.pid, 9)
            proc.communicate()
            return None, ""


@lru_cache(maxsize=1)
def _probe() -> str:
    try:
        status, err = _launch("print('ok')", 30, 512)
    except SandboxUnavailable as exc:
        return str(exc)
    if status != 0:
        last = (err.strip().splitlines() or [f"exit {status}"])[-1]
        return f"isolated namespaces cannot be made here ({last})"
    return ""


def check_available() -> None:
    """Raise :class:`SandboxUnavailable` unless programs can run isolated on this machine."""
    reason = _probe()
    if reason:
        raise SandboxUnavailable(
            f"the code sandbox is unavailable: {reason}. Generated code is only run isolated "
            "(Linux user, PID, mount and network namespaces); run where unshare works, or set "
            "evaluate.allow_code_execution=false to skip execution-based scores"
        )


def run_python(code: str, timeout_s: float = 10.0, memory_mb: int = 512) -> SandboxResult:
    check_available()
    status, err = _launch(code, timeout_s, memory_mb)
    if status is None:
        return SandboxResult(False, "timed out")
    if status == 0:
        return SandboxResult(True, "passed")
    lines = err.strip().splitlines()
    last = lines[-1] if lines else f"exit {status}"
    if "MemoryError" in last or (status == -9 and not lines):
        return SandboxResult(False, "memory limit")
    return SandboxResult(False, f"failed: {last[:200]}")
