"""Imports only go down: no import cycle between loraformat's packages, nor between two modules
(inside one package too), and no module imports another module's underscore name (what two
modules share is public where it lives).

Every import counts, including those inside functions (a lazy import is still a dependency). The
root ``loraformat/__init__.py`` is the public facade re-exporting the packages below it, so it is
not a node of the graph.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = {"loraformat": ROOT / "loraformat", "loraformat_plugins": ROOT / "plugins"}


def module_name(package: str, directory: Path, file: Path) -> str:
    parts = list(file.relative_to(directory).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imports(package: str, directory: Path) -> list[tuple[str, str, str | None, int]]:
    """(importing module, imported module, imported name or None, line) for every import."""
    found = []
    for file in sorted(directory.rglob("*.py")):
        module = module_name(package, directory, file)
        is_package = file.name == "__init__.py"
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [(module, alias.name, None, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")
                    # ``from . import x`` in a package's __init__ is the package itself.
                    drop = node.level - 1 if is_package else node.level
                    base = base[: len(base) - drop]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    found.append((module, target, alias.name, node.lineno))
    return found


ALL = [edge for package, directory in PACKAGES.items() for edge in imports(package, directory)]


def unit(module: str) -> str | None:
    """The node of the package graph a loraformat module belongs to (None: not loraformat's,
    or the root facade)."""
    parts = module.split(".")
    if parts[0] != "loraformat" or len(parts) == 1:
        return None
    return ".".join(parts[:2])


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for importer, target, name, _ in ALL:
        source = unit(importer)
        # ``from loraformat import format`` names a package through the facade.
        dest = unit(f"{target}.{name}" if target == "loraformat" and name else target)
        if source and dest and source != dest:
            graph[source].add(dest)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def module_graph() -> dict[str, set[str]]:
    """loraformat module → the loraformat modules it imports (``from pkg import mod`` is the
    module ``pkg.mod``; a package is its ``__init__``)."""
    modules = {importer for importer, _, _, _ in ALL}
    graph: dict[str, set[str]] = defaultdict(set)
    for importer, target, name, _ in ALL:
        if unit(importer) is None:
            continue
        dest = f"{target}.{name}" if name and f"{target}.{name}" in modules else target
        if dest in modules and dest != importer and unit(dest) is not None:
            graph[importer].add(dest)
    return graph


def test_no_import_cycle_between_packages():
    graph = package_graph()
    assert "loraformat.base" in graph and "loraformat.architecture" in graph["loraformat.base"]
    assert cycles(graph) == []


def test_no_import_cycle_between_modules():
    graph = module_graph()
    assert "loraformat.interchange.peft_keys" in graph["loraformat.interchange.peft_variants"]
    assert cycles(graph) == []


#: Private modules of other projects imported on purpose, and why.
ALLOWED_PRIVATE = {
    # ONNX Runtime's MatMulNBits quantizer kernels live only there; its own MatMulNBitsQuantizer
    # imports them from there (the public module that re-exports them costs 2 s to import).
    "onnxruntime.capi._pybind_state",
    # torch's scan (a prototype with no public name in torch 2.13), which torch.onnx exports as
    # one ONNX Scan: Qwen3.5's gated delta rule over a dynamic sequence.
    "torch._higher_order_ops.scan",
}


def test_no_import_of_another_modules_underscore_name():
    bad = []
    for importer, target, name, line in ALL:
        where = f"{importer}:{line}"
        if target in ALLOWED_PRIVATE or f"{target}.{name}" in ALLOWED_PRIVATE:
            continue
        # an underscore module outside its own package (``..algebra._common`` from the CLI)
        modules = target.split(".") + ([name] if name else [])
        for depth, part in enumerate(modules):
            if part.startswith("_") and not part.startswith("__"):
                owner = ".".join(modules[:depth])
                if not importer.startswith(owner + ".") and importer != owner:
                    bad.append(f"{where} imports {'.'.join(modules[: depth + 1])}")
                break

    assert sorted(set(bad)) == []


def test_the_checks_can_fail():
    """The graph and the underscore rule see what they are meant to see."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    cli_imports = [(t, n) for i, t, n, _ in ALL if i == "loraformat.cli.algebra_cmd"]
    assert ("loraformat.algebra", "DTYPE_CHOICES") in cli_imports
