"""dvc.yaml agrees with the code, so that `dvc repro` reruns exactly what changed: each stage runs
its flow, its outputs are the paths its params section writes by default, its deps hold every
input path its section follows upstream and every module its flow (and torchrun's entry point)
imports, and its params hold its section. The README's diagram draws the same DAG."""

from __future__ import annotations

import ast
import re

import pytest
import yaml

from tasks.common.config import follows_of
from tasks.params import Params
from tests.conftest import REPO
from tests.test_house import graph

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
SECTION = {"ingest": "data"}  # a stage's params section, where its name differs
# The modules of tasks.common whose content shapes a stage's outputs (the rest is plumbing:
# where files go, how runs are logged); a stage that imports one lists it in its deps. (The
# secret patterns of tasks.common.redaction shape ingest's corpus and the release's model card,
# and only mask log lines elsewhere: those two stages list it.)
SHAPING = {"tasks.common.chat", "tasks.common.benchmarks"}


def section(stage: str):
    return Params.model_fields[SECTION.get(stage, stage)].annotation


def paths(stage: str) -> tuple[dict[str, str], dict[str, str]]:
    """(outputs, inputs) of a stage's section: path fields by their defaults; an input is a field
    that follows an upstream output."""
    outs, ins = {}, {}
    for name, info in section(stage).model_fields.items():
        default = info.get_default(call_default_factory=True)
        if not isinstance(default, str) or not name.endswith(("_dir", "_file", "_summary")):
            continue
        (ins if follows_of(info) else outs)[name] = default
    return outs, ins


def declared(stage: str, kind: str) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in DVC[stage].get(kind, [])]


def under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


@pytest.mark.parametrize("stage", list(DVC))
def test_stage_runs_its_flow_and_declares_its_params_section(stage):
    assert DVC[stage]["cmd"] == f"python -m flows {stage}"
    assert SECTION.get(stage, stage) in DVC[stage]["params"]
    # whole sections: params.yaml holds only what a run changes, so a dotted key may be absent
    # from it, and DVC refuses to run a stage whose params key is missing
    assert set(DVC[stage]["params"]) <= set(Params.model_fields)


@pytest.mark.parametrize("stage", list(DVC))
def test_outputs_are_the_paths_the_section_writes(stage):
    outs, _ = paths(stage)
    written = declared(stage, "outs") + declared(stage, "metrics")
    assert outs, stage
    assert [p for p in written if not under(p, outs.values())] == []
    assert [k for k, p in outs.items() if not any(under(w, [p]) for w in written)] == []


@pytest.mark.parametrize("stage", list(DVC))
def test_every_followed_input_is_a_dep(stage):
    _, ins = paths(stage)
    deps = declared(stage, "deps")
    assert [k for k, p in ins.items() if not any(under(d, [p]) for d in deps)] == []


# Where the walk stops: the command-line dispatcher (it reaches every stage), the params loader
# (it gathers every stage's section), another stage's config module (imported for the path it
# follows: another stage's defaults shape no output here) and tasks.common (plumbing, but for
# SHAPING, which counts where a stage or model module imports it).
DISPATCH = {"flows.cli", "tasks.params"}


def closure(stage: str, roots: list[str]) -> set[str]:
    g, seen, todo = graph(), set(), list(roots)
    own = f"tasks.{stage}.config"
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        leaf = m.startswith("tasks.common") or (m.endswith(".config") and m.startswith("tasks."))
        if leaf and m != own:
            continue
        todo += sorted(g.get(m, set()) - DISPATCH)
    return {m for m in seen if not (m.endswith(".config") and m.startswith("tasks.") and m != own)}


@pytest.mark.parametrize("stage", list(DVC))
def test_the_code_a_stage_runs_is_in_its_deps(stage):
    roots = [f"flows.{stage}"] + (["model.train"] if stage in ("train", "finetune") else [])
    mods = closure(stage, roots)
    needed = {
        m
        for m in mods
        if (m.startswith("tasks.") and not m.startswith("tasks.common") and m != "tasks.params")
        or m.startswith("model.")
        or m in SHAPING
        or m == f"flows.{stage}"
    }
    needed -= {"model.train"} - ({"model.train"} if stage in ("train", "finetune") else set())
    files = {m: (m.replace(".", "/") + ".py") for m in needed}
    deps = declared(stage, "deps")
    missing = sorted(
        f for m, f in files.items() if not under(f, deps) and not under(f.removesuffix(".py"), deps)
    )
    assert missing == [], f"{stage} runs code dvc.yaml does not watch: {missing}"


def test_the_readme_diagram_is_dvcs_dag():
    """The README's mermaid graph has one edge per (upstream stage, downstream stage) DVC sees."""
    outs = {s: declared(s, "outs") + declared(s, "metrics") for s in DVC}
    edges = set()
    for stage in DVC:
        for dep in declared(stage, "deps"):
            for up, o in outs.items():
                if up != stage and (under(dep, o) or any(under(x, [dep]) for x in o)):
                    edges.add((up, stage))
    readme = (REPO / "README.md").read_text()
    block = readme.split("```mermaid", 1)[1].split("```", 1)[0]
    drawn = set(re.findall(r"^\s*(\w+)\s*-->\|[^|]*\|\s*(\w+)\s*$", block, re.M))
    assert drawn == edges


def test_module_docstrings_name_no_stale_paths():
    """A docstring that names a file of this repo names one that exists."""
    stale = []
    for p in [*REPO.glob("tasks/**/*.py"), *REPO.glob("model/*.py"), *REPO.glob("flows/*.py")]:
        doc = ast.get_docstring(ast.parse(p.read_text())) or ""
        for ref in re.findall(r"\b((?:tasks|model|flows|bench)/[\w/]+\.py)\b", doc):
            if not (REPO / ref).exists():
                stale.append(f"{p.relative_to(REPO)}: {ref}")
    assert stale == []
