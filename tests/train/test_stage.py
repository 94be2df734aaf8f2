"""The train stage for real on CPU: torchrun with gloo (DDP and FSDP2), kill -9 and resume,
half-written checkpoints, NaN faults, and the Hugging Face export."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from model import checkpoint
from model.config import ModelConfig
from model.model import Llama, generate
from tests.conftest import REPO, build_tokens, free_port

pytestmark = pytest.mark.integration

TINY = {
    "preset": "debug",
    "seq_len": 32,
    "micro_batch": 4,
    "global_batch_tokens": 256,
    "max_steps": 8,
    "log_every": 1,
    "eval_every": 4,
    "eval_batches": 2,
    "ckpt_every": 2,
    "keep_last": 3,
    "threads": 1,
    "warmup_steps": 2,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tokens(tmp_path_factory.mktemp("train-data"))


def params_file(dst: Path, data: Path, **train) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(
        tokens_dir=str(data / "tokens"),
        tokenizer_dir=str(data / "tokenizer"),
        ckpt_dir=str(dst / "ckpt"),
        export_dir=str(dst / "hf"),
        log_file=str(dst / "log.jsonl"),
        metrics_file=str(dst / "train.json"),
        summary_file=str(dst / "train_summary.json"),
        plot_file=str(dst / "loss.csv"),
        **{**TINY, **train},
    )
    path = dst / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_train(params: Path, nproc: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "model.train",
            "--params",
            str(params),
        ]
    else:
        cmd = [sys.executable, "-m", "model.train", "--params", str(params)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def losses(dst: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (dst / "log.jsonl").read_text().splitlines()]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Two micro-steps a step on 2 processes (2 x 4 sequences x 32 tokens = 256 of 512 tokens), four
# on one: the same windows each step either way (model/data.py), so the runs must agree.
CLUSTER = dict(global_batch_tokens=512, max_steps=10, ckpt_every=2)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> list[float]:
    d = tmp_path_factory.mktemp("one-process")
    run_train(params_file(d, data, **CLUSTER))
    return losses(d)


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory) -> Path:
    """The reference cluster run: one launcher, 2 processes, DDP."""
    d = tmp_path_factory.mktemp("two-processes")
    run_train(params_file(d, data, **CLUSTER), nproc=2)
    return d


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_accumulate_like_one_and_are_bitwise_reproducible(
    data, tmp_path, mode, one_process, two_processes
):
    """Gradient accumulation without communication on non-final micro-steps (DDP no_sync, FSDP2
    set_requires_gradient_sync) gives the losses of one process doing all four micro-steps."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_train(params_file(a, data, parallel=mode, **CLUSTER), nproc=2)
    if mode == "ddp":
        b = two_processes
    else:
        run_train(params_file(b, data, parallel=mode, **CLUSTER), nproc=2)
    la, lb = losses(a), losses(b)
    assert len(la) == 10 and la == lb  # equal to the bit, every step
    assert la[-1] < la[0] - 0.3  # it learns
    assert sha(a / "hf" / "model.safetensors") == sha(b / "hf" / "model.safetensors")
    assert la == pytest.approx(one_process, rel=1e-4)


def test_two_launchers_as_two_nodes_equal_one_launcher(data, tmp_path, two_processes):
    """What train.nnodes and train.rdzv_endpoint generate, on one machine: two torchrun launchers
    meeting at a c10d rendezvous on 127.0.0.1, one process each."""
    from tasks.params import load_params
    from tasks.train.launch import torchrun_command

    d = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    params = params_file(d, data, nnodes=2, rdzv_endpoint=endpoint, **CLUSTER)
    cmd = torchrun_command(load_params(str(params)).train, str(params), [])
    assert "--nnodes=2" in cmd and f"--rdzv-endpoint={endpoint}" in cmd
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert sha(d / "hf" / "model.safetensors") == sha(two_processes / "hf" / "model.safetensors")


