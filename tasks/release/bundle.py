"""The release bundle: ``release/<name>-<version>/`` holds the model (safetensors only), tokenizer,
generation config, GGUF files for llama.cpp, a model card with full lineage, the license and the
data sources' notices, ``manifest.json`` and ``SHA256SUMS``; ``release/<name>-<version>.tar.gz``
is built reproducibly (sorted entries, fixed mtimes and owners, a gzip header without a
timestamp). ``tasks.release.verify`` checks one; ``tasks.release.registry`` registers it.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import sysconfig
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from tasks.common.config import to_flat_dict
from tasks.common.records import DataCard, EvalResults, RunSummary, TokenIndex
from tasks.common.redaction import redact_text
from tasks.common.storage import S3Settings, atomic_dir, sha256_file, upload_file
from tasks.common.tracking import git_commit, redact
from tasks.release.card import ReleaseInputs, model_card
from tasks.release.config import ReleaseConfig
from tasks.release.errors import ReleaseError

if TYPE_CHECKING:
    from tasks.params import Params

LICENSES = Path(__file__).with_name("licenses")
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def dvc_lineage(lock_path: Path = Path("dvc.lock"), this_stage: str = "release") -> dict:
    """The output hashes of the stages this release is built from, from dvc.lock: every stage
    but the release's own, whose entry there is the previous release (its new hash is not known
    until it has been written)."""
    if not lock_path.exists():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    return {
        stage: {o["path"]: o.get("md5") for o in spec.get("outs", [])}
        for stage, spec in sorted(lock.get("stages", {}).items())
        if stage != this_stage
    }


def load_inputs(cfg: ReleaseConfig) -> ReleaseInputs:
    """The records, after the checks a release needs: a complete safetensors model (no pickles)
    and a passed gate (or ``release.allow_failed_gate``)."""
    model = Path(cfg.model_dir)
    missing = [f for f in MODEL_FILES if not (model / f).exists()]
    if missing:
        raise ReleaseError(f"{model} lacks {', '.join(missing)}: run the train stage first")
    pickles = [
        f.name for f in model.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")
    ]
    if pickles:
        raise ReleaseError(
            f"{model} holds pickle files ({', '.join(pickles)}); a release carries safetensors only"
        )
    results = EvalResults.read(cfg.eval_dir)
    if not results.gate.passed and not cfg.allow_failed_gate:
        raise ReleaseError(
            "the evaluation gate failed ("
            + "; ".join(results.gate.reasons)
            + "); fix the model, or set release.allow_failed_gate=true to release anyway (the "
            "model card will say so)"
        )
    return ReleaseInputs(
        results=results,
        card=DataCard.read(cfg.data_dir),
        run=RunSummary.read(cfg.train_summary),
        mixture=TokenIndex.read(cfg.tokens_dir).mixture,
        config=json.loads((model / "config.json").read_text()),
        chat_template=json.loads((model / "tokenizer_config.json").read_text()).get(
            "chat_template"
        ),
    )


def data_notices(card: DataCard) -> str:
    lines = ["# Data sources and their licenses", ""]
    for s in card.sources:
        lines.append(f"- {s.name} ({s.uri}): {s.license}")
    text = "\n".join(lines) + "\n"
    if any(s.uri == "stdlib" for s in card.sources):
        psf = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
        if psf.exists():
            text += "\n## Python standard library (PSF-2.0)\n\n" + psf.read_text(errors="replace")
    return text


def write_ggufs(cfg: ReleaseConfig, bundle: Path) -> dict:
    """The GGUF files of ``release.gguf`` beside the safetensors in ``bundle``, each read back and
    compared (tensors, tokenizer) before it counts: ``{"files": {name: check figures}}``, or
    ``{"skipped": why}`` when llama.cpp has no pre-tokenizer for this tokenizer."""
    from tasks.release.gguf import (
        GGUFError,
        NoPreTokenizer,
        check_gguf,
        gguf_tensors,
        sample_texts,
        write_gguf,
    )

    if not cfg.gguf:
        return {"skipped": "release.gguf is empty"}
    files, tensors, texts = {}, gguf_tensors(bundle), sample_texts()
    for kind in cfg.gguf:
        path = bundle / f"{cfg.name}-{cfg.version}-{kind}.gguf"
        try:
            write_gguf(bundle, path, f"{cfg.name}-{cfg.version}", kind, tensors)
            files[path.name] = check_gguf(path, bundle, texts, tensors)
        except NoPreTokenizer as exc:  # raised before any file is written
            return {"skipped": str(exc)}
        except GGUFError as exc:
            raise ReleaseError(f"GGUF {kind}: {exc}") from exc
    return {"files": files}


def build_bundle(p: Params, mlflow_run_id: str, out_root: str | None = None) -> Path:
    """Write ``release/<name>-<version>/`` atomically and return its path."""
    cfg = p.release
    inputs = load_inputs(cfg)
    lineage = {"git_commit": git_commit(), "mlflow_run_id": mlflow_run_id, "dvc": dvc_lineage()}
    root = Path(out_root or cfg.out_dir)
    final = root / f"{cfg.name}-{cfg.version}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ReleaseError(
            f"cannot write the release to {root} ({exc.strerror}); set release.out_dir to a "
            "writable folder"
        ) from exc
    with atomic_dir(final) as tmp:
        for f in MODEL_FILES:
            shutil.copy2(Path(cfg.model_dir) / f, tmp / f)
        gguf = write_ggufs(cfg, tmp)
        if (Path(cfg.eval_dir) / "comparison.png").exists():
            shutil.copy2(Path(cfg.eval_dir) / "comparison.png", tmp / "comparison.png")
        report = Path(cfg.eval_dir) / "comparison.md"
        # Params cannot hold secrets (load_params refuses them); the card is redacted all the same,
        # since it quotes source URIs and the data card.
        card = model_card(
            cfg, inputs, lineage, gguf, report.read_text() if report.exists() else None
        )
        (tmp / "README.md").write_text(redact_text(card))
        (tmp / "LICENSE").write_text((LICENSES / f"{cfg.license}.txt").read_text())
        (tmp / "DATA_LICENSES.md").write_text(data_notices(inputs.card))
        sums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        manifest = {
            "name": cfg.name,
            "version": cfg.version,
            "license": cfg.license,
            "lineage": lineage,
            "sources": [
                {"name": s.name, "uri": s.uri, "license": s.license} for s in inputs.card.sources
            ],
            "gate": inputs.gate.model_dump(),
            "gguf": gguf,
            # Held-out bits per byte: the figure the gate checks, and what a new version must
            # improve on to become the champion (lower is better).
            "val_bpb": inputs.results.val_bpb,
            "evaluation": inputs.results.scores(),
            # Every stage's params (the services in ``infra`` are where it ran, not what it made)
            "params": redact(
                {k: v for k, v in to_flat_dict(p).items() if not k.startswith("infra.")}
            ),
            "files": sums,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        sums["manifest.json"] = sha256_file(tmp / "manifest.json")
        (tmp / "SHA256SUMS").write_text("".join(f"{h}  {f}\n" for f, h in sorted(sums.items())))
    return final


def build_tarball(bundle: Path) -> Path:
    """A reproducible .tar.gz: same files, same bytes, whatever the clock or the user."""
    out = bundle.parent / f"{bundle.name}.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(bundle.rglob("*")):
            rel = f"{bundle.name}/{path.relative_to(bundle).as_posix()}"
            info = tarfile.TarInfo(rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode, info.size = 0o644, path.stat().st_size
                with open(path, "rb") as f:
                    tar.addfile(info, f)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(buf.getvalue())
    tmp.replace(out)
    return out


def upload(bundle: Path, tarball: Path, s3_uri: str, s3: S3Settings | None = None) -> list[str]:
    """Upload the tarball and the bundle's files (boto3 managed transfers: multipart for large
    files, retried, aborted on failure so no partial object is left under a final key)."""
    base = s3_uri.rstrip("/")
    uris = [f"{base}/{tarball.name}"]
    upload_file(tarball, uris[0], s3)
    for f in sorted(bundle.iterdir()):
        uri = f"{base}/{bundle.name}/{f.name}"
        upload_file(f, uri, s3)
        uris.append(uri)
    return uris
