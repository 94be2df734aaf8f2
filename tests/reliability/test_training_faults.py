"""Training against preemption, kills and tampering: a stop is never a success, killed runs
resume bit-exactly, no worker outlives its launcher, and a planted checkpoint never runs."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

import pytest

from model import checkpoint
from tests.conftest import REPO, build_tokens
from tests.train.test_stage import params_file, run_train, sha

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tokens(tmp_path_factory.mktemp("fault-data"))


def torchrun(params: Path, nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        + ["-m", "model.train", "--params", str(params)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )


def lines(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def wait_for_steps(log: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until this run has logged ``n`` more steps (a resumed run appends to the log)."""
    n += lines(log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lines(log) >= n:
            return
        assert proc.poll() is None, "the run ended before the fault could be injected"
        time.sleep(0.02)
    raise AssertionError("no progress")


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = (
        Path(f"/proc/{pid}/stat").read_text().split()[2]
        if Path(f"/proc/{pid}/stat").exists()
        else "X"
    )
    return state != "Z"


def test_kills_on_two_processes_resume_bit_exact(data, tmp_path, figure):
    """SIGKILL at a seeded random step, SIGKILL inside a checkpoint write, SIGTERM: each resumed
    run carries on, and the final weights equal an uninterrupted run's to the bit."""
    steps = 12
    ref = tmp_path / "ref"
    run_train(params_file(ref, data, max_steps=steps, ckpt_every=2), nproc=2)
    victim = tmp_path / "victim"
    params = params_file(victim, data, max_steps=steps, ckpt_every=2)
    rng = random.Random(1234)
    survived = 0

    # 1. SIGKILL to the launcher's whole group at a random step.
    proc = torchrun(params)
    wait_for_steps(victim / "log.jsonl", rng.randint(3, 5), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    assert not (victim / "hf").exists()
    survived += 1

    # 2. Rank 0 dies in the middle of a checkpoint write (tensors written, manifest not).
    kill_at = rng.choice([6, 8])
    crash = params_file(
        victim, data, max_steps=steps, ckpt_every=2, debug_kill_in_checkpoint=kill_at
    )
    proc = torchrun(crash)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "resumed from" in out
    assert all(int(p.name[5:]) < kill_at for p in checkpoint.complete_checkpoints(victim / "ckpt"))
    survived += 1
    params = params_file(victim, data, max_steps=steps, ckpt_every=2)  # the same file, no fault

    # 3. SIGTERM (preemption): a checkpoint, then exit 75, and torchrun reports failure.
    proc = torchrun(params)
    wait_for_steps(victim / "log.jsonl", 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "stopped: SIGTERM at step" in out, out[-2000:]
    assert not (victim / "hf").exists() and not (victim / "train.json").exists()
    assert not (victim / "train_summary.json").exists()
    survived += 1

    final = run_train(params, nproc=2)
    assert "resumed from" in final.stdout
    same = sha(victim / "hf" / "model.safetensors") == sha(ref / "hf" / "model.safetensors")
    figure("kills survived (2 processes)", f"{survived}/3 {'bit-exact' if same else 'DIFFERENT'}")
    assert same


def test_worker_dies_with_its_launcher(data, tmp_path, figure):
    d = tmp_path / "orphan"
    proc = torchrun(params_file(d, data, max_steps=400, ckpt_every=1000), nproc=1)
    wait_for_steps(d / "log.jsonl", 2, proc)
    workers = children(proc.pid)
    assert workers
    proc.send_signal(signal.SIGKILL)  # the launcher alone, not its group
    proc.wait(30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(w) for w in workers):
        time.sleep(0.1)
    left = [w for w in workers if alive(w)]
    figure("workers left after SIGKILL to torchrun", len(left))
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert left == []


def _planted_pickle(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # creating a file stands for running any code

    return pickle.dumps(Payload())


def test_tampered_checkpoint_is_refused_before_unpickling(data, tmp_path, figure):
    def interrupted(d: Path) -> tuple[Path, Path]:
        """A run killed while writing its step-4 checkpoint: step 2 is complete and resumable."""
        out = run_train(params_file(d, data, max_steps=4, debug_kill_in_checkpoint=4), check=False)
        assert out.returncode == -9
        return checkpoint.latest(d / "ckpt"), params_file(d, data, max_steps=4)

    marker = tmp_path / "payload-ran"
    ck, params = interrupted(tmp_path / "metadata")
    (ck / ".metadata").write_bytes(_planted_pickle(marker))
    out = run_train(params, check=False)
    assert out.returncode == 3 and ".metadata changed since it was written" in out.stderr
    assert "Traceback" not in out.stderr and not marker.exists()

    # Someone who can also rewrite the manifest is trusted (README), but a per-rank file that is
    # not what save() writes is still refused with a clear message, not a traceback.
    ck, params = interrupted(tmp_path / "extra")
    (ck / "extra-rank0.pt").write_bytes(_planted_pickle(marker))
    checkpoint.write_manifest(ck)
    out = run_train(params, check=False)
    assert out.returncode == 3 and "weights_only" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()
    figure("planted checkpoints executed", 0)


def test_preempted_flow_fails_and_a_rerun_resumes(data, tmp_path, prefect_server, figure):
    """SIGTERM to ``python -m flows.train``: exit 75, the Prefect run ends Failed, no export or
    metrics; the same command again resumes from the checkpoint and completes."""
    from tests.flows.test_flows import api

    d = tmp_path / "flow"
    params = params_file(d, data, max_steps=40, ckpt_every=100)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{d}/m.db"}
    cmd = [sys.executable, "-m", "flows", "train", "--params", str(params)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_steps(d / "log.jsonl", 3, proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "stopped:" in err and "Rerun the stage to resume" in err
    assert not (d / "hf").exists() and not (d / "train.json").exists()
    assert not (d / "train_summary.json").exists()
    runs = api(
        prefect_server, "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 5}
    )
    state = next(r["state"]["type"] for r in runs if r["name"] and r["state"])
    assert state == "FAILED", state
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout + again.stderr
    assert (d / "hf" / "model.safetensors").exists()
    figure("preempted train flow: exit status, Prefect state, rerun", f"75, {state}, resumed")


def flow_run(api_url: str, run_id: str) -> dict:
    with urlopen(f"{api_url}/flow_runs/{run_id}", timeout=30) as r:
        return json.loads(r.read())


def test_a_killed_flow_is_marked_crashed_by_the_servers_automation(
    data, tmp_path, prefect_server, figure
):
    """SIGKILL gives a stage no chance to end its Prefect run. With ``tasks.common.crash_detection``'s
    automation on the server (30 s heartbeats, Prefect's minimum), the run turns Crashed, with a
    message that says what happened and what to do, once three heartbeats are missed."""
    from prefect.automations import Automation

    from tasks.common.crash_detection import NAME, ensure_crash_detection

    assert ensure_crash_detection(60).startswith("crash detection created")
    assert ensure_crash_detection(30).startswith("crash detection updated")
    assert ensure_crash_detection(30).startswith("crash detection already in place")
    d = tmp_path / "flow"
    params = params_file(d, data, max_steps=100_000, ckpt_every=100)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{d}/m.db",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
    }
    log = tmp_path / "out.log"
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flows", "train", "--params", str(params)],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_steps(d / "log.jsonl", 3, proc, timeout=300)
        run_id = log.read_text().split("/runs/flow-run/")[1].split()[0]
        assert flow_run(prefect_server, run_id)["state_type"] == "RUNNING"
        proc.kill()  # the flow process only, as the OOM killer would
        proc.wait(30)
        killed = time.monotonic()
        state = "RUNNING"
        while state == "RUNNING" and time.monotonic() - killed < 150:
            time.sleep(2)
            run = flow_run(prefect_server, run_id)
            state = run["state_type"]
        took = time.monotonic() - killed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the torchrun launcher and its workers
        Automation.read(name=NAME).delete()  # other tests' flows beat every 180 s
    assert state == "CRASHED", state
    assert "No heartbeat for 90 s" in run["state"]["message"] and "Rerun" in run["state"]["message"]
    figure("killed flow run marked Crashed after s (3 missed 30 s heartbeats)", f"{took:.0f}")
    assert took < 130


def test_bad_shape_fails_before_anything_starts(tmp_path, figure):
    t = time.monotonic()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    env.pop("PREFECT_API_URL", None)
    out = subprocess.run(
        [sys.executable, "-m", "flows", "train", "train.n_head=7"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - t
    assert out.returncode == 2 and "train.n_head" in out.stderr, out.stderr[-1500:]
    assert not (tmp_path / "m.db").exists() and "Beginning flow run" not in out.stdout + out.stderr
    figure("train.n_head=7 refused after s, before any flow or run", f"{took:.1f}")
    assert took < 15


def test_mfu_never_above_one(figure):
    """The CPU roof is the theoretical peak, which a timed matmul on this machine never passes,
    even where a virtual machine reports its base clock and hides its turbo (as here). The timing
    here is separate from the one the roof takes."""
    from model.metrics import cpu_peak, timed_matmul_flops

    best = timed_matmul_flops(repeats=5)
    peak, how = cpu_peak()
    figure("best matmul vs CPU roof", f"{100 * best / peak:.0f}% ({how})")
    assert best < peak
