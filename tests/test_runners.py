"""The stages' process pool: workers started on entry, each with its start-up objects frozen."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import psutil

from tasks.env import REPO_ROOT


def _worker_state() -> tuple[int, int]:
    return os.getpid(), gc.get_freeze_count()


def _pool_workers() -> set[int]:
    return {
        p.pid
        for p in psutil.Process().children()
        if any("spawn_main" in arg for arg in p.cmdline())
    }


def test_pool_workers_start_on_entry_and_freeze_their_start_up_objects(prefect_server):
    """Both workers exist before the first task is submitted (their start-up overlaps the
    driver's), every task runs on one of them, and each froze what its start-up imported."""
    from prefect import flow

    from tasks.config import InfraConfig
    from tasks.runners import task_map, task_runner

    @flow
    def on_a_pool():
        before = _pool_workers()
        with task_runner(InfraConfig(), 2) as runner:
            started = _pool_workers() - before
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
        "from tasks.runners import freeze_gc\n"
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
