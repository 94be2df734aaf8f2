"""The stages' command line: ``python -m flows <stage> [--params P] [key=value ...]``,
``python -m flows params [section ...]`` (every key, its default and meaning) and
``python -m flows release verify PATH``.

Params are validated before Prefect starts; the errors a user can fix end in one clear line and
exit status 2 instead of a traceback (every stage's error class derives from
``tasks.common.errors.UserError``). The process environment's offline defaults are applied here,
in the entry point, before Prefect, MLflow or Hugging Face libraries read it."""

from __future__ import annotations

import atexit
import importlib
import os
import sys

from tasks.common.env import apply_offline_defaults
from tasks.common.errors import EXIT_STOPPED, EXIT_USER_ERROR

EXIT_FAILED = 1
WORKER_DIED = (
    "a worker process of this stage died (killed, or out of memory). Each output is written "
    "whole or not at all, so nothing partial was kept: rerun the stage, with fewer workers "
    "(data.workers, tokenize.workers) if memory is short."
)
# stage -> what it does
STAGES = {
    "ingest": "sources -> cleaned, deduplicated, decontaminated Parquet shards",
    "tokenize": "train a byte-level BPE tokenizer and pack token shards",
    "train": "a Llama-style model with torchrun, checkpointed, exported to Hugging Face format",
    "finetune": "supervised fine-tuning of the base model into a chat model (torchrun)",
    "evaluate": "GPT-4's benchmarks on the base and chat models, offline",
    "release": "a verifiable open-source bundle, uploaded and registered",
    "pipeline": "every stage as one Prefect flow, under one MLflow parent run",
}


def sections_of(stage: str) -> tuple[str, ...]:
    """The params sections a stage reads (what its --help lists)."""
    from tasks.params import SECTIONS

    if stage == "pipeline":
        return SECTIONS
    return ("data" if stage == "ingest" else stage, "infra")


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


def run_cli(stage: str, argv: list[str] | None = None) -> int:
    """Run one stage's flow from the command line. Exit status: 0 done, 2 a problem the user can
    fix (one clear line), 75 stopped (resumable), 1 anything else: a traceback, or for a worker
    process that died, a last line saying so."""
    apply_offline_defaults()
    from concurrent.futures.process import BrokenProcessPool

    from prefect.context import refresh_global_settings_context

    from tasks.common.errors import UserError
    from tasks.common.redaction import install_log_redaction
    from tasks.common.runners import freeze_gc
    from tasks.params import parse_cli
    from tasks.train.launch import TrainStopped

    refresh_global_settings_context()  # Prefect read the environment when first imported
    sections, description = sections_of(stage), STAGES[stage]
    flow_fn = getattr(importlib.import_module(f"flows.{stage}"), stage)
    try:
        # bad params fail here, before any work starts
        params, args = parse_cli(
            argv, f"{stage}: {description}.", sections, prog=f"python -m flows {stage}"
        )
        check = preflight(stage)
        if check is not None:
            check(params)
        install_log_redaction()
        shared_ephemeral_server()
        freeze_gc()
        flow_fn(params_file=args.params, overrides=args.overrides)
    except TrainStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenProcessPool:  # Prefect has logged the run's failure; say what it means
        print(f"error: {WORKER_DIED}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def usage() -> str:
    lines = ["usage: python -m flows <stage> [--params FILE] [key=value ...]", "", "stages:"]
    lines += [f"  {name:<9} {what}" for name, what in STAGES.items()]
    lines += [
        "",
        "  params    every key: python -m flows params [section ...]",
        "  release verify PATH_OR_TARBALL_OR_S3_URI    check a release byte for byte",
        "",
        "python -m flows <stage> --help lists the keys of that stage's section.",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage == "params":
        from tasks.params import SECTIONS, reference_text

        unknown = [s for s in rest if s not in SECTIONS]
        if unknown:
            print(f"error: no section {unknown[0]!r} (sections: {', '.join(SECTIONS)})")
            return 2
        print(reference_text(tuple(rest) or SECTIONS))
        return 0
    if stage == "release" and rest[:1] == ["verify"]:
        return verify_main(rest[1:])
    if stage not in STAGES:
        print(f"error: no stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_cli(stage, rest)


def preflight(stage: str):
    """A stage's data-dependent checks, before any flow, run or process starts."""
    if stage == "train":
        from tasks.train.launch import check_inputs

        return lambda params: check_inputs(params.train)
    if stage == "finetune":
        from tasks.finetune.stage import check_inputs

        return check_inputs
    if stage == "pipeline":  # fine-tuning's run settings, before hours of training
        return lambda params: params.finetune.train_config(params.train)
    return None


def verify_main(argv: list[str]) -> int:
    """``python -m flows release verify PATH``: a release checked byte for byte (exit 1 if not)."""
    if len(argv) != 1:
        print("usage: python -m flows release verify PATH_OR_TARBALL_OR_S3_URI", file=sys.stderr)
        return 2
    from tasks.release.errors import ReleaseError
    from tasks.release.verify import verify

    try:
        report = verify(argv[0])
    except ReleaseError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"OK: {report['files']} files match SHA256SUMS; model loads: {report.get('loaded')}")
    return 0
