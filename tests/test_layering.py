"""The package's house rules, read from the source with ``ast`` (no lowcomm module is imported).

Layers, lowest first (docs/architecture.md): the base modules ``lowcomm.errors``,
``lowcomm.faults``, ``lowcomm._tensors``, ``lowcomm._version``; ``comm`` and ``compression``;
``diloco``, ``checkpoint`` and ``recovery``; ``trainer`` and ``testing``; ``launch``; and the root
``lowcomm/__init__.py``, which re-exports the user-facing names of every layer. A module imports
only its own layer or lower ones, with these restrictions: comm may import compression but not the
reverse; diloco, checkpoint and recovery do not import one another, nor trainer and testing
(``SIDEWAYS_ALLOWED`` lists the pairs the architecture allows); only launch and testing import
``lowcomm.testing``.

An import counts wherever it sits (a function-local import is a dependency too), except that one
under ``if TYPE_CHECKING:`` counts for the layers and not for cycles, since it never runs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "lowcomm"
MAX_LINES = 650

BASE = ("lowcomm.errors", "lowcomm.faults", "lowcomm._tensors", "lowcomm._version")
# The root package re-exports the user-facing names of every layer, so it sits above them all.
ROOT_LAYER = 5
LAYERS = {
    "comm": 1,
    "compression": 1,
    "diloco": 2,
    "checkpoint": 2,
    "recovery": 2,
    "trainer": 3,
    "testing": 3,
    "launch": 4,
}
LAYER_NAMES = {
    0: "base",
    1: "comm/compression",
    2: "diloco/checkpoint/recovery",
    3: "trainer/testing",
    4: "launch",
    ROOT_LAYER: "the root package",
}
# (importer, imported) subpackage pairs of one layer that may depend on each other.
SIDEWAYS_ALLOWED = {("comm", "compression")}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a file: lowcomm.x.y or the package lowcomm.x)
    line: int
    type_only: bool  # under ``if TYPE_CHECKING:``
    names: tuple[str, ...]  # for ``from M import a, b``: a, b that are not modules; else ()

    def where(self) -> str:
        return f"{_path_of(self.source)}:{self.line}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _path_of(module: str) -> str:
    return str(MODULES[module].relative_to(PACKAGE_DIR.parent))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(tree: ast.AST) -> Iterator[tuple[ast.AST, bool]]:
    """Every node with whether it sits under ``if TYPE_CHECKING:``."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, type_only = stack.pop()
        yield node, type_only
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend((child, True) for child in node.body)
            stack.extend((child, type_only) for child in node.orelse)
            stack.append((node.test, type_only))
        else:
            stack.extend((child, type_only) for child in ast.iter_child_nodes(node))


def _resolve(name: str) -> str | None:
    """The module file ``name`` names, or its nearest enclosing module under lowcomm."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[Import]:
    tree = TREES[module]
    package = module if module in PACKAGES else module.rpartition(".")[0]
    found = []
    for node, type_only in _nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name) if alias.name.startswith("lowcomm") else None
                if target and target != module:
                    found.append(Import(module, target, node.lineno, type_only, ()))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not (base == "lowcomm" or base.startswith("lowcomm.")):
                continue
            plain: list[str] = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # ``from lowcomm.comm import ring``: the module ring
                    if sub != module:
                        found.append(Import(module, sub, node.lineno, type_only, ()))
                else:
                    plain.append(alias.name)
            target = _resolve(base)
            if plain and target and target != module:
                found.append(Import(module, target, node.lineno, type_only, tuple(plain)))
    return found


TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}
IMPORTS = [imp for module in MODULES for imp in _imports(module)]


def _subpackage(module: str) -> str | None:
    """``lowcomm.comm.ring`` -> ``comm``; None for the root and the base modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and module not in BASE else None


def _layer(module: str) -> int | None:
    if module == "lowcomm":
        return ROOT_LAYER
    sub = _subpackage(module)
    return 0 if sub is None and module in BASE else LAYERS.get(sub or "")


def _report(problems: list[str], what: str) -> str:
    return f"{len(problems)} {what}:\n  " + "\n  ".join(problems)


