"""The house rules the layout promises, checked on the code itself (static imports, no execution
but the import-side-effect check):

- no import cycles between our modules, function-level imports included;
- the DAG shows in the imports: ``tasks.common`` imports no stage, ``model`` (but its entry points)
  imports only ``model`` and ``tasks.common``, a stage package imports only ``common``, ``model``,
  its own package and the stages upstream of it, and no flow imports the model;
- importing a module does no work: the process environment is the same before and after;
- no module needs a noqa for E402 (imports after code that had to run first).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

DAG = ("ingest", "tokenize", "train", "finetune", "evaluate", "release")
ENTRY_POINTS = {"model.train", "model.serve"}  # may load params, which gather every stage


def modules() -> dict[str, Path]:
    out = {}
    for top in ("flows", "tasks", "model"):
        for p in sorted((REPO / top).rglob("*.py")):
            name = ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            out[name] = p
    return out


def imports(path: Path, known: set[str], typing: bool = False) -> set[str]:
    """Our modules ``path`` imports anywhere in it; under TYPE_CHECKING too if ``typing``."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if not typing and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def graph(typing: bool = False) -> dict[str, set[str]]:
    """Module -> our modules it imports (at run time; with ``typing``, for annotations too)."""
    mods = modules()
    return {m: imports(p, set(mods), typing) - {m} for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """Not even through annotations: a module and its readers never need each other."""
    assert cycles(graph(typing=True)) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def allowed(module: str, dep: str) -> bool:
    """May ``module`` import ``dep``?"""
    parts, dparts = module.split("."), dep.split(".")
    if parts[0] == "flows":
        return dparts[0] in ("flows", "tasks")  # the model runs in torchrun's processes only
    if module in ENTRY_POINTS:
        return True
    if parts[0] == "model":
        return dparts[0] == "model" or dep.startswith("tasks.common")
    if module.startswith("tasks.common"):
        return dep.startswith("tasks.common")
    if module == "tasks.params" or module == "tasks":
        return dparts[0] == "tasks" or dep == "model.config"
    stage = parts[1]
    if dparts[0] == "model" or dep.startswith("tasks.common"):
        return True
    return dparts[0] == "tasks" and len(dparts) > 1 and dparts[1] in DAG[: DAG.index(stage) + 1]


def test_each_layer_imports_only_what_it_may():
    g = graph()
    wrong = sorted(f"{m} -> {d}" for m, deps in g.items() for d in deps if not allowed(m, d))
    assert wrong == []
    # and the rule is not vacuous: the stages do import upstream and common code
    assert "tasks.ingest.sources" in g["tasks.finetune.conversations"]
    assert not allowed("tasks.ingest.stage", "tasks.evaluate.report")
    assert not allowed("tasks.common.tracking", "tasks.params")


def test_importing_any_module_leaves_the_environment_alone():
    """Environment defaults are applied by entry points (``flows.cli``, ``model.train``,
    ``model.serve``, the flows' bodies), never as a side effect of an import."""
    names = sorted(modules())
    third_party = sorted(
        {
            n.split(".")[0]
            for p in modules().values()
            for n in third_party_imports(p)
            if n.split(".")[0] not in sys.stdlib_module_names
        }
    )
    code = (
        "import importlib, os, sys\n"
        f"for name in {third_party!r}:\n"  # what libraries do to the environment is theirs
        "    importlib.import_module(name)\n"
        "before = dict(os.environ)\n"
        f"for name in {names!r}:\n"
        "    if name.endswith('__main__'): continue\n"
        "    importlib.import_module(name)\n"
        "changed = sorted(k for k in set(before) | set(os.environ) "
        "if before.get(k) != os.environ.get(k))\n"
        "print(changed)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("HF_")}
    env.pop("DO_NOT_TRACK", None)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout


def third_party_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {n for n in out if n.split(".")[0] not in ("tasks", "model", "flows", "__future__")}


def test_no_import_needs_to_wait_for_code():
    found = [
        str(p.relative_to(REPO))
        for top in ("flows", "tasks", "model", "bench", "tests")
        for p in (REPO / top).rglob("*.py")
        if "noqa: " + "E402" in p.read_text()
    ]
    assert found == []
