"""``python -m flows.<stage>``: validate params before Prefect starts, run the flow, and turn the
errors a user can fix into one clear line and exit status 2 instead of a traceback."""

from __future__ import annotations

import sys

from tasks.config import ConfigError, parse_cli


def user_errors() -> tuple[type[BaseException], ...]:
    from tasks.ingest import IngestError
    from tasks.sources import SourceError
    from tasks.storage import StorageError

    return (ConfigError, IngestError, SourceError, StorageError)


def run_cli(flow_fn, description: str, argv: list[str] | None = None) -> int:
    try:
        _, args = parse_cli(argv, description)  # fail on bad params before any work starts
        flow_fn(params_file=args.params, overrides=args.overrides)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
