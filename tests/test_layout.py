"""The import structure: no cycles between modules or between the job subpackages, and dependencies pointing one
way (pipelines -> actors, cluster; never back). Read from the source with `ast`, function-level imports included."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("actors", "cluster", "pipelines", "benchmarks")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: dict) -> set[str]:
    """Project modules imported anywhere in the file (`from a.b import c` counts a.b.c when that is a module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def subpackage(module: str) -> str:
    """The unit of the job layout: `pipelines.generate.chain` -> `pipelines.generate`; root modules stand alone."""
    parts = module.split(".")
    if parts[0] == "pipelines":
        return ".".join(parts[:2])
    return parts[0] if parts[0] == "cluster" else ".".join(parts[:2]) if parts[1:2] == ["common"] else parts[0]


def test_no_module_cycles():
    assert cycles(graph()) == []


def test_no_cycles_between_job_subpackages():
    g = graph()
    coarse: dict[str, set[str]] = {}
    for a, targets in g.items():
        coarse.setdefault(subpackage(a), set()).update(subpackage(b) for b in targets if subpackage(b) != subpackage(a))
    assert cycles(coarse) == []


def wrong_way_imports(g: dict) -> list[tuple[str, str]]:
    """actors/ and cluster/ never import pipelines/; nothing installed imports the benchmarks (a clone's only)."""
    return [(a, b) for a, targets in g.items() for b in targets
            if (a.split(".")[0] in ("actors", "cluster") and b.split(".")[0] == "pipelines")
            or (a.split(".")[0] != "benchmarks" and b.split(".")[0] == "benchmarks")]


def test_actors_and_cluster_never_import_pipelines():
    assert wrong_way_imports(graph()) == []


def test_the_stage_modules_are_stages():
    """`actors/` holds the stages (and their contract); what they share lives in `actors/common/`."""
    import importlib
    loose = []
    for path in sorted((ROOT / "actors").glob("*.py")):
        if path.stem in ("__init__", "contract"):
            continue
        module = importlib.import_module(f"actors.{path.stem}")
        if not any(hasattr(obj, "REQUIRES") and hasattr(obj, "ADDS") for obj in vars(module).values()
                   if isinstance(obj, type) and obj.__module__ == module.__name__):
            loose.append(path.name)
    assert loose == []


@pytest.mark.parametrize("edge, check", [(("pipelines.config", "pipelines.generate.job"), cycles),
                                         (("actors.images", "pipelines.cli"), wrong_way_imports),
                                         (("cluster.storage", "pipelines.layout"), wrong_way_imports),
                                         (("pipelines.plan", "benchmarks.sim"), wrong_way_imports)])
def test_the_checks_see_a_cycle_and_a_wrong_way_import(edge, check):
    """The checks above can fail: the same functions, given one edge that closes a cycle or points back up."""
    g = graph()
    assert check(g) == []
    a, b = edge
    g[a] = g[a] | {b}
    assert check(g) != []
