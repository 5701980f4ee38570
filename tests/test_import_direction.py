"""Imports point one way (../shared/docs/design.md): driver -> passes -> codegen -> model, runtime -> codegen ->
model; export tools sit beside the driver; nothing imports the CLI; no module imports itself through a cycle.

The walk reads every source file with `ast` (nothing is imported), resolves relative imports, and checks each
arrow between dsv4c's rooms against `ALLOWED`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("model", "codegen", "passes", "runtime", "compiler", "export")
# room -> the rooms its modules may import (besides itself)
ALLOWED = {
    "model": set(),
    "codegen": {"model"},
    "passes": {"codegen", "model"},
    "runtime": {"codegen", "model"},
    "export": {"compiler", "runtime", "passes", "codegen", "model"},
    "compiler": {"passes", "codegen", "model", "runtime"},
}
CLI = "dsv4c.compiler.cli"
# The CLI is the top of the house: it alone of the driver may use the export tools.
CLI_MAY_ALSO = {"export"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "dsv4c." + ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every dsv4c module `path` imports (a `from pkg import name` counts pkg.name when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("dsv4c."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("dsv4c"):
                continue
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for room in ROOMS for p in (ROOT / room).rglob("*.py")}
    return {name: {m for m in _imports(path, name) if m in files} for name, path in files.items()}


def _room(module: str) -> str:
    return module.split(".")[1]


def test_every_room_is_walked():
    rooms = {_room(m) for m in _graph()}
    assert rooms == set(ROOMS)


def test_imports_point_down_the_house():
    wrong = []
    for module, targets in _graph().items():
        room = _room(module)
        allowed = ALLOWED[room] | (CLI_MAY_ALSO if module == CLI else set())
        wrong += [f"{module} -> {t}" for t in sorted(targets) if _room(t) != room and _room(t) not in allowed]
    assert not wrong, "imports against the order of the house:\n" + "\n".join(wrong)


def test_nothing_imports_the_cli():
    importers = [m for m, targets in _graph().items() if CLI in targets]
    assert not importers


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if target == module or (target in graph and module.startswith(target + ".")):
                continue  # a package's own submodule, or a module naming its own package
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if not state.get(target):
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module)


def test_the_walk_catches_a_wrong_arrow(tmp_path):
    """The checker itself: a model module importing the runtime is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ..runtime import plan\nimport dsv4c.compiler.cli\n")
    found = _imports(bad, "dsv4c.model.bad")
    assert {"dsv4c.runtime", "dsv4c.runtime.plan", "dsv4c.compiler.cli"} <= found
