"""The Prefect task runner for a stage's parallel tasks, chosen by ``infra.task_runner``.

``process``: a local process pool (one worker per ``workers``). ``dask``: Prefect's Dask runner,
on the scheduler at ``infra.dask_address`` or, without one, on a local Dask cluster of ``workers``
single-threaded processes bound to 127.0.0.1. Flows submit the same tasks either way.
"""

from __future__ import annotations

import logging
import os

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

from tasks.config import InfraConfig


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
