"""The release stage: bundle, reproducible tarball, verify, S3 upload, MLflow registry, secrets."""

import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import boto3
import pytest
import torch
import yaml

from tasks.common.config import ConfigError
from tasks.params import params_from_dict
from tasks.release.bundle import MODEL_FILES, build_bundle, build_tarball
from tasks.release.errors import ReleaseError
from tasks.release.registry import register
from tasks.release.verify import safe_extract, verify
from tests.conftest import REPO, free_port, run_flow, running_server

pytestmark = pytest.mark.integration
CANARY_ENV = "canary-env-7f3a9c"
CANARY_PARAM = "canary-param-51be02"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny trained model and its real evaluation, through the stages' own code."""
    from tasks.common.records import DataCard
    from tasks.evaluate.config import EvaluateConfig
    from tasks.evaluate.report import write_report
    from tasks.evaluate.stage import run_evaluate
    from tests.conftest import build_tokens, eval_fields
    from tests.train.test_stage import params_file, run_train

    root = tmp_path_factory.mktemp("release")
    data = build_tokens(root / "d")
    run_train(params_file(root / "t", data, max_steps=4, seq_len=256, global_batch_tokens=1024))
    ecfg = EvaluateConfig(
        **eval_fields(root / "t" / "hf", data, root / "eval") | {"perplexity_max_tokens": 1024},
        benchmarks=["humaneval"],
        max_gen_toks=8,
    )
    write_report(run_evaluate(ecfg, log=lambda m: None), ecfg.out_dir, DataCard.find(ecfg.data_dir))
    return root, data


def params(root: Path, data: Path, out: str, **release):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = dict(
        model_dir=str(root / "t" / "hf"),
        eval_dir=str(root / "eval"),
        data_dir=str(data / "clean"),
        tokens_dir=str(data / "tokens"),
        train_summary=str(root / "t" / "train_summary.json"),
        chat_model_dir=None,  # the chat bundle: tests/test_cli_and_flows.py (the whole pipeline)
        out_dir=out,
    )
    raw["release"].update({**defaults, **release})
    return params_from_dict(raw)


