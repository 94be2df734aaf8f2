"""The MLflow Model Registry: a version per release with its evaluation as description and tags;
alias ``candidate`` on the newest, ``champion`` only on a version that passed the gate and beats
the current champion."""

from __future__ import annotations

from pathlib import Path

from tasks.common.benchmarks import PROGRESS
from tasks.common.storage import is_s3


def version_notes(manifest: dict) -> tuple[str, dict[str, str]]:
    """The registry version's description and tags: release, gate and every evaluation figure."""
    gate = manifest["gate"]
    scores = {k: v for k, v in sorted(manifest["evaluation"].items()) if isinstance(v, int | float)}
    lines = [
        f"**{manifest['name']} {manifest['version']}** ({manifest['license']}), released by llmforge.",
        "",
        "Evaluation gate: "
        + ("passed" if gate["passed"] else "FAILED: " + "; ".join(gate["reasons"])),
        "",
        "| benchmark | score |",
        "|---|---:|",
        *(f"| {k} | {v:.2f} {'bits/byte' if k in PROGRESS else '%'} |" for k, v in scores.items()),
        "",
        f"Git commit `{manifest['lineage']['git_commit']}`. Scores in % (higher is better); "
        "bits per byte of gold answers (lower is better) where marked.",
    ]
    tags = {
        "release": f"{manifest['name']}-{manifest['version']}",
        "gate": "passed" if gate["passed"] else "failed",
        "git_commit": str(manifest["lineage"]["git_commit"]),
        **{f"eval.{k}": f"{v:.4g}" for k, v in scores.items()},
    }
    if isinstance(manifest.get("val_bpb"), int | float):
        # Full precision (repr round-trips): the champion rule compares the next version with it.
        tags["eval.val_bpb"] = repr(float(manifest["val_bpb"]))
    return "\n".join(lines), tags


def champion_verdict(manifest: dict, champion_tags: dict | None) -> tuple[bool, str]:
    """Whether a new version takes the ``champion`` alias, and why: it must pass the gate and
    beat the current champion's held-out bits per byte (or there is no champion yet)."""
    if not manifest["gate"]["passed"]:
        return False, "the evaluation gate failed"
    if champion_tags is None:
        return True, "there was no champion"
    new, old = manifest.get("val_bpb"), champion_tags.get("eval.val_bpb")
    if old is None:
        return True, "the champion has no val_bpb to compare with"
    if new is None:
        return False, "this version has no val_bpb to compare with the champion's"
    if new < float(old):
        return True, f"val_bpb {new:.6f} beats the champion's {float(old):.6f}"
    return False, f"val_bpb {new:.6f} does not beat the champion's {float(old):.6f}"


def register(cfg, source: str, run_id: str, manifest: dict) -> dict:
    """A version in the MLflow Model Registry with the release's evaluation as its description and
    tags; alias ``candidate``, and ``champion`` when it passed the gate and beats the current
    champion (``champion_verdict``)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if not is_s3(source):
        # A tracking server accepts a local source only inside the run's artifacts: log the
        # bundle there (it is also what a registry user downloads) and point the version at it.
        # bundles/<name>-<version>: the base and chat bundles of one release run stay apart.
        where = f"bundles/{Path(source).name}"
        mlflow.log_artifacts(source, where)
        source = mlflow.get_artifact_uri(where)
    try:
        client.get_registered_model(cfg.registered_model)
    except MlflowException:
        client.create_registered_model(
            cfg.registered_model, description="Models released by llmforge"
        )
    description, tags = version_notes(manifest)
    mv = client.create_model_version(
        cfg.registered_model, source=source, run_id=run_id, tags=tags, description=description
    )
    try:
        current = client.get_model_version_by_alias(cfg.registered_model, "champion").tags
    except MlflowException:  # no champion yet
        current = None
    crowned, why = champion_verdict(manifest, current)
    aliases = ["candidate"] + (["champion"] if crowned else [])
    for alias in aliases:
        client.set_registered_model_alias(cfg.registered_model, alias, mv.version)
    return {
        "name": cfg.registered_model,
        "version": mv.version,
        "aliases": aliases,
        "champion": ("champion: " if crowned else "not champion: ") + why,
    }
