"""The stages' process pool: workers started on entry, each with its start-up objects frozen."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time

from tasks.common.env import REPO_ROOT
from tests.conftest import pool_workers


def _worker_state() -> tuple[int, int]:
    return os.getpid(), gc.get_freeze_count()


def test_pool_workers_start_on_entry_and_freeze_their_start_up_objects(prefect_server):
    """Both workers exist before the first task is submitted (their start-up overlaps the
    driver's), every task runs on one of them, and each froze what its start-up imported."""
    from prefect import flow

    from tasks.common.infra import InfraConfig
    from tasks.common.runners import task_map, task_runner

    @flow
    def on_a_pool():
        before = pool_workers()
        with task_runner(InfraConfig(), 2) as runner:
            started = pool_workers() - before
            states = task_map(runner, print)(_worker_state, [{} for _ in range(6)])
        return started, states

    started, states = on_a_pool()
    assert len(started) == 2
    assert {pid for pid, _ in states} <= started
    assert all(frozen > 10_000 for _, frozen in states), states  # Prefect's modules, at least


def test_freeze_gc_still_collects_what_is_made_afterwards():
    """Freezing exempts what is alive from the cyclic GC; cycles made later are still collected
    (nothing leaks)."""
    code = (
        "import atexit, gc, weakref\n"
        "from tasks.common.runners import freeze_gc\n"
        "class Node: pass\n"
        "freeze_gc()\n"
        "frozen = gc.get_freeze_count()\n"
        "a = Node(); a.me = a; ref = weakref.ref(a); del a\n"
        "gc.collect()\n"
        "print(frozen, ref() is None)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    frozen, collected = out.stdout.split()
    assert int(frozen) > 1_000 and collected == "True"


def _touch_after(path: str, gate: str | None = None) -> str:
    deadline = time.monotonic() + 60
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    with open(path, "w") as f:
        f.write(path)
    return path


def test_start_map_runs_the_jobs_while_the_caller_goes_on(prefect_server, tmp_path):
    """``start_map`` on the pool returns at once and the jobs run while the caller does other
    work (the ingest flow opens its MLflow run then); the results come back in order. With
    ``serial_map`` nothing runs until the results are asked for."""
    from prefect import flow

    from tasks.common.infra import InfraConfig
    from tasks.common.runners import serial_map, start_map, task_map, task_runner

    paths = [str(tmp_path / f"job-{i}") for i in range(4)]
    gate = str(tmp_path / "gate")  # the last job waits until the caller has seen the others run
    jobs = [{"path": p} for p in paths[:3]] + [{"path": paths[3], "gate": gate}]

    @flow
    def on_a_pool():
        with task_runner(InfraConfig(), 2) as runner:
            results = start_map(task_map(runner, print), _touch_after, jobs)
            deadline = time.monotonic() + 60
            while not all(os.path.exists(p) for p in paths[:3]) and time.monotonic() < deadline:
                time.sleep(0.05)
            ran_before_asked = sorted(p for p in paths if os.path.exists(p))
            open(gate, "w").close()
            return ran_before_asked, results()

    ran_before_asked, results = on_a_pool()
    assert ran_before_asked == paths[:3]
    assert results == paths

    for p in paths:
        os.remove(p)
    serial = start_map(serial_map, _touch_after, [{"path": p} for p in paths])
    assert not any(os.path.exists(p) for p in paths)
    assert serial() == paths and all(os.path.exists(p) for p in paths)


def test_bound_heap_gives_large_arrays_their_own_mapping():
    """By default glibc raises its mapping threshold to the size of each large block freed, so
    the next array just below it comes from the heap, where it fragments what is freed around it
    (a worker cleaning a 29 MB shard: heap 75 -> 103 MB, 44 MB of it free). After
    ``bound_heap`` a 1.5 MB array still gets a mapping of its own, handed back when freed
    (measured in fresh interpreters, with and without it; the memory effect is in
    ``bench/data_scale.py``)."""
    code = (
        "import ctypes, sys, numpy as np\n"
        "from tasks.common.runners import bound_heap\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in\n"
        "        'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.mallinfo2.restype = Info\n"
        "if sys.argv[1] == 'bound': bound_heap()\n"
        "a = np.ones(1 << 18)  # 2 MB, mapped\n"
        "del a  # by default the threshold rises to 2 MB here\n"
        "before = libc.mallinfo2().hblks\n"
        "b = np.ones(3 << 16)  # 1.5 MB\n"
        "print(libc.mallinfo2().hblks - before)\n"
    )
    own_mappings = {}
    for mode in ("default", "bound"):
        out = subprocess.run(
            [sys.executable, "-c", code, mode],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        own_mappings[mode] = int(out.stdout)
    assert own_mappings == {"default": 0, "bound": 1}
