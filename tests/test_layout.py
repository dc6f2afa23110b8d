"""The house's floors: lowbit/ at the bottom; quant/ and kernels/ above it and never importing each other."""

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
