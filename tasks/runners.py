"""The Prefect task runner for a stage's parallel tasks, chosen by ``infra.task_runner``.

``process``: a local process pool (one worker per ``workers``). ``dask``: Prefect's Dask runner,
on the scheduler at ``infra.dask_address`` or, without one, on a local Dask cluster of ``workers``
single-threaded processes bound to 127.0.0.1. Flows submit the same tasks either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

from tasks.config import InfraConfig

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


def gather(
    futures: list, weights: list[float], progress, extra: Callable[[object], str] | None = None
) -> list:
    """The futures' results in submission order, advancing ``progress`` by each one's weight
    (bytes, documents) as it completes, with ``extra(result)`` appended to the line."""
    from prefect.futures import as_completed

    where = {id(f): i for i, f in enumerate(futures)}
    results: list = [None] * len(futures)
    for f in as_completed(futures):
        i = where[id(f)]
        results[i] = f.result()
        progress.advance(weights[i], extra(results[i]) if extra else "")
    return results


def task_runner(infra: InfraConfig, workers: int) -> TaskRunner:
    if infra.task_runner == "process":
        return ProcessPoolTaskRunner(max_workers=workers)
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
