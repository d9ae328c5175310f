"""The package is layered one way: no import cycle between its modules or subpackages, lower never imports higher.

Every import statement of every module under ``dsnet/`` counts, wherever it is: at module level, inside a
function (a lazy import), under ``if TYPE_CHECKING:``. A lazy import still makes the importing module depend on
the imported one; it only changes *when* the import runs, so a lazy import that goes up the layer order is a
cycle postponed, not removed. ``TYPE_CHECKING`` imports count too (a type checker resolves them), so the type
annotations follow the same order as the code.

Edges: ``import a.b`` and ``from a.b import c`` depend on ``a.b`` (or on the module ``a.b.c`` when ``c`` is
one). Importing a submodule first runs its package's ``__init__``, so ``a.b`` also depends on the package ``a``
(when the importer is outside ``a``: inside it, ``a`` is already being imported. Not for the root ``dsnet``
package either, whose ``__init__`` is the public facade and imports nothing at module level: its names are
imported when first used, which :func:`test_root_package_imports_lazily` checks).

Run as a script (``python tests/test_layering.py``) it prints the cycles and the edges that break the layer order.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dsnet"

# The layer of each part of dsnet (a subpackage or a top-level module): a module may import modules of its own
# layer or of a lower one, never of a higher one. Within a layer the package graph must still be acyclic.
LAYERS: dict[str, int] = {
    "utils": 0,  # tables, atomic files, config schema, the checkpoint file format, threads, FLOP counting
    "layers": 1,  # sliced layers, gates, static building blocks, channel groups and importance order
    "models": 2,  # DynamicNet, the model families, the registry, pretrained imports
    "macs": 2,  # count_macs: dispatches on the model kind
    "data": 3,  # datasets, transforms, loaders, recipes
    "train": 4,  # stage I / stage II / LC-Net training, checkpoints, config
    "evaluation": 4,  # reports, sweeps, statistics, plots
    "baselines": 5,  # US-Nets, networks trained alone
    "convert": 5,  # make_dynamic
    "export": 5,  # ONNX, compact copies
    "search": 5,  # progressive sub-network search
    "bench": 6,  # timing harness (times the ONNX bundle: above export)
    "quickstart": 7,  # the end-to-end recipe
    "compare": 7,  # every method on one recipe (starts from the quickstart's)
    "dsnet": 8,  # the root package: the public facade
    "cli": 9,  # the dsnet command
    "__main__": 9,
}


# ------------------------------------------------------------------------------------------ the graph
def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every dotted name ``source`` imports, from any statement anywhere (functions, ``TYPE_CHECKING`` blocks).

    ``from a import b`` yields ``a.b``: the module ``a.b`` if there is one, else a name in ``a`` (see
    :func:`_resolve`). Relative
    imports are resolved against ``module``.
    """
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names.update(origin if alias.name == "*" else f"{origin}.{alias.name}" for alias in node.names)
    return names


def _resolve(name: str, modules: Iterable[str]) -> str | None:
    """The module a dotted name lives in: the longest prefix of it that is a module."""
    known = set(modules)
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(files: Mapping[str, Path], root: str = "dsnet") -> dict[str, set[str]]:
    """Module -> the package modules it depends on (its imports, and the ``__init__`` of each enclosing subpackage)."""
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for name in imported_names(path.read_text(), module, is_package):
            if name == root or name.startswith(root + "."):
                target = _resolve(name, files)
                if target is not None:
                    targets.add(target)
        for target in list(targets):  # importing a.b.c first runs a.b's __init__ (the root's excepted) ...
            parent = target.rpartition(".")[0]
            while parent and parent != root:
                if not (module + ".").startswith(parent + "."):  # ... unless it is the importer's own package
                    targets.add(parent)
                parent = parent.rpartition(".")[0]
        graph[module] = {t for t in targets if t != module}
    return graph


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (each sorted), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def part(module: str, root: str = "dsnet") -> str:
    """The layer-table entry of a module: its subpackage or top-level module (``dsnet`` for the root package)."""
    return module.split(".")[1] if "." in module else root


def package_graph(graph: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        out.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    return out


def layer_violations(graph: Mapping[str, Iterable[str]], layers: Mapping[str, int]) -> list[str]:
    """``a -> b`` edges where ``b``'s layer is above ``a``'s."""
    return sorted(
        f"{m} (layer {layers[part(m)]}, {part(m)}) imports {t} (layer {layers[part(t)]}, {part(t)})"
        for m, targets in graph.items()
        for t in targets
        if layers[part(t)] > layers[part(m)]
    )


def _describe(components: list[list[str]], graph: Mapping[str, Iterable[str]]) -> str:
    lines = []
    for comp in components:
        members = set(comp)
        lines.append(f"cycle of {len(comp)}: " + ", ".join(comp))
        lines += [f"    {m} -> {t}" for m in comp for t in sorted(graph[m]) if t in members]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_files())


def test_no_module_import_cycle(graph):
    found = cycles(graph)
    assert not found, "import cycles between dsnet modules:\n" + _describe(found, graph)


def test_no_package_import_cycle(graph):
    packages = package_graph(graph)
    found = cycles(packages)
    assert not found, "import cycles between dsnet subpackages:\n" + _describe(found, packages)


def test_every_part_has_a_layer(graph):
    missing = sorted({part(m) for m in graph} - LAYERS.keys())
    assert not missing, f"put these parts of dsnet into LAYERS (tests/test_layering.py): {missing}"


def test_lower_layers_never_import_higher_ones(graph):
    bad = layer_violations(graph, LAYERS)
    assert not bad, "imports up the layer order:\n" + "\n".join(bad)


def test_root_package_imports_lazily():
    """``dsnet/__init__`` imports nothing of dsnet at module level: why its implicit edge is not counted."""
    eager = []
    for node in ast.parse((PACKAGE / "__init__.py").read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue  # runs on attribute access (PEP 562 __getattr__)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue  # never runs
        for sub in ast.walk(node):
            if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("dsnet"):
                eager.append(f"line {sub.lineno}: from {sub.module} import ...")
            elif isinstance(sub, ast.Import) and any(a.name.startswith("dsnet") for a in sub.names):
                eager.append(f"line {sub.lineno}: import {', '.join(a.name for a in sub.names)}")
    assert not eager, "dsnet/__init__.py imports eagerly:\n" + "\n".join(eager)


# ------------------------------------------------------------------------------------------ self-checks
def test_the_cycle_finder_finds_a_synthetic_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set(), "f": {"f"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_and_type_checking_imports_are_seen(tmp_path):
    pkg = tmp_path / "dsnet"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from dsnet.high.b import g\n    return g\n")
    (pkg / "high").mkdir()
    (pkg / "high" / "__init__.py").write_text("")
    (pkg / "high" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..low import a\n\ndef g():\n    pass\n"
    )
    graph = import_graph(module_files(pkg))
    assert graph["dsnet.low.a"] == {"dsnet.high", "dsnet.high.b"}
    assert graph["dsnet.high.b"] == {"dsnet.low", "dsnet.low.a"}
    assert cycles(graph) == [["dsnet.high.b", "dsnet.low.a"]]
    violations = layer_violations(graph, {"low": 0, "high": 1, "dsnet": 2})
    assert violations and all(v.startswith("dsnet.low.a") for v in violations)


if __name__ == "__main__":  # a report of the current state, for refactoring
    g = import_graph(module_files())
    print(_describe(cycles(g), g) or "no module cycles")
    p = package_graph(g)
    print(_describe(cycles(p), p) or "no package cycles")
    print("\n".join(layer_violations(g, LAYERS)) or "no layer violations")