def test_bundle_loads_offline_with_same_logits_and_no_pickles(inputs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, data = inputs
    bundle = build_bundle(params(root, data, str(tmp_path)), "run-1")
    assert not [p for p in bundle.iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    card = (bundle / "README.md").read_text()
    assert (
        card.startswith("---\nlicense: apache-2.0") and "model-index" in card and "| 67.0 |" in card
    )
    assert "## Lineage" in card and "run-1" in card and "Git commit" in card
    # the data section is tables and sentences, not JSON
    assert "| filter | documents removed |" in card and "Personal data replaced" in card
    assert '{"' not in card.split("## Data", 1)[1].split("## Evaluation", 1)[0]
    assert "Apache License" in (bundle / "LICENSE").read_text()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    a = AutoModelForCausalLM.from_pretrained(bundle, local_files_only=True, trust_remote_code=False)
    b = AutoModelForCausalLM.from_pretrained(
        root / "t" / "hf", local_files_only=True, trust_remote_code=False
    )
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert AutoTokenizer.from_pretrained(bundle, local_files_only=True).eos_token == "<|eos|>"


def test_verify_detects_changed_added_and_removed_files(inputs, tmp_path):
    root, data = inputs
    bundle = build_bundle(params(root, data, str(tmp_path / "r")), "run-1")
    assert verify(str(bundle))["loaded"] is True
    for name in ("model.safetensors", "README.md", "tokenizer.json"):
        work = tmp_path / f"w-{name}"
        shutil.copytree(bundle, work)
        blob = bytearray((work / name).read_bytes())
        blob[len(blob) // 2] ^= 0x01  # one byte
        (work / name).write_bytes(bytes(blob))
        with pytest.raises(ReleaseError, match=f"checksum mismatch for {name}"):
            verify(str(work), load=False)
    added = tmp_path / "added"
    shutil.copytree(bundle, added)
    (added / "extra.py").write_text("print('hi')")
    with pytest.raises(ReleaseError, match="extra.py is not listed"):
        verify(str(added), load=False)
    removed = tmp_path / "removed"
    shutil.copytree(bundle, removed)
    (removed / "LICENSE").unlink()
    with pytest.raises(ReleaseError, match="LICENSE is listed in SHA256SUMS but missing"):
        verify(str(removed), load=False)


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_crafted_tarballs_are_rejected_without_writing_outside(tmp_path, kind):
    ok = tarfile.TarInfo("rel/ok.txt")
    ok.size = 2
    bad = tarfile.TarInfo(
        {"dotdot": "rel/../../escape.txt", "absolute": str(tmp_path / "abs.txt")}.get(
            kind, "rel/bad"
        )
    )
    if kind in ("dotdot", "absolute"):
        bad.size = 4
        data = b"evil"
    elif kind == "symlink":
        bad.type, bad.linkname, data = tarfile.SYMTYPE, "/etc/passwd", None
    elif kind == "hardlink":
        bad.type, bad.linkname, data = tarfile.LNKTYPE, "/etc/passwd", None
    else:
        bad.type, bad.devmajor, bad.devminor, data = tarfile.CHRTYPE, 1, 3, None
    tarball = _tar(tmp_path / "evil.tar.gz", [(ok, b"ok"), (bad, data)])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ReleaseError, match="unsafe archive"):
        safe_extract(tarball, dest)
    assert list(dest.iterdir()) == []  # nothing extracted at all
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "abs.txt").exists()
    with pytest.raises(ReleaseError, match="unsafe archive"):
        verify(str(tarball))


def test_two_builds_give_byte_identical_tarballs(inputs, tmp_path):
    root, data = inputs
    first = build_tarball(build_bundle(params(root, data, str(tmp_path)), "run-1")).read_bytes()
    shutil.rmtree(tmp_path / "llmforge-demo-0.1.0")
    os.utime(root / "t" / "hf" / "config.json")  # a new mtime on an input changes nothing
    again = build_tarball(build_bundle(params(root, data, str(tmp_path)), "run-1"))
    assert again.read_bytes() == first
    assert verify(str(again))["files"] >= 10


def test_upload_to_s3_download_and_verify(inputs, tmp_path, s3_server):
    from tasks.release.bundle import upload

    root, data = inputs
    boto3.client("s3").create_bucket(Bucket="releases")
    bundle = build_bundle(params(root, data, str(tmp_path)), "run-1")
    tarball = build_tarball(bundle)
    uris = upload(bundle, tarball, "s3://releases/llmforge")
    assert uris[0] == f"s3://releases/llmforge/{tarball.name}"
    assert verify(uris[0])["loaded"] is True
    out = run_flow("flows", "release", "verify", uris[0], timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("OK:"), out.stderr[-2000:]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    with running_server(cmd, f"http://127.0.0.1:{port}/health", root / "server.log", timeout=120):
        yield f"http://127.0.0.1:{port}"


def test_registry_has_version_and_aliases_on_a_server(inputs, tmp_path, mlflow_server, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("registry")  # not whatever experiment an earlier test made active
    root, data = inputs
    p = params(root, data, str(tmp_path))
    bundle = build_bundle(p, "run-1")
    manifest = json.loads((bundle / "manifest.json").read_text())
    with mlflow.start_run() as run:
        info = register(p.release, str(bundle), run.info.run_id, manifest)
    client = MlflowClient(mlflow_server)
    champion = client.get_model_version_by_alias("llmforge", "champion")
    assert champion.version == info["version"]
    # the version says what it is and how it scored, where the registry shows it
    assert "Evaluation gate: passed" in champion.description
    assert "| humaneval_bpb | " in champion.description and " bits/byte |" in champion.description
    assert champion.tags["gate"] == "passed"
    assert float(champion.tags["eval.humaneval_bpb"]) == pytest.approx(
        manifest["evaluation"]["humaneval_bpb"], rel=1e-3
    )
    source = client.get_model_version_by_alias("llmforge", "candidate").source
    assert source.endswith(f"/bundles/{bundle.name}")
    assert "SHA256SUMS" in {
        a.path.split("/")[-1]
        for a in client.list_artifacts(info_run_id(client, info), f"bundles/{bundle.name}")
    }
    with mlflow.start_run() as run:
        failed = {**manifest, "gate": {"passed": False, "reasons": ["mmlu below 30"]}}
        second = register(p.release, str(bundle), run.info.run_id, failed)
    assert client.get_model_version("llmforge", second["version"]).tags["gate"] == "failed"
    assert client.get_model_version_by_alias("llmforge", "candidate").version == second["version"]
    assert client.get_model_version_by_alias("llmforge", "champion").version == info["version"]
    assert champion.tags["git_commit"] == manifest["lineage"]["git_commit"]
    assert float(champion.tags["eval.val_bpb"]) == pytest.approx(manifest["val_bpb"], rel=1e-5)
    # The champion alias moves only to a version that passes the gate and beats the champion's
    # held-out bits per byte.
    for delta, moves in ((+0.01, False), (0.0, False), (-0.01, True)):
        with mlflow.start_run() as run:
            other = {**manifest, "val_bpb": manifest["val_bpb"] + delta}
            new = register(p.release, str(bundle), run.info.run_id, other)
        now = client.get_model_version_by_alias("llmforge", "champion").version
        assert (now == new["version"]) == moves, (delta, new["champion"])
        assert ("champion" in new["aliases"]) == moves
        assert new["champion"].startswith("champion:" if moves else "not champion:")


def info_run_id(client, info):
    return client.get_model_version("llmforge", info["version"]).run_id


def test_no_secret_reaches_the_bundle(inputs, tmp_path, monkeypatch):
    root, data = inputs
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_ENV)
    monkeypatch.setenv("HF_TOKEN", CANARY_ENV)
    # A secret cannot be a param at all: refused before any work, the value never echoed.
    with pytest.raises(ConfigError, match="release.hub_token") as err:
        params(root, data, str(tmp_path), hub_token=CANARY_PARAM)
    assert CANARY_PARAM not in str(err.value)
    bundle = build_bundle(params(root, data, str(tmp_path)), "run-1")
    tarball = build_tarball(bundle)
    for f in [*bundle.iterdir(), tarball]:
        blob = (
            f.read_bytes() if f.suffix != ".gz" else __import__("gzip").decompress(f.read_bytes())
        )
        assert CANARY_ENV.encode() not in blob and CANARY_PARAM.encode() not in blob, f
    # Harmless keys that merely contain "token" stay readable.
    shown = json.loads((bundle / "manifest.json").read_text())["params"]
    assert shown["train.global_batch_tokens"] == 8192 and shown["tokenize.eos_token"] == "<|eos|>"


def test_failed_gate_is_refused_unless_overridden(inputs, tmp_path):
    root, data = inputs
    failed = tmp_path / "eval"
    shutil.copytree(root / "eval", failed)
    res = json.loads((failed / "results.json").read_text())
    res["gate"] = {"passed": False, "reasons": ["held-out loss 9.1 > max_val_loss 8.0"]}
    (failed / "results.json").write_text(json.dumps(res))
    with pytest.raises(ReleaseError, match="gate failed.*allow_failed_gate"):
        build_bundle(params(root, data, str(tmp_path / "o"), eval_dir=str(failed)), "run-1")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    bundle = build_bundle(
        params(root, data, str(tmp_path / "o"), eval_dir=str(failed), allow_failed_gate=True),
        "run-1",
    )
    assert "Released despite a failed evaluation gate" in (bundle / "README.md").read_text()


def test_unwritable_destination_gives_a_clear_error(inputs, tmp_path):
    root, data = inputs
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ReleaseError, match="cannot write the release to .*release.out_dir"):
        build_bundle(params(root, data, str(blocker / "sub")), "run-1")


def test_missing_bucket_upload_fails_clearly_and_leaves_nothing(inputs, tmp_path, s3_server):
    from tasks.common.storage import StorageError
    from tasks.release.bundle import upload

    root, data = inputs
    bundle = build_bundle(params(root, data, str(tmp_path)), "run-1")
    tarball = build_tarball(bundle)
    with pytest.raises(StorageError, match="does not exist"):
        upload(bundle, tarball, "s3://no-such-release-bucket/x")


def test_lineage_lists_the_inputs_not_the_previous_release(tmp_path):
    from tasks.release.bundle import dvc_lineage

    lock = {
        "schema": "2.0",
        "stages": {
            "train": {"outs": [{"path": "models/hf", "md5": "aaa.dir"}]},
            "release": {"outs": [{"path": "release", "md5": "old-release.dir"}]},
        },
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert dvc_lineage(tmp_path / "dvc.lock") == {"train": {"models/hf": "aaa.dir"}}


def test_gguf_in_the_bundle_reads_back_as_the_safetensors(inputs, tmp_path):
    """The release's GGUF files, read with llama.cpp's own gguf package: tensors equal to the
    safetensors (the q/k rows un-permuted), llama.cpp's metadata, a vocabulary that gives back our
    tokens; a changed byte or an unknown pre-tokenizer is caught."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from tasks.release.bundle import write_ggufs
    from tasks.release.gguf import GGUFError, check_gguf, gguf_tensors, sample_texts, unpermute

    root, data = inputs
    p = params(root, data, str(tmp_path / "out"))
    bundle = build_bundle(p, "run-1")
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = sorted(manifest["gguf"]["files"])
    assert names == ["llmforge-demo-0.1.0-f16.gguf", "llmforge-demo-0.1.0-q8_0.gguf"]
    sums = (bundle / "SHA256SUMS").read_text()
    assert all(n in sums for n in names)
    assert "llama-cli -m llmforge-demo-0.1.0-q8_0.gguf" in (bundle / "README.md").read_text()
    assert verify(str(bundle), load=False)["files"] >= 2 + len(MODEL_FILES)

    config = json.loads((bundle / "config.json").read_text())
    weights = load_file(str(bundle / "model.safetensors"))
    reader = gguf.GGUFReader(str(bundle / names[0]))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.pre") == "llama-bpe"
    assert field("llama.context_length") == config["max_position_embeddings"]
    assert field("llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert field("tokenizer.ggml.bos_token_id") == config["bos_token_id"]
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    want = weights["model.layers.0.self_attn.q_proj.weight"]
    got = unpermute(
        np.asarray(q.data, dtype=np.float32).reshape(want.shape), config["num_attention_heads"]
    )
    assert np.array_equal(got, want.astype(np.float16).astype(np.float32))
    # Our ids, looked up in the GGUF's vocabulary, are our tokens.
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tokens = field("tokenizer.ggml.tokens")
    for text in sample_texts():
        enc = ours.encode(text)
        assert [tokens[i] for i in enc.ids] == enc.tokens

    # One changed byte in a tensor is caught.
    bad = tmp_path / "bad.gguf"
    blob = bytearray((bundle / names[0]).read_bytes())
    blob[q.data_offset + 3] ^= 0x40
    bad.write_bytes(bytes(blob))
    with pytest.raises(GGUFError, match="blk.0.attn_q.weight differs"):
        check_gguf(bad, bundle, sample_texts()[:1], gguf_tensors(bundle))
    # A tokenizer whose split pattern llama.cpp does not know: no GGUF, and the card says why.
    odd = tmp_path / "odd"
    shutil.copytree(root / "t" / "hf", odd)
    tok = json.loads((odd / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (odd / "tokenizer.json").write_text(json.dumps(tok))
    skipped = write_ggufs(p.release, odd)
    assert "no llama.cpp pre-tokenizer" in skipped["skipped"]
    assert not list(odd.glob("*.gguf"))
