"""``python -m flows.<stage>``: validate params before Prefect starts, run the flow, and turn the
errors a user can fix into one clear line and exit status 2 instead of a traceback."""

from __future__ import annotations

import atexit
import os
import sys

from tasks.config import ConfigError, parse_cli


def user_errors() -> tuple[type[BaseException], ...]:
    from tasks.evaluate import EvaluateError
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
        EvaluateError,
        ReleaseError,
    )


def shared_ephemeral_server() -> None:
    """Without a configured server, start Prefect's temporary server once and point this process
    and its children at it; otherwise every task worker process would start one of its own."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(
        timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    )
    os.environ["PREFECT_API_URL"] = server.api_url
    atexit.register(server.stop)


def run_cli(flow_fn, description: str, argv: list[str] | None = None) -> int:
    try:
        _, args = parse_cli(argv, description)  # fail on bad params before any work starts
        shared_ephemeral_server()
        flow_fn(params_file=args.params, overrides=args.overrides)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
