"""The release stage: an open-source bundle anyone can verify, load and trace to its data.

``release/<name>-<version>/`` holds the model (safetensors only), tokenizer, generation config, a
model card with full lineage, the license and the data sources' notices, ``manifest.json`` and
``SHA256SUMS``; ``release/<name>-<version>.tar.gz`` is built reproducibly (sorted entries, fixed
mtimes and owners, a gzip header without a timestamp). ``verify`` checks a bundle, a tarball or an
``s3://`` tarball byte for byte, refuses unsafe archives before extracting, and loads the model.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import sysconfig
import tarfile
import tempfile
import zlib
from pathlib import Path

import yaml

from tasks.config import Params, to_flat_dict
from tasks.eval_report import PROGRESS
from tasks.redaction import redact_text
from tasks.storage import S3Settings, atomic_dir, download_file, is_s3, sha256_file, upload_file
from tasks.tokenize import mixture_table
from tasks.tracking import git_commit, redact

LICENSES = Path(__file__).with_name("licenses")
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


class ReleaseError(RuntimeError):
    pass


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


def load_inputs(p: Params) -> dict:
    cfg = p.release
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
    results_path = Path(cfg.eval_dir) / "results.json"
    if not results_path.exists():
        raise ReleaseError(f"no evaluation results at {results_path}: run the evaluate stage first")
    results = json.loads(results_path.read_text())
    gate = results.get("gate", {"passed": False, "reasons": ["no gate recorded"]})
    if not gate["passed"] and not cfg.allow_failed_gate:
        raise ReleaseError(
            "the evaluation gate failed ("
            + "; ".join(gate["reasons"])
            + "); fix the model, or set release.allow_failed_gate=true to release anyway (the model card will say so)"
        )
    card = (
        json.loads(Path(cfg.data_card).read_text())
        if Path(cfg.data_card).exists()
        else {"sources": []}
    )
    train = (
        json.loads(Path(cfg.train_summary).read_text()) if Path(cfg.train_summary).exists() else {}
    )
    index_path = Path(p.tokenize.tokens_dir) / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    return {
        "results": results,
        "gate": gate,
        "card": card,
        "train": train,
        "mixture": index.get("mixture", {}),
        "config": json.loads((model / "config.json").read_text()),
        "chat_template": json.loads((model / "tokenizer_config.json").read_text()).get(
            "chat_template"
        ),
    }


def model_card(p: Params, inputs: dict, lineage: dict, gguf: dict | None = None) -> str:
    cfg, r, card, train, mc = (
        p.release,
        inputs["results"],
        inputs["card"],
        inputs["train"],
        inputs["config"],
    )
    ran = [row for row in r.get("comparison", []) if row["status"] == "ran"]
    front = {
        "license": cfg.license.lower(),
        "language": ["en", "code"],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["llmforge", "llama", "causal-lm"],
        "datasets": [s["name"] for s in card.get("sources", [])],
        "model-index": [
            {
                "name": f"{cfg.name}-{cfg.version}",
                "results": [
                    {
                        "task": {"type": "text-generation"},
                        "dataset": {"name": row["benchmark"], "type": row["key"]},
                        "metrics": [{"type": row["metric"], "value": round(row["ours"], 2)}],
                    }
                    for row in ran
                ],
            }
        ],
    }
    n_params = train.get("params", "?")
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {cfg.name} {cfg.version}",
        "",
    ]
    if not inputs["gate"]["passed"]:
        lines += [
            "> **Released despite a failed evaluation gate** (release.allow_failed_gate): "
            + "; ".join(inputs["gate"]["reasons"]),
            "",
        ]
    lines += [
        "## Model details",
        "",
        f"- Architecture: Llama-style decoder (`LlamaForCausalLM`), {mc['num_hidden_layers']} layers, hidden size {mc['hidden_size']}, "
        f"{mc['num_attention_heads']} attention heads ({mc['num_key_value_heads']} key/value heads), SwiGLU, RoPE, RMSNorm",
        f"- Parameters: {n_params:,}" if isinstance(n_params, int) else f"- Parameters: {n_params}",
        f"- Tokenizer: byte-level BPE, {mc['vocab_size']:,} tokens; context length {mc['max_position_embeddings']}",
        "",
        "## Training",
        "",
        f"- Tokens seen: {train.get('tokens_seen', '?'):,}"
        if isinstance(train.get("tokens_seen"), int)
        else "- Tokens seen: ?",
        f"- Steps: {train.get('steps', '?')}; final train loss {train.get('final_loss', '?')}, validation loss {train.get('val_loss', '?')}",
        f"- Hardware: {train.get('processes', '?')} process(es) on {train.get('device', '?')}; wall time {train.get('wall_s', '?')} s; "
        f"MFU {100 * train['mfu']:.1f}% of {train.get('peak_source', '?')}"
        if "mfu" in train
        else "- Hardware: ?",
        "",
        "## Data",
        "",
        "| source | license | documents in | documents out | quarantined | filtered | duplicates | contaminated |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in card.get("sources", []):
        lines.append(
            f"| {s['name']} | {s['license']} | {s['docs_in']:,} | {s['docs_out']:,} | {s['quarantined']:,} | "
            f"{sum(s['filtered'].values()):,} | {s['exact_duplicates'] + s['near_duplicates']:,} | {s['contaminated']:,} |"
        )
    dec = card.get("decontamination", {})
    removed = {k: v for k, v in sorted(card.get("filters", {}).items()) if v}
    pii = {k: v for k, v in sorted(card.get("pii_replaced", {}).items()) if v}
    lines += [
        "",
        "| filter | documents removed |",
        "|---|---:|",
        *(f"| {k.replace('_', ' ')} | {v:,} |" for k, v in removed.items()),
        *([] if removed else ["| (none) | 0 |"]),
        "",
        *mixture_table(inputs["mixture"]),
        "Personal data replaced by placeholders: "
        + (", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in pii.items()) or "none found")
        + ". "
        f"Decontamination against {', '.join(dec.get('benchmarks', [])) or 'nothing'} ({dec.get('ngram', '?')}-grams): "
        f"{len(dec.get('hits', []))} document(s) removed.",
        "",
        "## Evaluation",
        "",
    ]
    eval_md = Path(p.release.eval_dir) / "comparison.md"
    if eval_md.exists():
        body = eval_md.read_text().split("\n", 2)[2]  # drop the report's own title
        lines += [body.replace("## ", "### "), "![comparison](comparison.png)", ""]
    lines += [
        "## Intended use",
        "",
        "Research and experimentation with a small model trained by the llmforge pipeline; not for production use.",
        "",
        "## Limitations",
        "",
        "A small model trained briefly: it does not approach GPT-4 on any benchmark above; it can produce incorrect, "
        "insecure or licensed code; benchmarks marked *not run* were not measured.",
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tok = AutoTokenizer.from_pretrained("{cfg.name}-{cfg.version}")',
        f'model = AutoModelForCausalLM.from_pretrained("{cfg.name}-{cfg.version}")  # no trust_remote_code needed',
        "```",
        "",
        *gguf_section(gguf or {}),
        *chat_card_section(cfg, inputs),
        "## Lineage",
        "",
        f"- Git commit: `{lineage['git_commit']}`",
        f"- MLflow run: `{lineage['mlflow_run_id']}`",
    ]
    for stage, outs in lineage["dvc"].items():
        lines.append(f"- DVC `{stage}`: " + ", ".join(f"`{k}` {v}" for k, v in outs.items()))
    lines += [
        "- Params: see `manifest.json`",
        "",
        "## Citation",
        "",
        "```bibtex",
        f"@misc{{{cfg.name.replace('-', '_')}_{cfg.version.replace('.', '_')},",
        f"  title = {{{cfg.name} {cfg.version}}},",
        "  note = {Trained and released with llmforge},",
        "}",
        "```",
        "",
    ]
    return "\n".join(lines)


def chat_card_section(cfg, inputs: dict) -> list[str]:
    """How to chat with a chat model: its template in transformers and vLLM, and how it ends."""
    if not inputs.get("chat_template"):
        return []
    chat = inputs["results"].get("chat", {}).get("benchmarks", {}).get("humaneval", {})
    score = (
        f" HumanEval through the template: pass@1 {chat['score']:.1f}% (n={chat['n']})."
        if chat.get("status") == "ran"
        else ""
    )
    folder = f"{cfg.name}-{cfg.version}"
    return [
        "## Chat",
        "",
        "Fine-tuned from the base model on conversations (the finetune stage), with the chat "
        "template in `tokenizer_config.json`: `<|user|>`, `<|assistant|>` and `<|system|>` "
        "open a turn and `<|end|>` closes it; generation stops there (`eos_token_id` in "
        "`config.json` and `generation_config.json`)." + score,
        "",
        "```python",
        'msgs = [{"role": "user", "content": "Complete this Python function:\\n\\ndef add(a, b):"}]',
        "inputs = tok.apply_chat_template(",
        '    msgs, add_generation_prompt=True, return_dict=True, return_tensors="pt"',
        ")",
        "out = model.generate(**inputs, max_new_tokens=128)  # stops at <|end|>",
        "```",
        "",
        f"vLLM serves it with no extra flags: `vllm serve {folder}` answers "
        "`/v1/chat/completions` with this template; so does `python -m model.serve --model "
        f"{folder}` from llmforge. The template parses special tokens in message text (as every "
        "Hugging Face chat template does): a server should refuse messages that contain "
        "`<|end|>` or a role token, as model.serve does.",
        "",
    ]


def gguf_section(gguf: dict) -> list[str]:
    """How to run the bundle's GGUF files in llama.cpp (or why there are none)."""
    files = sorted(gguf.get("files", {}))
    if not files:
        return (
            ["## llama.cpp", "", f"No GGUF in this release: {gguf['skipped']}.", ""]
            if gguf.get("skipped")
            else []
        )
    smallest = next((f for f in files if f.endswith("-q8_0.gguf")), files[0])
    return [
        "## llama.cpp",
        "",
        f"GGUF files: {', '.join(f'`{f}`' for f in files)} (written with the `gguf` package, "
        "read back and compared with the safetensors and the tokenizer before release).",
        "",
        "```bash",
        f'llama-cli -m {smallest} -p "def fibonacci(n):" -n 64 --temp 0',
        "```",
        "",
    ]


