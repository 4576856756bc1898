"""The house's rules, checked on the source: arrows only point down, and no import cycle.

(DESIGN.md §1, README "How it is built". Issue 24 adds one job and <= 600 lines per module and no
private name across modules or from tests once the big modules are split.)"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import p2ppay

PACKAGE = Path(p2ppay.__file__).parent

#: Each area of the package and its rank: a module may import its own area and lower ranks only
#: (arrows point down). ``client`` and ``server`` share a rank and never import each other.
RANKS = {
    "wire": 0,
    # the modules at the package's top (settings, logs, pki, tls, receipts, passwords,
    # ownthread, accepting): shared by the layers above, below everything that has a job of its own
    "shared": 1,
    "ledger": 2,
    "presence": 3,
    "server": 4,
    "client": 4,
    "cli": 5,
    "__main__": 6,
}
FOLDERS = {"wire", "ledger", "presence", "server", "client", "cli"}


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


#: every module of the package, by dotted name
KNOWN = frozenset(m for m, _ in modules())


def area(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return ""
    return parts[1] if parts[1] in FOLDERS or parts[1] == "__main__" else "shared"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, *, runtime_only: bool) -> set[str]:
    """The p2ppay modules ``path`` imports (``from p2ppay.x import y`` counts ``p2ppay.x.y``
    when that is a module)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node):
                skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("p2ppay")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            if node.module.startswith("p2ppay"):
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names} & KNOWN
    return found


def test_arrows_only_point_down() -> None:
    for module, path in modules():
        mine = area(module)
        if mine == "":
            continue
        assert mine in RANKS, f"{module}: area {mine!r} has no rank in this test"
        for target in imports(path, runtime_only=False):
            theirs = area(target)
            if theirs in ("", mine):
                continue
            assert RANKS[theirs] < RANKS[mine], f"{module} imports {target}: an arrow up"


def test_no_import_cycle() -> None:
    graph = {m: imports(p, runtime_only=True) for m, p in modules()}
    # a package's __init__ re-exporting its modules is not a cycle with them
    for m in graph:
        graph[m] = {t for t in graph[m] if t in graph and not t.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(t) :], t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
