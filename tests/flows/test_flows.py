"""The stage entry points for real: `python -m flows.<stage>` against a real Prefect server,
MLflow runs in a SQLite store, and DVC in a temporary copy of the repo."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.pipeline import STAGES
from tests.conftest import REPO, make_corpus, run_flow, stop_process

pytestmark = pytest.mark.integration


def api(url, path, body=None):
    req = urllib.request.Request(
        f"{url}{path}",
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_bad_params_fail_before_any_work(tmp_path):
    t0 = time.monotonic()
    out = run_flow(
        "flows",
        "ingest",
        "data.min_chars=lots",
        timeout=120,
        env={
            **os.environ,
            "PREFECT_API_URL": "http://127.0.0.1:9/api",
        },  # unreachable: must not be needed
    )
    assert out.returncode == 2
    assert "data.min_chars" in out.stderr and "'lots'" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - t0 < 60


def write_params(dst: Path, corpus: str) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["sources"] = [{"uri": corpus, "name": "fixture", "license": "CC0-1.0"}]
    params["data"]["min_chars"] = 50
    params["tokenize"]["vocab_size"] = 512
    # A few held-out documents, so the eval gate can measure.
    params["tokenize"]["val_fraction"] = 0.3
    # one tiny run shape for training and fine-tuning (a 32-token context)
    run = dict(
        seq_len=32,
        micro_batch=4,
        global_batch_tokens=256,
        max_steps=4,
        log_every=1,
        eval_every=2,
        eval_batches=1,
        ckpt_every=2,
        warmup_steps=1,
    )
    params["train"].update(preset="debug", **run)
    # Conversations short enough for the 32-token context (the corpus's functions are longer).
    chat = dst / "chat.jsonl"
    with open(chat, "w") as f:
        for a, b in [(a, b) for a in range(7) for b in range(7)]:
            turns = [("user", f"What is {a} plus {b}?"), ("assistant", f"{a + b}")]
            f.write(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
    params["finetune"].update(
        sources=[{"uri": str(chat), "name": "sums", "license": "CC0-1.0"}], run=run
    )
    params["evaluate"].update(
        benchmarks=["winogrande", "humaneval"],
        limits={"winogrande": 4, "humaneval": 2},
        max_gen_toks=8,
        perplexity_max_tokens=1024,
    )
    # HumanEval's solutions are longer than this 32-token context: their bits per byte cannot be
    # measured (reported as not run), so the gate does not ask for them here.
    params["evaluate"]["gate"] = {"min_humaneval_bpb_gain": None}
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_ingest_flow_on_prefect_server_with_artifact_and_mlflow(
    prefect_server, mlflow_sqlite, tmp_path
):
    make_corpus(tmp_path / "corpus")
    write_params(tmp_path, str(tmp_path / "corpus"))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["data"]["out_dir"] = str(tmp_path / "clean")
    params["data"]["metrics_file"] = str(tmp_path / "metrics.json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = run_flow("flows", "ingest", "--params", str(tmp_path / "params.yaml"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Starting temporary server" not in out.stderr + out.stdout  # it used the real server
    assert json.loads((tmp_path / "metrics.json").read_text())["docs_out"] == 9

    runs = api(prefect_server, "/flow_runs/filter", {"flow_runs": {"name": {"like_": ""}}})
    ingest_runs = [r for r in runs if r["state_type"] == "COMPLETED"]
    assert ingest_runs, runs
    # each shard cleaned, each LSH band bucketed and each output part written as a task run;
    # the staging folder gone afterwards
    steps = task_runs_of_last(prefect_server, "ingest")
    assert steps == dict.fromkeys(("process-shard", "band-buckets", "write-parts"), "COMPLETED"), (
        steps
    )
    assert sorted(p.name for p in tmp_path.iterdir() if "staging" in p.name) == []
    line = next(x for x in (out.stdout + out.stderr).splitlines() if "ingest: read+clean: " in x)
    assert re.search(r"MB \(100%\), [\d.,]+ MB/s, ETA 0 s, \d+ docs$", line), line
    arts = api(
        prefect_server, "/artifacts/filter", {"artifacts": {"key": {"any_": ["ingest-data-card"]}}}
    )
    assert (
        arts
        and "Ingest data card" in arts[0]["data"]
        and "| fixture | CC0-1.0 |" in arts[0]["data"]
    )

    import mlflow

    mlflow.set_tracking_uri(mlflow_sqlite)
    df = mlflow.search_runs(
        experiment_names=["llmforge"], filter_string="tags.`llmforge.stage` = 'ingest'"
    )
    assert len(df) == 1
    assert df["metrics.docs_out"].iloc[0] == 9 and df["params.data.min_chars"].iloc[0] == "50"
    client = mlflow.tracking.MlflowClient()
    assert "card.json" in [a.path for a in client.list_artifacts(df["run_id"].iloc[0])]


def test_ingest_and_tokenize_on_a_local_dask_cluster(prefect_server, mlflow_sqlite, tmp_path):
    """infra.task_runner=dask: the same Prefect tasks, run by Dask workers (scheduler and workers
    on 127.0.0.1), write the same bytes as the stage logic run in this process."""
    from tasks.ingest.stage import run_ingest
    from tasks.params import load_params
    from tasks.tokenize.stage import run_tokenize

    make_corpus(tmp_path / "corpus")
    write_params(tmp_path, str(tmp_path / "corpus"))

    def dirs(name: str) -> list[str]:
        d = tmp_path / name
        return [
            f"data.out_dir={d}/clean",
            f"data.metrics_file={d}/ingest.json",
            f"tokenize.in_dir={d}/clean",
            f"tokenize.tokenizer_dir={d}/tokenizer",
            f"tokenize.tokens_dir={d}/tokens",
            f"tokenize.metrics_file={d}/tokenize.json",
            "data.shard_docs=3",  # several shards and parts, so several tasks per stage
            "data.part_max_bytes=3000",
        ]

    params = str(tmp_path / "params.yaml")
    logs = ""
    for stage in ("ingest", "tokenize"):
        out = run_flow(
            f"flows.{stage}", "--params", params, "infra.task_runner=dask", *dirs("dask")
        )
        assert out.returncode == 0, out.stderr[-3000:]
        logs += out.stdout + out.stderr
    assert "local Dask, 2 workers" in logs
    assert (
        logs.count("Creating a new Dask cluster with `distributed.deploy.local.LocalCluster`") == 2
    )
    assert "distributed.core" not in logs  # Dask's connection chatter stays out of the run log

    ref = load_params(params, dirs("ref"))
    run_ingest(ref.data, log=lambda m: None)
    run_tokenize(ref.tokenize, log=lambda m: None)
    files = sorted(
        p.relative_to(tmp_path / "ref")
        for p in (tmp_path / "ref").rglob("*")
        if p.is_file() and p.parent.name != "ref"
    )
    assert len([f for f in files if f.suffix == ".parquet"]) > 1
    assert len([f for f in files if f.suffix == ".bin"]) > 2
    for f in files:
        assert (tmp_path / "dask" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f

    tasks = api(prefect_server, "/task_runs/filter")
    done = [
        t for t in tasks if t["name"].startswith("encode-part") and t["state_type"] == "COMPLETED"
    ]
    assert len(done) == len([f for f in files if f.suffix == ".parquet"])


def repo_copy(dst: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        if f.startswith(("data/", "metrics/", "models/", "plots/")) or f == "dvc.lock":
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)
    make_corpus(dst / "corpus")
    write_params(dst, "corpus")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dst, check=True, env=env)
    return dst


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


def lock_outs(cwd: Path) -> dict:
    lock = yaml.safe_load((cwd / "dvc.lock").read_text())
    return {k: [(o["path"], o["md5"]) for o in v["outs"]] for k, v in lock["stages"].items()}


def test_dvc_repro_pipeline_flow_and_deployments_agree(prefect_server, mlflow_sqlite, tmp_path):
    """The three ways a user runs the DAG, on copies of the repo with a tiny config: `dvc repro`
    (then a no-op repro), the main command `python -m flows.pipeline` (same outputs), and the
    Prefect deployments through a real process worker; MLflow shows what ran, with Prefect's links."""
    a = repo_copy(tmp_path / "a")
    first = dvc(a, "repro")
    assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-3000:]
    assert json.loads((a / "metrics/ingest.json").read_text())["docs_out"] == 9
    assert json.loads((a / "metrics/tokenize.json").read_text())["train_tokens"] > 0
    assert (a / "data/tokens/index.json").exists() and (
        a / "data/tokenizer/tokenizer.json"
    ).exists()
    assert json.loads((a / "models/train_summary.json").read_text())["steps"] == 4
    assert (a / "models/hf/model.safetensors").exists() and (a / "plots/train_loss.csv").exists()
    results = json.loads((a / "reports/eval/results.json").read_text())
    # a 32-token context holds no 5-shot WinoGrande prompt: reported, never quietly zero-shot
    assert results["benchmarks"]["winogrande"]["status"].startswith(
        "not run: a 1-shot prompt does not fit the 32-token context"
    )
    assert results["benchmarks"]["humaneval"]["n"] == 2
    # the chat model (finetune) answers HumanEval through its template, beside the base model
    assert results["chat"]["benchmarks"]["humaneval"]["n"] == 2
    assert "## Base and chat model" in (a / "reports/eval/comparison.md").read_text()
    assert (
        json.loads((a / "models/chat/config.json").read_text())["eos_token_id"]
        == json.loads((a / "models/chat/generation_config.json").read_text())["eos_token_id"][0]
    )
    sft = json.loads((a / "data/sft/index.json").read_text())
    assert sft["summary"]["train_conversations"] + sft["summary"]["val_conversations"] == 49
    assert (a / "release/llmforge-demo-0.1.0/SHA256SUMS").exists()
    assert (a / "release/llmforge-demo-0.1.0.tar.gz").exists()
    # the chat bundle: its template and the chat section of its card, its own GGUF files
    chat = a / "release/llmforge-demo-chat-0.1.0"
    assert "chat_template" in json.loads((chat / "tokenizer_config.json").read_text())
    assert "## Chat" in (chat / "README.md").read_text()
    assert (chat / "llmforge-demo-chat-0.1.0-f16.gguf").exists() and (chat / "SHA256SUMS").exists()
    second = dvc(a, "repro")
    assert second.returncode == 0 and "Running stage" not in second.stdout, second.stdout
    assert "up to date" in dvc(a, "status").stdout
    # What a user looks at through DVC, with no network: the plots page carries its own Vega
    # (make setup writes the template; here for the copy), loss and validation loss in one
    # plot; the metrics are numbers DVC reads without a warning.
    subprocess.run([sys.executable, "-m", "tasks.common.plots", str(a)], check=True, cwd=REPO)
    shown = dvc(a, "plots", "show", "-o", str(tmp_path / "plots"))
    assert shown.returncode == 0, shown.stderr
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "vegaEmbed(" in page and '"val_loss"' in page and '"loss"' in page
    assert 'src="http' not in page and "cdn.jsdelivr" not in page
    metrics = dvc(a, "metrics", "show")
    assert metrics.returncode == 0 and "failed" not in metrics.stdout + metrics.stderr
    assert "reports/eval/metrics.json" in metrics.stdout and "gate_passed" in metrics.stdout
    # headline numbers only (every figure stays in the stages' own records and MLflow), so the
    # table, one column per metric name, fits a full-width terminal; it was 1,699 characters
    assert max(map(len, metrics.stdout.splitlines())) <= 220, metrics.stdout
    for f in ("metrics/ingest.json", "metrics/tokenize.json", "metrics/train.json"):
        assert all(type(v) in (int, float) for v in json.loads((a / f).read_text()).values()), f

    b = repo_copy(tmp_path / "b")
    out = run_flow("flows", "pipeline", cwd=b, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    # The run log carries the stages' messages, not library internals leaked through print()
    # (dill's captured dis() output, inherited log_prints) or transformers' generation warnings.
    assert "LOAD_GLOBAL" not in out.stdout + out.stderr
    assert "max_new_tokens" not in out.stdout + out.stderr
    assert "it/s]" not in out.stdout + out.stderr  # no unlabelled progress bars (lm-eval's tqdm)
    # The run ends with a summary: every stage, ran or skipped, its time and key figure.
    summary = (out.stdout + out.stderr).split("pipeline done", 1)[1]
    for stage in STAGES:
        assert re.search(rf"^{stage}\s+(ran|skipped)\s", summary, re.M), summary[:2000]
    assert "MLflow: http" in summary and "gate passed" in summary
    # Same outputs from both entry points. Training timings (tokens/s, MFU, wall time) and DCP's
    # checkpoint metadata differ from run to run by nature; the weights and losses must not.
    # The release names the MLflow run it came from, which differs between the two executions.
    timing = {
        "metrics/train.json",
        "models/train_summary.json",
        "models/train_log.jsonl",
        "models/ckpt",
        "metrics/finetune.json",
        "models/chat_summary.json",
        "models/chat_log.jsonl",
        "models/chat_ckpt",
        "release",
    }
    outs_a, outs_b = lock_outs(a), lock_outs(b)
    for stage in outs_a:
        assert [o for o in outs_a[stage] if o[0] not in timing] == [
            o for o in outs_b[stage] if o[0] not in timing
        ], stage
    assert ("models/hf" in dict(outs_a["train"])) and (
        "plots/train_loss.csv" in dict(outs_a["train"])
    )
    assert "up to date" in dvc(b, "status").stdout

    # The same repo through Prefect deployments, as a user of the UI would drive it: the
    # pipeline, now up to date, skips every stage through a real worker; one stage runs for real.
    worker_log = tmp_path / "worker.log"
    with deployments_and_worker(b, prefect_server, worker_log):
        for name in ("pipeline/pipeline", "ingest/ingest"):
            run_deployment(b, prefect_server, name)
    assert "up to date in dvc.lock, skipped" in worker_log.read_text()
    assert json.loads((b / "metrics/ingest.json").read_text())["docs_out"] == 9

    import mlflow

    mlflow.set_tracking_uri(mlflow_sqlite)
    exp = mlflow.get_experiment_by_name("llmforge")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    # base and chat: two registered models, each with its champion
    client = mlflow.tracking.MlflowClient()
    for name in ("llmforge", "llmforge-chat"):
        assert client.get_model_version_by_alias(name, "champion").tags["gate"] == "passed"
    # The pipeline's parent runs say which stages ran: all of them from the command line, none
    # through the worker (all up to date); its children are the six stages.
    parents = [r for r in runs if r.data.tags.get("llmforge.kind") == "pipeline"]
    stage_sets = [{parent.data.tags[f"llmforge.stage.{s}"] for s in STAGES} for parent in parents]
    assert len(stage_sets) == 2 and {"ran"} in stage_sets and {"skipped"} in stage_sets
    ids = {p.info.run_id for p in parents}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in ids]
    assert sorted(r.data.tags["llmforge.stage"] for r in children) == sorted(STAGES)
    # Every stage run (dvc repro's, the pipeline's, the worker's ingest) carries its stage, its
    # status and the Prefect flow run it came from.
    stages = [r for r in runs if r.data.tags.get("llmforge.kind") == "stage"]
    assert len(stages) == 2 * len(STAGES) + 1
    for r in stages:
        assert r.data.tags["llmforge.status"] == "ran"
        assert r.data.tags["prefect.flow_run_url"].startswith(prefect_server.removesuffix("/api"))


