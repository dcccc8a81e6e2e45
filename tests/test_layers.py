"""Layers import downward only (docs/DESIGN.md, "Layers" and "One Peer").

The import graph is read from the source (the AST), not from a running
interpreter: every module-level import counts, those under ``if TYPE_CHECKING``
too (a cycle there is still a cycle in the design), while imports inside a
function body do not (they run late and are the usual way to hide a cycle, which
this test therefore cannot see: keep them out of the checked packages).
The whole of peerd has no cycle; the sans-I/O layers (core, wire) also never
reach up to the runtimes.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("peerd.core", "peerd.wire")
# What the sans-I/O layers must never import.
FORBIDDEN = ("peerd.shell", "peerd.sim", "peerd.api", "peerd.cli", "trio")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(packages: tuple[str, ...] = CHECKED) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((ROOT / pkg.replace(".", "/")).rglob("*.py")):
            out[module_name(path)] = path
    return out


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run at import: the body, and the branches of if/try at module level."""
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If):
            out += _module_level(node.body) + _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _module_level(node.body) + _module_level(node.orelse)
            out += _module_level(node.finalbody)
            for h in node.handlers:
                out += _module_level(h.body)
    return out


def imports_of(name: str, path: Path, everywhere: bool = False) -> set[str]:
    """Absolute names of the modules ``name`` imports at module level (with
    ``everywhere``: inside functions too)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    nodes = list(ast.walk(tree)) if everywhere else _module_level(tree.body)
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            # `from pkg import sub` imports the submodule pkg.sub if there is one
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def graph(packages: tuple[str, ...] = CHECKED, everywhere: bool = False) -> dict[str, set[str]]:
    mods = modules(packages)
    g: dict[str, set[str]] = {}
    for name, path in mods.items():
        g[name] = {m for m in imports_of(name, path, everywhere) if m in mods and m != name}
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``g`` as a path a -> ... -> a, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(g, WHITE)
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = GREY
        stack.append(n)
        for m in sorted(g[n]):
            if color[m] == GREY:
                return stack[stack.index(m) :] + [m]
            if color[m] == WHITE:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(g):
        if color[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None


def test_the_graph_is_read() -> None:
    g = graph()
    assert "peerd.core.peer" in g
    assert "peerd.core.swim.membership" in g["peerd.core.peer"]
    assert "peerd.core.swim.members" in g["peerd.core.swim.base"]
    assert "peerd.wire.codec" in g["peerd.core.swim.base"]


def test_no_import_cycles_in_core_and_wire() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_no_import_cycles_anywhere_in_peerd() -> None:
    # Imports inside functions count here too: a late import hides a cycle
    # from the interpreter, not from the design.
    g = graph(("peerd",), everywhere=True)
    assert "peerd.shell.runner" in g and "peerd.sim.world" in g and "peerd.cli" in g
    cycle = find_cycle(g)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_sans_io_layers_import_no_shell_sim_api_or_trio() -> None:
    bad = []
    for name, path in modules().items():
        for imported in sorted(imports_of(name, path)):
            if any(imported == f or imported.startswith(f + ".") for f in FORBIDDEN):
                bad.append(f"{name} imports {imported}")
    assert not bad, bad


def test_type_checking_imports_count(tmp_path: Path) -> None:
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from peerd.sim import world\n"
    f = tmp_path / "m.py"
    f.write_text(src)
    assert "peerd.sim.world" in imports_of("peerd.core.m", f)