def data_notices(card: dict) -> str:
    lines = ["# Data sources and their licenses", ""]
    for s in card.get("sources", []):
        lines.append(f"- {s['name']} ({s['uri']}): {s['license']}")
    text = "\n".join(lines) + "\n"
    if any(s["uri"] == "stdlib" for s in card.get("sources", [])):
        psf = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
        if psf.exists():
            text += "\n## Python standard library (PSF-2.0)\n\n" + psf.read_text(errors="replace")
    return text


def write_ggufs(cfg, bundle: Path) -> dict:
    """The GGUF files of ``release.gguf`` beside the safetensors in ``bundle``, each read back and
    compared (tensors, tokenizer) before it counts: ``{"files": {name: check figures}}``, or
    ``{"skipped": why}`` when llama.cpp has no pre-tokenizer for this tokenizer."""
    from model.export_gguf import (
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
    inputs = load_inputs(p)
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
            f"cannot write the release to {root} ({exc.strerror}); set release.out_dir to a writable folder"
        ) from exc
    with atomic_dir(final) as tmp:
        for f in MODEL_FILES:
            shutil.copy2(Path(cfg.model_dir) / f, tmp / f)
        gguf = write_ggufs(cfg, tmp)
        if (Path(cfg.eval_dir) / "comparison.png").exists():
            shutil.copy2(Path(cfg.eval_dir) / "comparison.png", tmp / "comparison.png")
        # Params cannot hold secrets (load_params refuses them); the card is redacted all the same,
        # since it quotes source URIs and the data card.
        (tmp / "README.md").write_text(redact_text(model_card(p, inputs, lineage, gguf)))
        (tmp / "LICENSE").write_text((LICENSES / f"{cfg.license}.txt").read_text())
        (tmp / "DATA_LICENSES.md").write_text(data_notices(inputs["card"]))
        files = sorted(f.name for f in tmp.iterdir())
        sums = {f: sha256_file(tmp / f) for f in files}
        params = redact({**to_flat_dict(p, "")})
        manifest = {
            "name": cfg.name,
            "version": cfg.version,
            "license": cfg.license,
            "lineage": lineage,
            "sources": [
                {"name": s["name"], "uri": s["uri"], "license": s["license"]}
                for s in inputs["card"].get("sources", [])
            ],
            "gate": inputs["gate"],
            "gguf": gguf,
            # Held-out bits per byte: the figure the gate checks, and what a new version must
            # improve on to become the champion (lower is better).
            "val_bpb": inputs["results"]["benchmarks"]
            .get("val_perplexity", {})
            .get("bits_per_byte"),
            "evaluation": {
                **{
                    k: v.get("score", v.get("status"))
                    for k, v in inputs["results"]["benchmarks"].items()
                },
                **{
                    f"chat_{k}": v.get("score", v.get("status"))
                    for k, v in inputs["results"].get("chat", {}).get("benchmarks", {}).items()
                },
            },
            "params": params,
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


class _Capped(io.RawIOBase):
    """A read-only stream that fails once more than ``cap`` bytes came out of ``raw``."""

    def __init__(self, raw, cap: int, what: str):
        self.raw, self.cap, self.what, self.seen = raw, cap, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.raw.read(min(len(buf), 1 << 20))
        self.seen += len(data)
        if self.seen > self.cap:
            raise ReleaseError(
                f"unsafe archive: {self.what} unpacks to more than {self.cap:,} bytes "
                "(a decompression bomb?); refused before extracting"
            )
        buf[: len(data)] = data
        return len(data)


def unpacked_cap(tarball: Path) -> int:
    """What a release may unpack to: weights hardly compress, so 4x the archive (+64 MiB for
    the small files) is generous for a real release and stops a bomb early."""
    return 4 * tarball.stat().st_size + (64 << 20)


def safe_extract(tarball: Path, dest: Path, cap: int | None = None) -> Path:
    """Extract only plain files and folders under ``dest``; refuse the whole archive otherwise.

    A first pass streams the archive through a byte cap, checking every header (paths, links,
    special and sparse files, declared sizes) before anything is written; only then is it
    extracted, so a bomb or a huge sparse member costs neither disk nor memory."""
    cap = cap or unpacked_cap(tarball)
    names, total = [], 0
    try:
        with (
            gzip.open(tarball, "rb") as gz,
            tarfile.open(fileobj=_Capped(gz, cap, tarball.name), mode="r|") as tar,
        ):
            for m in tar:
                name = m.name
                if name.startswith("/") or Path(name).is_absolute():
                    raise ReleaseError(f"unsafe archive: absolute path {name!r}")
                if ".." in Path(name).parts:
                    raise ReleaseError(f"unsafe archive: path escapes the target {name!r}")
                if m.issym() or m.islnk():
                    raise ReleaseError(f"unsafe archive: link {name!r} -> {m.linkname!r}")
                if m.issparse() or not (m.isfile() or m.isdir()):
                    raise ReleaseError(
                        f"unsafe archive: {name!r} is a sparse, device, fifo or other special file"
                    )
                total += m.size
                if total > cap:
                    raise ReleaseError(
                        f"unsafe archive: members declare more than {cap:,} bytes "
                        f"(at {name!r}); refused before extracting"
                    )
                names.append(name)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ReleaseError(f"{tarball}: not a readable .tar.gz ({exc})") from exc
    tops = {Path(n).parts[0] for n in names}
    if len(tops) != 1:
        raise ReleaseError(f"a release archive holds one top-level folder, not {sorted(tops)}")
    with tarfile.open(tarball, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest / tops.pop()


def verify_dir(bundle: Path, load: bool = True) -> dict:
    sums_file = bundle / "SHA256SUMS"
    if not sums_file.exists():
        raise ReleaseError(f"{bundle}: no SHA256SUMS file")
    listed = {}
    for line in sums_file.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {
        "SHA256SUMS"
    }
    for name in sorted(set(listed) - present):
        raise ReleaseError(f"{bundle}: {name} is listed in SHA256SUMS but missing")
    for name in sorted(present - set(listed)):
        raise ReleaseError(
            f"{bundle}: {name} is not listed in SHA256SUMS (added after the release)"
        )
    for name, digest in sorted(listed.items()):
        if sha256_file(bundle / name) != digest:
            raise ReleaseError(f"{bundle}: checksum mismatch for {name}")
    out = {"bundle": str(bundle), "files": len(listed)}
    if load:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(bundle, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            bundle, local_files_only=True, trust_remote_code=False, use_safetensors=True
        )
        with torch.no_grad():
            logits = model(**tok("def f(x):", return_tensors="pt")).logits
        out["loaded"] = bool(torch.isfinite(logits).all())
    return out


def verify(target: str, load: bool = True, s3: S3Settings | None = None) -> dict:
    if is_s3(target):
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(target).name
            download_file(target, local, s3)
            return verify(str(local), load)
    path = Path(target)
    if path.is_dir():
        return verify_dir(path, load)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        with tempfile.TemporaryDirectory() as tmp:
            return verify_dir(safe_extract(path, Path(tmp)), load)
    raise ReleaseError(f"{target}: not a release folder, .tar.gz or s3:// URI")


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
