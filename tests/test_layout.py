"""The package layout holds: no import cycle, no import from a higher layer, no sideways import
between the source, destination and snapshot sides, and no module over 450 lines.

The layers are docs/architecture.md's table; this test reads every ``import`` of ``engine/``
(static, with ``ast``, including the ones inside functions) and checks each edge against it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parent.parent / "engine"

#: unit -> layer (a unit is a top-level module or a subpackage); a unit imports only from lower
#: layers, or from itself.
LAYERS = {
    "errors": 1,
    "wire": 2,
    "compression": 3,
    "stats": 3,
    "runtime": 4,
    "memory": 5,
    "params": 5,
    "precopy": 6,
    "source": 7,
    "destination": 7,
    "snapshot": 7,
    "cli": 8,
    "__main__": 9,
    "__init__": 9,
}
MAX_LINES = 450


def _unit(module: str) -> str:
    """``engine.wire.packet`` -> ``wire``; ``engine`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_of(path: Path) -> str:
    rel = path.relative_to(ENGINE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
        if len(parts) == 1:
            return "engine"
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The engine modules ``path`` imports (absolute dotted names)."""
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] == "engine":
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "engine")
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_of(p): _imports(p) for p in sorted(ENGINE.rglob("*.py"))}


def test_every_unit_has_a_layer() -> None:
    units = {_unit(m) for m in _graph()}
    assert units <= set(LAYERS), f"units without a layer: {sorted(units - set(LAYERS))}"


def test_no_upward_or_sideways_import() -> None:
    bad = []
    for module, targets in _graph().items():
        src = _unit(module)
        for target in targets:
            dst = _unit(target)
            if dst != src and LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{module} -> {target} (layer {LAYERS[src]} -> {LAYERS[dst]})")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_module_over_the_limit() -> None:
    long = {str(p.relative_to(ENGINE.parent)): n for p in ENGINE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
