"""The package layout: imports go one way through magr's sub-packages, and no module cycle exists.

core (the math) <- pipeline (the run) <- evaluation, deploy (peers: neither imports the other)
<- magr.runs (whole jobs) <- reproduction <- magr.cli, magr/__init__.py. Every import counts, also those
inside functions (a lazy import is still a dependency of the design).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "magr"
LAYERS = {"core": 0, "pipeline": 1, "evaluation": 2, "deploy": 2, "runs": 3, "reproduction": 4,
          "cli": 5, "__main__": 6, "__init__": 6}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layer unit of a magr module: its sub-package, or the top-level module's own name."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def imports(path: Path, modules: set[str]) -> set[str]:
    """magr modules imported anywhere in ``path`` (absolute and relative, ``from X import module`` resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "magr" or t.startswith("magr."))
    return {t for t in found if t != name}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(files)) for name, path in files.items()}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, targets in edges.items():
        for b in targets:
            ua, ub = unit(a), unit(b)
            if b == "magr" and ua != "__init__" and ua != "__main__":
                bad.append(f"{a} imports the top-level package magr")
            elif ua != ub and b != "magr" and LAYERS[ua] <= LAYERS[ub]:
                bad.append(f"{a} ({ua}) imports {b} ({ub})")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    units = {unit(m) for m in graph()}
    assert units <= set(LAYERS), f"modules outside the known layers: {sorted(units - set(LAYERS))}"


def test_imports_go_one_way():
    assert upward_imports(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    edges = graph()
    edges["magr.core.optq"] = edges["magr.core.optq"] | {"magr.pipeline.models"}
    assert upward_imports(edges) == ["magr.core.optq (core) imports magr.pipeline.models (pipeline)"]
    edges["magr.pipeline.models"] = edges["magr.pipeline.models"] | {"magr.pipeline.tokenizer"}
    edges["magr.pipeline.tokenizer"] = edges["magr.pipeline.tokenizer"] | {"magr.pipeline.models"}
    assert ["magr.pipeline.models", "magr.pipeline.tokenizer"] in cycles(edges)


@pytest.mark.parametrize("package", ["core", "pipeline", "evaluation", "deploy", "reproduction"])
def test_each_subpackage_says_what_it_holds_and_may_import(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
    assert "Imports:" in doc, f"magr/{package}/__init__.py: the docstring must say what the package may import"