def test_elastic_restart_resumes_and_a_spent_budget_fails_fast(data, tmp_path, two_processes):
    """train.max_restarts=1: a worker killed mid-run makes torchrun restart the group, which
    resumes from the last complete checkpoint and ends with the uninterrupted run's weights. A
    fault that comes back after the restart spends the budget: a clear failure, no hang."""
    from tasks.params import load_params
    from tasks.train.launch import TrainError, run_torchrun, torchrun_command
    from tests.reliability.test_training_faults import children, wait_for_steps

    d = tmp_path / "elastic"
    params = params_file(d, data, nproc_per_node=2, max_restarts=1, **CLUSTER)
    cfg = load_params(str(params)).train
    proc = subprocess.Popen(
        torchrun_command(cfg, str(params), []),
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_steps(d / "log.jsonl", 3, proc)
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out and "step-0000000" in out
    assert sha(d / "hf" / "model.safetensors") == sha(two_processes / "hf" / "model.safetensors")

    # Rank 0 dies writing step 4's checkpoint, again after the restart: the budget is spent.
    d = tmp_path / "spent"
    params = params_file(
        d, data, nproc_per_node=2, max_restarts=1, debug_kill_in_checkpoint=4, **CLUSTER
    )
    cmd = torchrun_command(load_params(str(params)).train, str(params), [])
    lines: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(TrainError) as err:
        run_torchrun(cmd, lines.append, cwd=str(REPO))
    took = time.monotonic() - t0
    message = str(err.value)
    assert (
        "SIGKILL" in message and "after 1 restart" in message and "train.max_restarts=1" in message
    ), message
    assert sum("resumed from" in line for line in lines) == 1
    assert took < 120


def test_kill_9_and_resume_gives_identical_weights(data, tmp_path):
    ref = tmp_path / "ref"
    run_train(params_file(ref, data, max_steps=12))
    victim = tmp_path / "victim"
    params = params_file(victim, data, max_steps=12)
    kill_after = random.Random(os.getpid()).randint(3, 9)
    proc = subprocess.Popen(
        [sys.executable, "-m", "model.train", "--params", str(params)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        log = victim / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (victim / "hf").exists()
    resumed = run_train(params)
    assert "resumed from" in resumed.stdout
    assert sha(victim / "hf" / "model.safetensors") == sha(ref / "hf" / "model.safetensors")
    final = lambda d: json.loads((d / "log.jsonl").read_text().splitlines()[-1])  # noqa: E731
    assert (
        final(victim)["data_position"] == final(ref)["data_position"] == 12 * 2
    )  # 2 micro-steps a step
    assert final(victim)["loss"] == final(ref)["loss"]


def test_half_written_checkpoint_is_ignored(data, tmp_path):
    d = tmp_path / "run"
    # Killed while writing its step-6 checkpoint: the tensors are there, the manifest is not.
    out = run_train(params_file(d, data, max_steps=8, debug_kill_in_checkpoint=6), check=False)
    assert out.returncode == -9
    good = checkpoint.latest(d / "ckpt")
    assert good is not None and good.name == "step-00000004"
    assert (d / "ckpt" / ".tmp-step-00000006" / ".metadata").exists()
    # A checkpoint folder whose DCP .metadata and manifest never appeared.
    broken = d / "ckpt" / "step-00000008"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"partial")
    (broken / "meta.json").write_text("{}")
    assert checkpoint.latest(d / "ckpt") == good
    out = run_train(params_file(d, data, max_steps=8))
    assert "resumed from" in out.stdout and "step-00000004" in out.stdout
    assert not (d / "ckpt" / ".tmp-step-00000006").exists()  # cleared by the next save


def test_nan_stops_with_clear_error_and_no_later_checkpoint(data, tmp_path):
    d = tmp_path / "nan"
    out = run_train(
        params_file(d, data, max_steps=8, ckpt_every=1, debug_nan_at_step=5), check=False
    )
    assert out.returncode != 0
    assert "loss is not finite at step 5" in out.stderr
    steps = [int(p.name.split("-")[1]) for p in checkpoint.complete_checkpoints(d / "ckpt")]
    assert steps and max(steps) == 4
    assert not (d / "hf").exists()


def test_checkpoint_of_another_run_is_not_resumed(data, tmp_path):
    d = tmp_path / "m"
    stop = dict(debug_kill_in_checkpoint=4)  # an interrupted run: complete checkpoint at step 2
    assert run_train(params_file(d, data, max_steps=6, **stop), check=False).returncode == -9
    out = run_train(params_file(d, data, max_steps=6, d_model=32, **stop), check=False)
    assert "not resuming: step-00000002 was written with a different model config" in out.stdout
    assert "resumed from" not in out.stdout
    out = run_train(params_file(d, data, max_steps=6, d_model=32, lr=1e-3, **stop), check=False)
    assert "different train params (lr)" in out.stdout
    # Operational settings (logging, checkpoint cadence) do not make it another run.
    out = run_train(params_file(d, data, max_steps=6, d_model=32, lr=1e-3, log_every=2))
    assert "resumed from" in out.stdout and "step-00000002" in out.stdout
    # A completed run is not resumed: rerunning the stage trains again.
    out = run_train(params_file(d, data, max_steps=6, d_model=32, lr=1e-3))
    assert "not resuming: step-00000006 ends a completed run" in out.stdout


def test_export_round_trip_logits_and_generate(data, tmp_path, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path / "exp"
    run_train(params_file(d, data, max_steps=6))
    hf = AutoModelForCausalLM.from_pretrained(
        d / "hf", local_files_only=True, trust_remote_code=False
    )
    tok = AutoTokenizer.from_pretrained(d / "hf", local_files_only=True)
    cfg = json.loads((d / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and not list((d / "hf").glob("*.bin"))
    mcfg = ModelConfig.preset("debug", vocab_size=cfg["vocab_size"], max_seq_len=32)
    ours = Llama(mcfg)
    from safetensors.torch import load_file

    sd = {k.removeprefix("model."): v for k, v in load_file(d / "hf" / "model.safetensors").items()}
    sd["lm_head.weight"] = sd["embed_tokens.weight"]
    ours.load_state_dict(sd)
    ours.eval()
    ids = tok("def add(a, b):\n    return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4
        mine = generate(ours, ids, 12)
        theirs = hf.generate(
            ids,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tok.pad_token_id,
        )
    assert torch.equal(mine, theirs)
    # Metadata a user's tools read: one context length, no token_type_ids, a generation config
    # that lets generate(max_new_tokens=...) run without a warning, files readable by others.
    tok_cfg = json.loads((d / "hf" / "tokenizer_config.json").read_text())
    assert (
        cfg["max_position_embeddings"] == tok_cfg["model_max_length"] == 32 == tok.model_max_length
    )
    enc = tok("def add(a, b):", return_tensors="pt")
    assert set(enc) == {"input_ids", "attention_mask"}
    assert "max_length" not in json.loads((d / "hf" / "generation_config.json").read_text())
    import logging

    import transformers

    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            out = hf.generate(**enc, max_new_tokens=4, do_sample=False)
    finally:
        transformers.logging.disable_propagation()
    assert out.shape[1] == enc["input_ids"].shape[1] + 4
    assert not [r for r in caplog.records if "max_length" in r.getMessage()], caplog.text
    umask = os.umask(0)
    os.umask(umask)
    for f in (d / "hf").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name
    # DVC's metrics file: the headline numbers only; every figure is in the summary
    assert set(json.loads((d / "train.json").read_text())) == {"val_loss", "tokens_per_s", "mfu"}
    metrics = json.loads((d / "train_summary.json").read_text())
    assert (
        metrics["steps"] == 6
        and metrics["export_max_logit_diff"] < 1e-4
        and 0 < metrics["mfu"] < 1.5
    )
