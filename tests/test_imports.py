"""The package's import graph, read from the source: no cycles among ``utilrank_kernels`` modules, with the imports
inside functions counted too (a local import that hides an arrow still runs; import-linter's contracts in
``.importlinter`` check the layers, this checks that nothing loops), and no module importing the package face."""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

PACKAGE = "utilrank_kernels"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, a package named by its ``__init__.py``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _owning_module(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted name lives in (``pkg.mod.attr`` -> ``pkg.mod``); None outside the package."""
    while name not in modules:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def _from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """What ``from <base> import ...`` names: ``from . import x`` in ``pkg/a.py`` is ``pkg``, in ``pkg/__init__.py``
    also ``pkg``; each further dot goes one package up."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _targets(module: str, is_package: bool, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        base = _from_base(module, is_package, node)
        if base.split(".")[0] != PACKAGE:
            return []
        # ``from pkg import sub`` is an arrow to the submodule; ``from pkg import name`` one to pkg/__init__.py
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        return [t for t in map(functools.partial(_owning_module, modules=modules), names) if t]
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        names = [node.args[0].value]  # importlib.import_module("utilrank_kernels.x")
    else:
        return []
    # a module named in full; one that is not a source file here is the compiled extension (utilrank_kernels._C)
    return [name for name in names if name in modules]


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    modules = module_files(root)
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            graph[module].update(t for t in _targets(module, is_package, node, modules) if t != module)
    return {module: graph[module] for module in modules}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (iterative: the graph is small, the habit is not)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One loop through a component's first module, for the failure message (breadth first: a short one)."""
    members = set(component)
    start = component[0]
    came_from = {start: None}
    queue = [start]
    for node in queue:
        for child in sorted(graph[node] & members):
            if child == start:
                path = [node]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if child not in came_from:
                came_from[child] = node
                queue.append(child)
    raise AssertionError(f"{component} is not a cycle")


def test_no_import_cycles():
    graph = import_graph(ROOT)
    loops = [" -> ".join(a_cycle(graph, c)) + f"\n  the whole knot ({len(c)} modules): {', '.join(c)}"
             for c in strongly_connected(graph)]
    assert not loops, "import cycles among the package's modules:\n" + "\n".join(loops)


def test_no_module_imports_the_package_face():
    graph = import_graph(ROOT)
    importers = sorted(module for module, targets in graph.items() if PACKAGE in targets)
    assert not importers, f"import from the defining module, not the package face: {importers}"


def test_the_graph_reads_relative_imports(tmp_path):
    """``from . import x`` and ``from .. import x`` resolve to a submodule when x is one, else to the package."""
    files = {
        "__init__.py": "from .a import f\n",
        "a.py": "def f():\n    from . import b\n    from .sub import c\n",
        "b.py": "from . import VERSION\n",
        "sub/__init__.py": "",
        "sub/c.py": "from .. import a\nimport importlib\nimportlib.import_module('utilrank_kernels.b')\n",
        "sub/d.py": "from .. import thing\nfrom ..sub import c as _c\nimport utilrank_kernels._C\n",
    }
    root = tmp_path / PACKAGE
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    p = PACKAGE
    assert graph == {p: {f"{p}.a"}, f"{p}.a": {f"{p}.b", f"{p}.sub.c"}, f"{p}.b": {p}, f"{p}.sub": set(),
                     f"{p}.sub.c": {f"{p}.a", f"{p}.b"}, f"{p}.sub.d": {p, f"{p}.sub.c"}}
    knot = [p, f"{p}.a", f"{p}.b", f"{p}.sub.c"]
    assert strongly_connected(graph) == [knot]
    assert a_cycle(graph, knot) == [p, f"{p}.a", f"{p}.b", p]


def test_the_package_and_its_kernels_import_without_pydantic():
    """The GPU machines' image has no pydantic: the package, its ops and the factored modules import and run there;
    only reading a file back through its schema needs it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['pydantic'] = None\n"
            "import torch, utilrank_kernels\n"
            "from utilrank_kernels.ops import lowrank_linear\n"
            "x, a, b = torch.randn(3, 8), torch.randn(2, 8), torch.randn(5, 2)\n"
            "assert torch.allclose(lowrank_linear(x, a, b), x @ a.T @ b.T, atol=1e-5)\n"
            "assert 'pydantic' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
