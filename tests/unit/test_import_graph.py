"""The shape of relayd's imports: no cycles, and every import inside a function says why.

The graph is read from the source with ``ast`` (nothing is imported), so it sees what a plain
``import relayd.cli`` would not: imports inside functions and under ``if TYPE_CHECKING:``.
A cycle makes the import order matter and hides which layer depends on which (the arrows go
from cli, commands and daemon down to smtpd, delivery and control, then to policy, spool and
oauth, then to config and the shared vocabulary). An import inside a function is a deliberate
lazy import (memory or start-up time of a process that does not run that code), so it
carries a comment with the word "lazy" saying why; any other import belongs at the top.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "relayd"

def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    """One import statement (or ``importlib.import_module("relayd...")`` call) in a module."""

    node: ast.stmt | ast.Call
    targets: tuple[str, ...]   # the relayd modules it loads
    in_function: bool


def _with_parents(name: str) -> list[str]:
    """``relayd.a.b`` loads ``relayd``, ``relayd.a`` and ``relayd.a.b`` (each ``__init__`` runs)."""
    parts = name.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in MODULES]


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(module: str, node: ast.AST) -> list[str]:
    names: list[str] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            names += _with_parents(alias.name)
    elif isinstance(node, ast.ImportFrom):
        source = _absolute(module, node)
        names += _with_parents(source)
        # `from relayd.x import y` loads relayd.x.y when y is a submodule.
        names += [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in MODULES]
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "import_module" and node.args
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        names += _with_parents(node.args[0].value)
    return [n for n in dict.fromkeys(names) if n.startswith("relayd") and n != module]


def imports_of(module: str) -> Iterator[Import]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))

    def walk(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import | ast.ImportFrom | ast.Call):
                targets = _targets(module, child)
                if isinstance(child, ast.Import | ast.ImportFrom) or targets:
                    yield Import(child, tuple(targets), in_function)
            yield from walk(child, inside)

    yield from walk(tree, False)


def import_graph() -> dict[str, set[str]]:
    return {m: {t for imp in imports_of(m) for t in imp.targets} for m in MODULES}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: set[str] = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        start = min(component)
        # Breadth-first from start back to start, inside the component: a shortest cycle.
        paths = {start: [start]}
        queue = [start]
        cycle: list[str] | None = None
        while queue and cycle is None:
            v = queue.pop(0)
            for w in sorted(graph[v] & component):
                if w == start:
                    cycle = [*paths[v], start]
                    break
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
        assert cycle is not None
        cycles.append(cycle)
    return cycles


def test_the_graph_sees_function_level_and_submodule_imports() -> None:
    """The reader itself: a submodule named in ``from relayd.x import y`` and an import
    inside a function are both edges (else the cycle test below would pass vacuously)."""
    graph = import_graph()
    assert "relayd.config.sections" in graph["relayd.config.load"]   # from relayd.config import sections
    assert "relayd.policy.signing" in graph["relayd.policy.pipeline"]  # inside a function
    assert "relayd.commands.run" in graph["relayd.cli"]             # the CLI's lazy handlers
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_relayd_imports_have_no_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_relayd_modules_are_imported_by_name_not_by_string() -> None:
    """``importlib.import_module("relayd.x")`` hides a dependency from mypy and from this
    graph; when relayd.x moved, two such lookups broke silently. Lazy imports are ordinary
    ``import`` statements inside the function that needs them."""
    found = [f"{MODULES[m].relative_to(ROOT)}:{imp.node.lineno}" for m in MODULES
             for imp in imports_of(m) if isinstance(imp.node, ast.Call)]
    assert found == []


def _comments(path: Path) -> dict[int, str]:
    """Line number -> the comment on that line (tokenize: a "#" in a string is not one)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return {t.start[0]: t.string for t in tokens if t.type == tokenize.COMMENT}


def _comment_above(lines: list[str], comments: dict[int, str], lineno: int) -> str:
    """The comment block (consecutive comment-only lines) right above line ``lineno``."""
    block: list[str] = []
    n = lineno - 1
    while 0 < n <= len(lines) and lines[n - 1].lstrip().startswith("#"):
        block.append(comments.get(n, ""))
        n -= 1
    return " ".join(reversed(block))


def unexplained_function_imports() -> list[str]:
    """Every function-level import without "lazy" in a comment on its own line(s) or in the
    comment right above it; an import right below an explained one continues its block."""
    found: list[str] = []
    for module, path in MODULES.items():
        comments = _comments(path)
        lines = path.read_text(encoding="utf-8").splitlines()
        explained_until = -1   # last line of the latest explained import (a block continues it)
        for imp in imports_of(module):
            node = imp.node
            if not imp.in_function or not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            end = node.end_lineno or node.lineno
            own = any("lazy" in comments.get(n, "").lower() for n in range(node.lineno, end + 1))
            before = "lazy" in _comment_above(lines, comments, node.lineno).lower()
            if own or before or explained_until == node.lineno - 1:
                explained_until = end
            else:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_every_function_level_import_is_a_commented_lazy_import() -> None:
    found = unexplained_function_imports()
    assert found == [], ("imports inside functions must be deliberate lazy imports with a "
                         "'# lazy: why' comment (else move them to the top):\n" + "\n".join(found))