def test_train_flow_end_to_end_within_a_minute(prefect_server, mlflow_sqlite, tmp_path):
    from tests.conftest import build_tokens
    from tests.train.test_stage import params_file

    data = build_tokens(tmp_path)
    params = params_file(
        tmp_path,
        data,
        seq_len=64,
        global_batch_tokens=512,
        max_steps=10,
        log_every=2,
        eval_every=5,
        ckpt_every=5,
    )
    t0 = time.monotonic()
    out = run_flow("flows", "train", "--params", str(params))
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "train_summary.json").read_text())
    assert metrics["steps"] == 10 and metrics["wall_s"] < 60, metrics
    assert time.monotonic() - t0 < 120
    assert "step 10/10" in out.stdout + out.stderr  # torchrun's output streamed into the flow's log

    import mlflow

    mlflow.set_tracking_uri(mlflow_sqlite)
    run = mlflow.search_runs(
        experiment_names=["llmforge"], filter_string="tags.`llmforge.stage` = 'train'"
    ).iloc[0]
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(run["run_id"], "loss/train")
    # every log step, and the validation step (5) between them, with its validation loss
    assert [m.step for m in history] == [2, 4, 5, 6, 8, 10]
    assert [m.step for m in client.get_metric_history(run["run_id"], "loss/val")] == [5, 10]
    # curves in sections that sort before the single-value summary numbers; no bookkeeping fields
    keys = set(client.get_run(run["run_id"]).data.metrics)
    assert {"loss/val", "optim/lr", "speed/mfu", "summary/val_loss"} <= keys, keys
    assert not {k for k in keys if "/" not in k or k.startswith(("final", "data_position"))}, keys
    assert {"train_loss.png", "train.json"} <= {
        a.path for a in client.list_artifacts(run["run_id"])
    }
    arts = api(
        prefect_server, "/artifacts/filter", {"artifacts": {"key": {"any_": ["train-summary"]}}}
    )
    # formatted for people: units and rounding, not raw floats
    assert arts and "| tokens per s |" in arts[0]["data"] and " tokens/s |" in arts[0]["data"]
    assert "GFLOP/s |" in arts[0]["data"] and "| mfu |" in arts[0]["data"]
    # the flow's timeline shows its steps as task runs
    assert task_runs_of_last(prefect_server, "train") == {
        "torchrun": "COMPLETED",
        "log-to-mlflow": "COMPLETED",
    }


