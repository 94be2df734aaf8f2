"""Ingest and tokenize at corpus scale: cost per MB and peak memory as the corpus grows.

Runs the real stages (``python -m flows.ingest``, ``python -m flows.tokenize``, each a Prefect flow
with its process pool) on three corpora: the embedded default (the stdlib, 1x) and the ``.py``
files of this environment's own ``site-packages`` cut to about 4x and about 13x the default (code
nobody here wrote). A sampler reads the whole process tree every 0.2 s. Printed per stage and
corpus: wall time, CPU-seconds (every process of the tree, startup included), MB per CPU-second,
cores kept busy, the tree's peak resident memory and the largest single process. The runs share
one MLflow store, created before them, as a project's does. The baseline of
the ratios is the 1x run of the same invocation; the 13x/4x line says whether the cost per MB
holds as the corpus grows.

    .venv/bin/python -m bench.data_scale [--scales 1,4,13] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent


def site_packages_corpus(dest: Path, mb: float) -> float:
    """Copy sorted ``site-packages/**/*.py`` into ``dest`` until ``mb`` MB; returns the MB."""
    root = Path(sysconfig.get_paths()["purelib"])
    total = 0
    for p in sorted(root.rglob("*.py")):
        if total >= mb * 1e6 or not p.is_file() or p.is_symlink():
            continue
        target = dest / p.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
        total += p.stat().st_size
    return total / 1e6


def _not_yet_exec(p: psutil.Process) -> bool:
    """A child between fork and exec (e.g. MLflow starting ``git``): it runs its parent's program
    in its parent's memory (vfork: the same pages), so its RSS is the parent's again, not memory
    of its own. Counted, one sample in that millisecond once read a 900 MB tree as 1,200 MB.
    Every worker of the stages execs a program of its own (spawn, torchrun), so none is skipped."""
    parent = p.parent()
    return parent is not None and p.cmdline() == parent.cmdline()


class TreeSampler:
    """Peak RSS of a process and all its descendants (sum, and the largest one)."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.tree_peak = self.proc_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                rss = []
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        if p is self.proc or not _not_yet_exec(p):
                            rss.append(p.memory_info().rss)
                self.tree_peak = max(self.tree_peak, sum(rss))
                self.proc_peak = max(self.proc_peak, max(rss, default=0))
            except psutil.Error:
                pass
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_stage(module: str, params: Path, env: dict, repo: Path) -> dict:
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--params", str(params)],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sampler = TreeSampler(proc.pid)
    out, _ = proc.communicate()
    sampler.stop()
    wall = time.perf_counter() - t0
    after = os.times()
    if proc.returncode != 0:
        raise SystemExit(f"{module} failed:\n{out[-3000:]}")
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return {
        "wall": wall,
        "cpu": cpu,
        "tree_mb": sampler.tree_peak / 1e6,
        "proc_mb": sampler.proc_peak / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", default="1,4,13")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the stages of this git revision (a worktree), at 1x and the largest scale",
    )
    args = ap.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp_s:
        tmp = Path(tmp_s)
        with prefect_server(tmp / "prefect") as api:
            env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_LOGGING_LEVEL": "WARNING"}
            rows = run_all(scales, args.workers, REPO, tmp / "new", env, "this tree")
            if args.baseline:
                wt = tmp / "baseline-src"
                git = ["git", "-C", str(REPO), "worktree"]
                subprocess.run([*git, "add", "--detach", str(wt), args.baseline], check=True)
                try:
                    base_scales = [scales[0], scales[-1]]
                    rows += run_all(base_scales, args.workers, wt, tmp / "old", env, args.baseline)
                finally:
                    subprocess.run([*git, "remove", "--force", str(wt)], check=False)
    report(rows, scales)


