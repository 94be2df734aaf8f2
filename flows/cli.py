"""``python -m flows.<stage>``: validate params before Prefect starts, run the flow, and turn the
errors a user can fix into one clear line and exit status 2 instead of a traceback."""

from __future__ import annotations

import atexit
import os
import sys

from tasks.config import ConfigError, parse_cli


def user_errors() -> tuple[type[BaseException], ...]:
    from tasks.evaluate import EvaluateError
    from tasks.finetune import FinetuneError
    from tasks.ingest import IngestError
    from tasks.release import ReleaseError
    from tasks.sources import SourceError
    from tasks.storage import StorageError
    from tasks.tokenize import TokenizeError
    from tasks.train import TrainError

    return (
        ConfigError,
        IngestError,
        SourceError,
        StorageError,
        TokenizeError,
        TrainError,
        FinetuneError,
        EvaluateError,
        ReleaseError,
    )


def shared_ephemeral_server() -> None:
    """Without a configured server, start Prefect's temporary server once and point this process
    and its children at it; otherwise every task worker process would start one of its own."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.context import refresh_global_settings_context
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(
        timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    )
    os.environ["PREFECT_API_URL"] = server.api_url
    refresh_global_settings_context()  # for Prefect's threads that carry no settings of their own
    atexit.register(server.stop)


EXIT_USER_ERROR = 2  # bad params or inputs: the message says what to change
EXIT_FAILED = 1
WORKER_DIED = (
    "a worker process of this stage died (killed, or out of memory). Each output is written "
    "whole or not at all, so nothing partial was kept: rerun the stage, with fewer workers "
    "(data.workers, tokenize.workers) if memory is short."
)


def run_cli(flow_fn, description: str, argv: list[str] | None = None, preflight=None) -> int:
    """Exit status: 0 done, 2 a problem the user can fix (one clear line), 75 stopped (resumable),
    1 anything else: a traceback, or for a worker process that died, a last line saying so.
    ``preflight(params)`` checks inputs before anything starts."""
    from concurrent.futures.process import BrokenProcessPool

    from tasks.redaction import install_log_redaction
    from tasks.runners import freeze_gc
    from tasks.train import EXIT_STOPPED, TrainStopped  # 75: stopped after a checkpoint

    try:
        params, args = parse_cli(argv, description)  # fail on bad params before any work starts
        if preflight is not None:
            preflight(params)
        install_log_redaction()
        shared_ephemeral_server()
        freeze_gc()
        flow_fn(params_file=args.params, overrides=args.overrides)
    except TrainStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenProcessPool:  # Prefect has logged the run's failure; say what it means
        print(f"error: {WORKER_DIED}", file=sys.stderr)
        return EXIT_FAILED
    return 0