def test_the_import_graph_is_read_from_every_module() -> None:
    # Guards the other tests against passing vacuously on a graph that lost its edges.
    assert "lowcomm.comm" in PACKAGES and "lowcomm.faults" in MODULES
    edges = {(i.source, i.target) for i in IMPORTS}
    assert ("lowcomm", "lowcomm.errors") in edges and _layer("lowcomm") == ROOT_LAYER
    assert any(source.startswith("lowcomm.launch.") for source, _ in edges)
    unassigned = sorted(m for m in MODULES if _layer(m) is None)
    assert not unassigned, f"modules in no layer (add them to BASE or LAYERS): {unassigned}"


def test_no_import_cycle_between_files() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if not imp.type_only:
            graph[imp.source].add(imp.target)
    cycles = [" -> ".join([*c, c[0]]) for c in _cycles(graph)]
    assert not cycles, _report(cycles, "import cycles between files (each listed once)")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth-first from start until an edge comes back to it
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(component)  # unreachable for a strongly connected component


def test_no_module_imports_a_higher_layer() -> None:
    problems = []
    for imp in IMPORTS:
        src, dst = _layer(imp.source), _layer(imp.target)
        if src is not None and dst is not None and dst > src:
            problems.append(
                f"{imp.where()} {imp.source} ({LAYER_NAMES[src]}) imports {imp.target} "
                f"({LAYER_NAMES[dst]}, a higher layer)"
            )
    assert not problems, _report(problems, "imports of a higher layer")


def test_subpackages_of_one_layer_import_each_other_only_where_allowed() -> None:
    # compression knows no sockets; diloco, checkpoint and recovery are independent of each other.
    problems = []
    for imp in IMPORTS:
        src, dst = _subpackage(imp.source), _subpackage(imp.target)
        if src is None or dst is None or src == dst or LAYERS[src] != LAYERS[dst]:
            continue
        if (src, dst) not in SIDEWAYS_ALLOWED:
            problems.append(f"{imp.where()} {imp.source} imports {imp.target} ({src} -> {dst})")
    assert not problems, _report(problems, "imports between subpackages of one layer")


def test_only_launch_and_testing_import_lowcomm_testing() -> None:
    problems = [
        f"{imp.where()} {imp.source} imports {imp.target}"
        for imp in IMPORTS
        if _subpackage(imp.target) == "testing"
        and _subpackage(imp.source) not in ("testing", "launch")
    ]
    assert not problems, _report(problems, "imports of lowcomm.testing from the library")


def test_no_importlib_or_dunder_import_in_lowcomm() -> None:
    # A dependency loaded by name is invisible to this test and to readers: import it plainly.
    problems = []
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(
                a.name.split(".")[0] == "importlib" for a in node.names
            ):
                problems.append(f"{_path_of(module)}:{node.lineno} imports importlib")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("importlib"):
                problems.append(f"{_path_of(module)}:{node.lineno} imports from importlib")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "__import__"
            ):
                problems.append(f"{_path_of(module)}:{node.lineno} calls __import__")
    assert not problems, _report(problems, "dynamic imports")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_is_imported_or_used_across_modules() -> None:
    # ``from M import _x`` of a non-module name, or ``M._x`` on an imported lowcomm module M.
    problems = [
        f"{imp.where()} {imp.source} imports {name} from {imp.target}"
        for imp in IMPORTS
        for name in imp.names
        if _private(name)
    ]
    for module, tree in TREES.items():
        aliases: dict[str, str] = {}  # local name -> lowcomm module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("lowcomm") and a.asname and a.name in MODULES:
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
                and f"{aliases[node.value.id]}.{node.attr}" not in MODULES
            ):
                problems.append(
                    f"{_path_of(module)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}"
                )
    assert not problems, _report(problems, "private names used across modules")


def test_private_modules_are_imported_only_inside_their_subpackage() -> None:
    # lowcomm.comm._wire is comm's own business; a root-level one (lowcomm._tensors) is everyone's.
    problems = []
    for imp in IMPORTS:
        parent, _, leaf = imp.target.rpartition(".")
        if not _private(leaf) or parent == "lowcomm":
            continue
        if not (imp.source == parent or imp.source.startswith(parent + ".")):
            problems.append(f"{imp.where()} {imp.source} imports the private module {imp.target}")
    assert not problems, _report(problems, "private modules imported from outside their package")


def test_no_module_is_over_650_lines() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    problems = [f"{_path_of(m)}: {n} lines" for m, n in sorted(sizes.items()) if n > MAX_LINES]
    assert not problems, _report(problems, f"modules over {MAX_LINES} lines")
