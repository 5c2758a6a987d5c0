"""Imports go one way: cli -> train/evaluate -> testbeds/leaderboard -> noise/record/scoring/resources.

Read from the source (every import statement, function-local ones included), so a lazy import inside a function
cannot hide a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "noisebench"
LAYERS = {  # module prefix -> layer; a module imports only from its own layer or below
    "noisebench.cli": 3, "noisebench.__main__": 3,
    "noisebench.train": 2, "noisebench.evaluate": 2, "noisebench.evaluate_only": 2,
    "noisebench.testbeds": 1, "noisebench.leaderboard": 1,
    "noisebench.noise": 0, "noisebench.record": 0, "noisebench.scoring": 0, "noisebench.resources": 0,
    "noisebench": 0,  # the package's __init__
}


def _name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    name, out = _name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("noisebench")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("noisebench"):
                out |= {f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names}
    return out - {name}


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (REPO / rel).with_suffix(".py").is_file() or (REPO / rel / "__init__.py").is_file()


GRAPH = {_name(p): _imports(p) for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}


def _layer(module: str) -> int:
    return LAYERS[max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)]


def test_the_graph_is_read():
    assert "noisebench.train.builders" in GRAPH["noisebench.train.runner"]
    assert "noisebench.noise.fast.kernels" in GRAPH  # subpackages too
    assert sum(map(len, GRAPH.values())) > 50


def test_imports_point_down_the_layers():
    up = sorted(f"{m} -> {i}" for m, deps in GRAPH.items() for i in deps
                if m != "noisebench" and _layer(i) > _layer(m))
    assert not up, up


def test_noise_and_record_import_nothing_else_of_noisebench():
    for m, deps in GRAPH.items():
        if m.startswith("noisebench.noise"):
            assert all(d.startswith("noisebench.noise") for d in deps), (m, deps)
        if m in ("noisebench.record", "noisebench.resources"):
            assert not deps, (m, deps)


def test_only_the_cli_imports_the_runner():
    users = sorted(m for m, deps in GRAPH.items() if "noisebench.train.runner" in deps)
    assert users == ["noisebench.cli"], users


def test_no_import_cycles_outside_the_noise_engine():
    """Strongly connected modules (Tarjan) outside ``noise/``, whose own layout its maintainers keep."""
    nodes = [m for m in GRAPH if not m.startswith("noisebench.noise")]
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in GRAPH or w.startswith("noisebench.noise"):
                continue
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
                cycles.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    assert not cycles, cycles
