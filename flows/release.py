"""Release flow: models/hf + reports/eval -> release/<name>-<version>/ and .tar.gz, optionally
uploaded to S3 and registered in MLflow (``python -m flows release``).

``python -m flows release verify PATH_OR_TARBALL_OR_S3_URI`` checks a release byte for byte."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.cli import main
from tasks.common import tracking
from tasks.common.env import apply_offline_defaults
from tasks.common.storage import S3Settings
from tasks.params import Params, load_params
from tasks.release.bundle import build_bundle, build_tarball, upload
from tasks.release.registry import register
from tasks.release.verify import verify


@flow(name="release")
def release(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> dict:
    """The base model's bundle and, when release.chat_model_dir is set, the chat model's: each
    built, verified, uploaded and registered the same way (``release_one``)."""
    apply_offline_defaults()  # a deployment run starts here, not in flows.cli
    params = load_params(params_file, overrides or [])
    with tracking.stage_run("release", params, "release", parent_run_id) as run:
        lineage_run = parent_run_id or run.info.run_id  # the model card names the pipeline's run
        out = release_one(params, run, lineage_run)
        if params.release.chat_model_dir:
            chat = params.model_copy(update={"release": params.release.chat()})
            out["chat"] = release_one(chat, run, lineage_run)
    return out


def release_one(params: Params, run, lineage_run: str) -> dict:
    cfg, log = params.release, get_run_logger()
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


if __name__ == "__main__":  # the same as python -m flows release
    sys.exit(main(["release", *sys.argv[1:]]))