@contextlib.contextmanager
def prefect_server(home: Path):
    """A Prefect server on 127.0.0.1 for the runs, outside the measured process trees."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the Prefect server did not start") from None
                time.sleep(0.5)
        yield api
    finally:
        proc.terminate()
        proc.wait(30)


def mlflow_store(tmp: Path) -> str:
    """One MLflow store for every run of a tree, created before the first is measured: a project's
    store (``mlflow.db`` in the repo, or a tracking server) outlives its runs, so creating its
    tables (~2-3 CPU-s of migrations) is not a cost of any one stage run."""
    db = tmp / "mlflow.db"
    uri = f"sqlite:///{db}"
    if not db.exists():
        tmp.mkdir(parents=True, exist_ok=True)
        code = f"import mlflow; mlflow.set_tracking_uri({uri!r}); mlflow.search_experiments()"
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return uri


def run_all(scales, workers, repo: Path, tmp: Path, env: dict, code: str) -> list[dict]:
    """The 1x run first: what ingest read of the stdlib sets the size of the others."""
    base = yaml.safe_load((repo / "params.yaml").read_text())
    rows = []
    demo_mb = None
    for scale in scales:
        d = tmp / f"x{scale:g}"
        d.mkdir(parents=True)
        if scale == 1:
            source = {"uri": "stdlib", "name": "python-stdlib", "license": "PSF-2.0"}
            what = "Python stdlib (the embedded default)"
        else:
            if demo_mb is None:
                raise SystemExit("--scales must start with 1")
            site_packages_corpus(d / "corpus", scale * demo_mb)
            source = {"uri": str(d / "corpus"), "name": "site-packages", "license": "mixed"}
            what = "site-packages .py files"
        p = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
        p["data"].update(
            sources=[source],
            out_dir=str(d / "clean"),
            metrics_file=str(d / "ingest.json"),
            workers=workers,
        )
        p["tokenize"].update(
            in_dir=str(d / "clean"),
            tokenizer_dir=str(d / "tokenizer"),
            tokens_dir=str(d / "tokens"),
            metrics_file=str(d / "tokenize.json"),
            workers=workers,
        )
        p["infra"]["mlflow_tracking_uri"] = mlflow_store(tmp)
        params = d / "params.yaml"
        params.write_text(yaml.safe_dump(p))
        for stage, module in (("ingest", "flows.ingest"), ("tokenize", "flows.tokenize")):
            r = run_stage(module, params, env, repo)
            card = json.loads((d / "clean" / "card.json").read_text())
            # MB in: what ingest read; what tokenize read (ingest's output)
            mb = card["totals"]["bytes_in" if stage == "ingest" else "bytes_out"] / 1e6
            demo_mb = demo_mb or mb
            r.update(stage=stage, scale=scale, mb=mb, what=what, code=code)
            rows.append(r)
            print(
                f"[{code}] {stage:<8} {scale:>4g}x {mb:7.1f} MB ({what}): wall {r['wall']:6.1f} s, "
                f"{r['cpu']:6.1f} CPU-s, {mb / r['cpu']:5.2f} MB/CPU-s, "
                f"{r['cpu'] / r['wall']:.2f} cores busy, tree peak {r['tree_mb']:6.0f} MB, "
                f"largest process {r['proc_mb']:5.0f} MB",
                flush=True,
            )
        shutil.rmtree(d / "corpus", ignore_errors=True)
    return rows


def report(rows: list[dict], scales: list[float]) -> None:
    print()
    for code in dict.fromkeys(r["code"] for r in rows):
        for stage in ("ingest", "tokenize"):
            by = {r["scale"]: r for r in rows if r["stage"] == stage and r["code"] == code}
            for s in [s for s in scales[1:] if s in by and 1 in by]:
                print(
                    f"[{code}] {stage}: tree peak at {s:g}x / 1x = "
                    f"{by[s]['tree_mb'] / by[1]['tree_mb']:.2f}; largest process at {s:g}x: "
                    f"{by[s]['proc_mb']:.0f} MB"
                )
            if len(scales) >= 3 and all(s in by for s in scales[-2:]):
                lo, hi = by[scales[-2]], by[scales[-1]]
                print(
                    f"[{code}] {stage}: CPU-s per MB at {scales[-1]:g}x / at {scales[-2]:g}x = "
                    f"{(hi['cpu'] / hi['mb']) / (lo['cpu'] / lo['mb']):.2f}"
                )
    codes = list(dict.fromkeys(r["code"] for r in rows))
    if len(codes) == 2:  # this tree against the baseline revision, same run
        new, old = codes
        for r in [r for r in rows if r["code"] == old]:
            same = (r["stage"], r["scale"])
            n = next(x for x in rows if x["code"] == new and (x["stage"], x["scale"]) == same)
            print(
                f"{r['stage']} {r['scale']:g}x, this tree / {old}: CPU-s {n['cpu'] / r['cpu']:.2f}, "
                f"wall {n['wall'] / r['wall']:.2f}, tree peak {n['tree_mb'] / r['tree_mb']:.2f}, "
                f"largest process {n['proc_mb'] / r['proc_mb']:.2f}"
            )


if __name__ == "__main__":
    main()
