"""The Prefect task runner for a stage's parallel tasks, chosen by ``infra.task_runner``.

``process``: a local process pool (one worker per ``workers``). ``dask``: Prefect's Dask runner,
on the scheduler at ``infra.dask_address`` or, without one, on a local Dask cluster of ``workers``
single-threaded processes bound to 127.0.0.1. Flows submit the same tasks either way.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import logging
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

from tasks.common.infra import InfraConfig

T = TypeVar("T")


def as_task(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` as one Prefect task run named ``name`` when called inside a flow, so the flow's
    timeline in the UI shows each long step with its duration and state; a plain call otherwise.
    It runs in the calling thread (signal handlers keep working), is never cached, and keeps no
    result: a step's outputs are its files."""
    from prefect import task
    from prefect.cache_policies import NONE
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return fn()
    return task(fn, name=name, cache_policy=NONE, persist_result=False)()


# How a stage maps a plain function over jobs: ``map_fn(fn, kwargs_list, label, weights, docs)``
# returns ``[fn(**kw) for kw in kwargs_list]`` in order. ``weights`` (bytes) drive the progress
# line, and ``docs(result)``, when given, the documents it counts. Tests and benchmarks call the
# stages with ``serial_map``; the flows pass ``task_map``. A stage that has other work to do while
# the jobs run calls ``start_map`` instead.
MapFn = Callable[..., list]


def serial_map(
    fn: Callable,
    kwargs_list: list[dict],
    label: str = "",
    weights: list[float] | None = None,
    docs: Callable | None = None,
) -> list:
    return [fn(**kw) for kw in kwargs_list]


def start_map(map_fn: MapFn, fn: Callable, kwargs_list: list[dict], *args) -> Callable[[], list]:
    """``map_fn(fn, kwargs_list, *args)`` begun now where ``map_fn`` can run jobs in the
    background (``task_map``'s workers), and what waits for its results. With ``serial_map`` the
    jobs run when the results are asked for."""
    start = getattr(map_fn, "start", None)
    if start is None:
        return functools.partial(map_fn, fn, kwargs_list, *args)
    return start(fn, kwargs_list, *args)


def release_memory() -> None:
    """Hand the memory a finished task freed back to the OS: Arrow's pool and glibc's heap keep
    it otherwise, and a long-lived worker's footprint creeps up task after task (on the 405 MB
    ingest benchmark, by ~80 MB per worker). What Dask's workers do when they trim memory."""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def bound_heap() -> None:
    """glibc: give every allocation of 1 MB or more (numpy's working arrays) its own mapping,
    handed back to the OS when freed. By default the threshold rises to each large block freed,
    so later arrays come from the heap and fragment it: a worker cleaning 29 MB shards peaked at
    292-357 MB, its heap at 75 -> 103 MB with 44 MB of it free. With this (and the per-batch
    buffers reused, ``tasks.ingest.dedup._scratch``) it peaks at 283-296 MB, at 2-3% more CPU. The trim
    threshold is set with it (fixing one stops glibc adjusting both), high, so the heap's top is
    not handed back and faulted in again batch after batch; :func:`release_memory` trims after
    each task. Called in each worker of the stages' process pool."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # glibc only
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD


def _released(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(**kwargs):
        try:
            return fn(**kwargs)
        finally:
            release_memory()

    return run


@functools.cache
def _prefect_task(fn: Callable):
    from prefect import task
    from prefect.cache_policies import NONE

    # No cache key and no persisted result: a task's outputs are its files, and its return value
    # comes back through the runner. (The default policy hashes every input on every run.)
    return task(
        _released(fn),
        name=fn.__name__.replace("_", "-"),
        retries=1,
        cache_policy=NONE,
        persist_result=False,
    )


def task_map(runner: TaskRunner, log: Callable[[str], None]) -> MapFn:
    """A ``MapFn`` that runs each job as a Prefect task run (retried once) on ``runner`` and logs
    progress in MB with a rate and an ETA as jobs complete, whatever order they complete in. Its
    ``start`` submits every job at once and returns what collects the results (``start_map``)."""
    from prefect.futures import as_completed

    from tasks.common.summary import Progress

    def start(fn, kwargs_list, label="", weights=None, docs=None) -> Callable[[], list]:
        sizes = weights or [1] * len(kwargs_list)
        progress = Progress(label or fn.__name__, sum(sizes), log, unit=" MB", scale=1e-6)
        futures = [runner.submit(_prefect_task(fn), kw) for kw in kwargs_list]

        def results() -> list:
            where = {id(f): i for i, f in enumerate(futures)}
            out: list = [None] * len(futures)
            n_docs = 0
            for f in as_completed(futures):
                i = where[id(f)]
                out[i] = f.result()
                n_docs += docs(out[i]) if docs else 0
                progress.advance(sizes[i], f", {n_docs:,} docs" if docs else "")
            return out

        return results

    def map_fn(fn, kwargs_list, label="", weights=None, docs=None) -> list:
        return start(fn, kwargs_list, label, weights, docs)()

    map_fn.start = start
    return map_fn


def freeze_gc() -> None:
    """Exempt what is alive now from the cyclic GC, and everything at exit.

    Each full collection rescans every live object, and the interpreter's teardown does once
    more. Frozen objects are still freed by reference counting; the OS takes the rest at exit.
    Called after the imports, in a stage's main process and in each pool worker. On the 405 MB
    ingest: the driver's GC time 0.95 -> 0.56 s, and its teardown after the last log line
    0.8 -> 0.08 s."""
    gc.freeze()
    atexit.register(gc.freeze)


def _worker_setup() -> None:
    freeze_gc()
    bound_heap()


class WarmProcessPool(ProcessPoolTaskRunner):
    """Prefect's process pool with its workers started as it is entered, not at the first task:
    a spawned worker's interpreter and imports (~1 CPU-s) then overlap the driver's own serial
    start (the MLflow run, planning) instead of following it. On the 405 MB ingest benchmark that
    is about a second of wall time on 2 cores."""

    def __init__(self, max_workers: int):
        super().__init__(max_workers=max_workers, initializer=_worker_setup)
        self.workers = max_workers

    def __enter__(self) -> WarmProcessPool:
        super().__enter__()
        pool = getattr(self, "_executor", None)  # Prefect's executor; without one, start lazily
        if isinstance(pool, ProcessPoolExecutor):
            for _ in range(self.workers):  # each submission to a busy pool starts a worker
                pool.submit(os.getpid)
        return self


def task_runner(infra: InfraConfig, workers: int) -> TaskRunner:
    if infra.task_runner == "process":
        return WarmProcessPool(workers)
    # Dask logs every connection and worker event at INFO; keep the stage's log readable unless
    # the user asked for more (the variable reaches the worker processes too).
    level = os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.getLogger("distributed").setLevel(level.upper())
    from prefect_dask import DaskTaskRunner

    if infra.dask_address:
        return DaskTaskRunner(address=infra.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,  # no web server unless asked for
        },
    )


def describe(infra: InfraConfig, workers: int) -> str:
    if infra.task_runner == "process":
        return f"{workers} worker process(es)"
    return (
        f"Dask at {infra.dask_address}" if infra.dask_address else f"local Dask, {workers} workers"
    )
