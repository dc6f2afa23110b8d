"""The house's floors: every import points down (no two rooms import each other, directly or around a circle);
lowbit/ at the bottom; quant/ and kernels/ above it and never importing each other; the CLI floor on top."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "quantvggt"


def _imports(folder: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in sorted((PKG / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}
        out[str(f.relative_to(PKG.parent))] = {n for n in names if n.startswith("quantvggt")}
    return out


def _offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{f} imports {n}" for f, ns in _imports(folder).items() for n in sorted(ns) if n.startswith(forbidden)]


def test_lowbit_imports_nothing_above_it() -> None:
    assert _offenders("lowbit", ("quantvggt.quant", "quantvggt.kernels", "quantvggt.model")) == []


def test_kernels_never_import_quant() -> None:
    assert _offenders("kernels", ("quantvggt.quant",)) == []


def test_quant_never_imports_kernels() -> None:
    assert _offenders("quant", ("quantvggt.kernels",)) == []


def test_library_never_imports_orchestration() -> None:
    bad = []
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            bad += [f"{f.name}: {m}" for m in mods if m.split(".")[0] in ("prefect", "ray", "flows", "workers")]
    assert bad == []


def test_kernels_fill_the_registry() -> None:
    import quantvggt  # noqa: F401  (the package root wires kernels into the registry)
    from quantvggt.lowbit.registry import registered

    assert {("qlinear", "cpu"), ("qlinear", "cuda")} <= set(registered())


def test_importing_the_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, quantvggt; assert 'torch' not in sys.modules, 'torch imported by quantvggt/__init__'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


REPO = PKG.parent
PACKAGES = ("quantvggt", "flows", "workers")


def _room(module: str) -> str:
    """A folder of the package is one room (``quantvggt.quant.load`` -> ``quantvggt.quant``); a top module its own."""
    parts = module.split(".")
    if parts[0] != "quantvggt":
        return parts[0]  # flows, workers: one room each
    if len(parts) > 1 and (PKG / parts[1]).is_dir():
        return ".".join(parts[:2])
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def _room_graph() -> dict[str, set[str]]:
    """room -> rooms it imports (function-level imports included: a lazy import is still an arrow)."""
    graph: dict[str, set[str]] = {}
    for top in PACKAGES:
        for f in sorted((REPO / top).rglob("*.py")):
            rel = f.relative_to(REPO).with_suffix("")
            module = ".".join(p for p in rel.parts if p != "__init__")
            room = _room(module)
            for node in ast.walk(ast.parse(f.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for n in names:
                    if n.split(".")[0] in PACKAGES and _room(n) != room:
                        graph.setdefault(room, set()).add(_room(n))
            graph.setdefault(room, set())
    return graph


def test_every_import_points_down() -> None:
    graph = _room_graph()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(room: str, path: list[str]) -> None:
        state[room] = 1
        for nxt in sorted(graph.get(room, ())):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt] if nxt in path else [room, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[room] = 2

    for room in sorted(graph):
        if room not in state:
            visit(room, [room])
    assert circles == [], "imports running back up: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_cli_floor_is_on_top() -> None:
    graph = _room_graph()
    below = [r for r, deps in graph.items() if "quantvggt.commands" in deps and r not in ("quantvggt.cli",)]
    assert below == []  # commands are loaded by name from quantvggt.cli only
    assert not any(r.startswith("quantvggt") and deps & {"flows", "workers"} for r, deps in graph.items())
