"""The simulator's modules import one way (no cycle, not even one only seen by
the type checker), the scenario language imports nothing of the simulator, and
the simulator never imports the trio shell."""

from __future__ import annotations

import ast
from pathlib import Path

import peerd.sim

SIM = Path(peerd.sim.__file__).parent


def _module(path: Path) -> str:
    rel = path.relative_to(SIM.parent.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(SIM.rglob("*.py")):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[_module(path)] = deps
    return graph


def test_no_import_cycle_in_sim() -> None:
    graph = _imports()
    mods = set(graph)
    edges = {m: sorted(d for d in deps if d in mods and d != m) for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in edges[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, m, d]))
            if d not in state:
                visit(d, [*stack, m])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [])


def test_scenario_imports_nothing_of_the_sim_and_sim_no_shell() -> None:
    graph = _imports()
    assert not [d for d in graph["peerd.sim.spec"] if d.startswith("peerd.sim")]
    scenario = graph["peerd.sim.scenario"]
    assert not [d for d in scenario if d.startswith("peerd.sim") and "spec" not in d]
    for m, deps in graph.items():
        assert not [d for d in deps if d.startswith("peerd.shell")], m
