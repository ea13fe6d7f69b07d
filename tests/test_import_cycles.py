"""The package's import graph: no module of fastvlm_kernels depends on itself through others, and none imports a
program of python/.

Every ``import`` and ``from ... import`` under fastvlm_kernels/ is read with ast (nothing is imported);
relative imports are resolved against the importing module, and ``from pkg import name`` counts as an import
of ``pkg.name`` when that is a module, else of ``pkg``. Imports inside functions count too: deferring an
import keeps a cycle from failing at import time, not from tying two modules into one (the trainer and the
teacher cache imported each other that way). Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fastvlm_kernels"


def package_modules(root: Path, package: str) -> Dict[str, Tuple[Path, bool]]:
    """{dotted module name: (file, is a package __init__)} of every .py file under ``root/package``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, (ast.Name, ast.Attribute)) and \
        (getattr(node.test, "id", None) or getattr(node.test, "attr", None)) == "TYPE_CHECKING"


def import_graph(root: Path, package: str) -> Dict[str, Dict[str, str]]:
    """{module: {imported module of the package: "module level" or "inside a function"}}."""
    modules = package_modules(root, package)

    def targets(module: str, is_package: bool, node) -> List[str]:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = module.split(".")[:None if is_package else -1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        found = []
        for name in names:
            while name and name not in modules:        # an attribute of a module: the module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.append(name)
        return found

    graph = {}
    for module, (path, is_package) in modules.items():
        edges: Dict[str, str] = {}

        def visit(node, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):
                    continue
                deferred = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in targets(module, is_package, child):
                        if edges.get(target) != "module level":
                            edges[target] = "inside a function" if deferred else "module level"
                visit(child, deferred)

        visit(ast.parse(path.read_text(), filename=str(path)), False)
        graph[module] = edges
    return graph


def import_cycles(graph: Dict[str, Dict[str, str]]) -> List[List[str]]:
    """The groups of two or more modules that import one another, directly or through others (the strongly
    connected components of the graph, Tarjan's algorithm), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in graph:
        if module not in index:
            connect(module)
    return sorted(cycles)


def _describe(graph, cycle: List[str]) -> str:
    return "; ".join(f"{module} imports {target} ({graph[module][target]})"
                     for module in cycle for target in sorted(graph[module]) if target in cycle)


def test_the_package_has_no_import_cycle():
    graph = import_graph(ROOT, PACKAGE)
    assert len(graph) > 30 and graph[f"{PACKAGE}.imitation.trainer"], "the package's modules were not found"
    cycles = import_cycles(graph)
    assert not cycles, "modules that import one another: " + " | ".join(_describe(graph, c) for c in cycles)


def test_the_finder_sees_a_cycle_through_a_deferred_import(tmp_path):
    """A two-module cycle whose second edge is an import inside a function, beside a module that only imports
    one of them and an import under TYPE_CHECKING that would close a second cycle."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import value\n")
    (package / "a.py").write_text("from .sub.b import helper\nvalue = 1\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def helper():\n    from .. import a\n    return a.value\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nimport pkg.a\n"
                                  "if TYPE_CHECKING:\n    from . import d\n")
    (package / "d.py").write_text("from .c import pkg\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub.b"] == {"pkg.a": "inside a function"}
    assert graph["pkg.a"] == {"pkg.sub.b": "module level"}
    assert graph["pkg.c"] == {"pkg.a": "module level"}
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_the_package_imports_no_program():
    """Training and data programs live in python/ (STYLE.md habit 18): the package never imports one."""
    programs = {path.stem for path in (ROOT / "python").glob("*.py")}
    assert programs, "python/ holds no programs"
    found = []
    for module, (path, _) in package_modules(ROOT, PACKAGE).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            found += [f"{module} imports {name}" for name in names if name.split(".")[0] in programs | {"python"}]
    assert not found, "; ".join(found)
