"""The layers, read from the source (every import, function-local ones included): domain <- worker.engine
and app, each on its own <- the worker bridge <- cli; no import cycles; no module of app/ or worker/ over 500
lines."""
from __future__ import annotations

import ast
from pathlib import Path

from support.paths import ROOT

PACKAGES = ("domain", "app", "worker", "cli")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its body."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _layer(module: str) -> str:
    if module.startswith("worker.engine"):
        return "engine"
    return module.split(".")[0]


# which layers each layer may import (besides itself)
ALLOWED = {"domain": set(), "engine": {"domain"}, "app": {"domain"}, "worker": {"domain", "engine", "app"},
           "cli": {"domain", "engine", "app", "worker"}}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_layers_point_down_only():
    bad = sorted(f"{m} imports {t}" for m, ts in _graph().items() for t in ts
                 if _layer(t) != _layer(m) and _layer(t) not in ALLOWED[_layer(m)])
    assert not bad, "\n".join(bad)


def test_the_shared_package_imports_no_framework():
    frameworks = ("torch", "torchvision", "timm", "sqlalchemy", "fastapi", "starlette", "celery")
    bad = []
    for f in (ROOT / "domain").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{f.name}: {n}" for n in names if n.split(".")[0] in frameworks]
    assert not bad, bad


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for m, p in _modules().items()
            if m.split(".")[0] in ("app", "worker") and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
