"""Unit tests of the trainer's parts (schedule, optimizer groups, data loader, checkpoint policy)
and golden per-step losses of the debug model, in-process on synthetic tokens."""

import json
import math
import signal

import pytest
import torch

from model import checkpoint
from model.config import ModelConfig
from model.data import DataMismatchError, TokenLoader
from model.model import Llama
from model.trainer import NonFiniteLossError, lr_at, param_groups, train
from tasks.train.config import TrainConfig
from tests.conftest import synthetic_tokens

# Per-step training losses of the debug model on synthetic_tokens() (one process, one thread,
# fp32, seed 1234). A change to the model, its init, the data order, the optimizer or the schedule
# moves them: if that is intended, regenerate with the printout of test_golden_losses.
GOLDEN = [4.195144, 4.058288, 3.866314, 3.685584, 3.536139, 3.488402]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return synthetic_tokens(tmp_path_factory.mktemp("tokens"))


@pytest.fixture
def sigterm():
    """The trainer installs a SIGTERM handler: give pytest its own back afterwards."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def config(tmp_path, tokens, **kw) -> TrainConfig:
    fields = dict(
        tokens_dir=str(tokens),
        ckpt_dir=str(tmp_path / "ckpt"),
        log_file=str(tmp_path / "log.jsonl"),
        preset="debug",
        seq_len=32,
        micro_batch=4,
        global_batch_tokens=256,  # two micro-steps a step
        max_steps=6,
        warmup_steps=2,
        log_every=1,
        eval_every=3,
        eval_batches=2,
        ckpt_every=1,
        keep_last=2,
        threads=1,
        dtype="float32",
    )
    return TrainConfig(**{**fields, **kw})


def logged(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]


def test_golden_losses_and_checkpoint_pruning(tmp_path, tokens, sigterm):
    stale = tmp_path / "ckpt" / ".tmp-step-00000099"  # a killed run's partial checkpoint
    stale.mkdir(parents=True)
    result = train(config(tmp_path, tokens), log=lambda m: None)
    losses = [round(r["loss"], 6) for r in logged(tmp_path)]
    print("losses:", losses)
    assert result.steps == 6 and not result.stopped
    assert losses == pytest.approx(GOLDEN, abs=2e-4)
    assert [r["step"] for r in logged(tmp_path) if "val_loss" in r] == [3, 6]
    # Saved every step, the last two kept, the stale partial one removed.
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "ckpt")] == [
        "step-00000005",
        "step-00000006",
    ]
    assert not stale.exists()


def test_non_finite_loss_is_caught_at_the_next_host_sync_with_its_step(tmp_path, tokens, sigterm):
    cfg = config(tmp_path, tokens, debug_nan_at_step=4, log_every=5, eval_every=100, ckpt_every=3)
    with pytest.raises(NonFiniteLossError, match="not finite at step 4; .* past step 3"):
        train(cfg, log=lambda m: None)
    # Detected at step 5 (a log step), before anything of steps 4-5 was saved.
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "ckpt")] == ["step-00000003"]


def test_schedule():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    assert lr_at(1, cfg) == pytest.approx(1e-4) and lr_at(10, cfg) == pytest.approx(1e-3)
    cosine = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:], strict=False))
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    wsd = cfg.model_copy(update={"schedule": "wsd", "decay_frac": 0.2})
    assert lr_at(80, wsd) == pytest.approx(1e-3)  # stable until the last 20%
    assert lr_at(90, wsd) == pytest.approx(1e-4 + 9e-4 * 0.5)
    assert lr_at(100, wsd) == pytest.approx(1e-4)


def test_weight_decay_on_matrices_only():
    torch.manual_seed(0)
    model = Llama(ModelConfig.preset("debug", vocab_size=64, max_seq_len=32))
    groups = param_groups(model, 0.1, "matrices")
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (not name.endswith("norm.weight")), name
    # One AdamW step on zero gradients: decay alone moves the weights, so matrices shrink by
    # (1 - lr * wd) and the norm gains stay exactly 1.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim = torch.optim.AdamW(groups, lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optim.step()
    for name, p in model.named_parameters():
        factor = 1.0 if name.endswith("norm.weight") else 1 - 0.5 * 0.1
        assert torch.allclose(p, before[name] * factor), name
    everything = param_groups(model, 0.1, "all")
    assert not everything[1]["params"] and len(everything[0]["params"]) == len(
        list(model.parameters())
    )


def test_loader_resumes_exactly_and_ranks_split_one_stream(tokens):
    a = TokenLoader(str(tokens), "train", batch=3, seq_len=16, seed=7)
    batches = [a.next() for _ in range(5)]
    b = TokenLoader(str(tokens), "train", batch=3, seq_len=16, seed=7)
    b.load_state_dict({**a.state_dict(), "position": 2})
    for x, y in batches[2:]:
        bx, by = b.next()
        assert torch.equal(x, bx) and torch.equal(y, by)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    # Two ranks' micro-batches at one position are one process's two consecutive micro-batches:
    # the same data for any number of processes at the same global batch.
    one = TokenLoader(str(tokens), "train", batch=3, seq_len=16, seed=7)
    r0 = TokenLoader(str(tokens), "train", batch=3, seq_len=16, rank=0, world=2, seed=7)
    r1 = TokenLoader(str(tokens), "train", batch=3, seq_len=16, rank=1, world=2, seed=7)
    for _ in range(3):
        assert torch.equal(one.next()[0], r0.next()[0]) and torch.equal(one.next()[0], r1.next()[0])
    other = TokenLoader(str(tokens), "train", batch=3, seq_len=16, seed=8)
    with pytest.raises(DataMismatchError, match="different data"):
        other.load_state_dict(a.state_dict())


def test_gpu_check_script_runs_its_path_on_a_cpu(tmp_path, tokens):
    """bench/gpu_check.sh is meant for a GPU machine; on a CPU, with the debug preset, it runs the
    same path (torchrun, the real trainer with DDP and FSDP2, the report) so it cannot rot."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    results = tmp_path / "results.jsonl"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "DEVICE": "cpu",
        "PRESETS": "debug",
        "STEPS": "4",
        "SEQ": "32",
        "MICRO": "4",
        "COMPILE": "false",
        "TOKENS": str(tokens),
        "RESULTS": str(results),
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        ["bash", "bench/gpu_check.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["parallel"] for r in rows] == ["ddp", "fsdp"]
    assert all(r["steps"] == 4 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows)
    assert (
        "debug: DDP vs FSDP2 losses at 4 log steps" in out.stdout and "(equal within" in out.stdout
    )
