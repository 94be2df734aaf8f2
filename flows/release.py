"""Release flow: models/hf + reports/eval -> release/<name>-<version>/ and .tar.gz, optionally
uploaded to S3 and registered in MLflow (``python -m flows.release``).

``python -m flows.release verify PATH_OR_TARBALL_OR_S3_URI`` checks a release byte for byte."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.cli import run_cli
from tasks import tracking
from tasks.config import Params, load_params
from tasks.release import ReleaseError, build_bundle, build_tarball, register, upload, verify
from tasks.storage import S3Settings


@flow(name="release")
def release(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """The base model's bundle and, when release.chat_model_dir is set, the chat model's: each
    built, verified, uploaded and registered the same way (``release_one``)."""
    params = load_params(params_file, overrides or [])
    with tracking.stage_run("release", params, "release") as run:
        out = release_one(params, run)
        if params.release.chat_model_dir:
            chat = params.model_copy(update={"release": params.release.chat()})
            out["chat"] = release_one(chat, run)
    return out


def release_one(params: Params, run) -> dict:
    cfg, log = params.release, get_run_logger()
    lineage_run = os.environ.get(tracking.PARENT_ENV) or run.info.run_id
    bundle = build_bundle(params, lineage_run)
    tarball = build_tarball(bundle)
    report = verify(str(bundle))
    log.info(
        "built %s (%d files, verified, loads: %s) and %s",
        bundle,
        report["files"],
        report.get("loaded"),
        tarball,
    )
    out = {"bundle": str(bundle), "tarball": str(tarball), "uploaded": [], "registered": None}
    if cfg.s3_uri:
        out["uploaded"] = upload(bundle, tarball, cfg.s3_uri, S3Settings.from_infra(params.infra))
        log.info("uploaded %d objects to %s", len(out["uploaded"]), cfg.s3_uri)
    manifest = json.loads((bundle / "manifest.json").read_text())
    if cfg.register_model:
        source = (
            f"{cfg.s3_uri.rstrip('/')}/{bundle.name}" if cfg.s3_uri else str(Path(bundle).resolve())
        )
        out["registered"] = register(cfg, source, run.info.run_id, manifest)
        log.info(
            "registered %(name)s version %(version)s, aliases %(aliases)s (%(champion)s)",
            out["registered"],
        )
    import mlflow

    mlflow.log_dict(manifest, f"{bundle.name}/manifest.json")
    mlflow.log_artifact(str(bundle / "README.md"), bundle.name)
    create_markdown_artifact(
        key=f"release-{cfg.name}".lower().replace("_", "-").replace(".", "-"),
        markdown=f"# Release {bundle.name}\n\n| | |\n|---|---|\n| bundle | `{bundle}` |\n"
        f"| tarball | `{tarball}` |\n| gate | {'passed' if manifest['gate']['passed'] else 'FAILED'} |\n"
        + (
            f"| registry | {out['registered']['name']} version {out['registered']['version']}, "
            f"aliases {', '.join(out['registered']['aliases']) or 'none'} |\n"
            if out["registered"]
            else "| registry | not registered (release.register_model) |\n"
        )
        + f"| uploaded | {len(out['uploaded'])} objects{' to ' + cfg.s3_uri if cfg.s3_uri else ''} |\n",
    )
    return out


def verify_main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m flows.release verify PATH_OR_TARBALL_OR_S3_URI", file=sys.stderr)
        return 2
    try:
        report = verify(argv[0])
    except ReleaseError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"OK: {report['files']} files match SHA256SUMS; model loads: {report.get('loaded')}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["verify"]:
        sys.exit(verify_main(sys.argv[2:]))
    sys.exit(run_cli(release, "Release: a verifiable open-source bundle, uploaded and registered."))