def task_runs_of_last(server: str, flow_name: str) -> dict[str, str]:
    """The task runs of the latest run of a flow: name prefix -> state type."""
    run = api(
        server,
        "/flow_runs/filter",
        {"flows": {"name": {"any_": [flow_name]}}, "sort": "START_TIME_DESC", "limit": 1},
    )[0]
    tasks = api(server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    return {t["name"].rsplit("-", 1)[0]: t["state_type"] for t in tasks}


def wait_for_run(server: str, deployment: str, timeout: float = 600) -> str | None:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        runs = api(server, "/flow_runs/filter", {"deployments": {"name": {"any_": [deployment]}}})
        state = runs[0]["state_type"] if runs else None
        if state in ("COMPLETED", "FAILED", "CRASHED"):
            break
        time.sleep(2)
    return state


@contextlib.contextmanager
def deployments_and_worker(home: Path, server: str, log: Path):
    """prefect.yaml -> `prefect deploy --all` -> a process worker (its output in ``log``), as a
    user would set them up; every flow must have a deployment."""
    env = {**os.environ, "LLMFORGE_HOME": str(home), "PREFECT_API_URL": server}
    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run(
        [*prefect, "work-pool", "create", "llmforge", "--type", "process"],
        cwd=home,
        env=env,
        capture_output=True,
        timeout=120,
    )
    dep = subprocess.run(
        [*prefect, "--no-prompt", "deploy", "--all"],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dep.returncode == 0, dep.stdout[-2000:] + dep.stderr[-2000:]
    deployed = {d["name"] for d in api(server, "/deployments/filter", {})}
    flows_in_repo = {p.stem for p in (REPO / "flows").glob("*.py")} - {
        "__init__",
        "__main__",
        "cli",
    }
    assert deployed == flows_in_repo == set(STAGES) | {"pipeline"}, deployed
    with open(log, "w") as out:
        worker = subprocess.Popen(
            [*prefect, "worker", "start", "--pool", "llmforge"],
            cwd=home.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield
        finally:
            # Stopping the worker is Prefect's business, not what this test checks: a loaded CI
            # machine once took over 30 s for its graceful shutdown, so it gets 60 s, then SIGKILL.
            stop_process(worker, 60)


def run_deployment(home: Path, server: str, name: str) -> None:
    """`prefect deployment run NAME`; the flow run must complete on the worker."""
    env = {**os.environ, "LLMFORGE_HOME": str(home), "PREFECT_API_URL": server}
    run = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", name],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert wait_for_run(server, name.split("/")[1]) == "COMPLETED", name
