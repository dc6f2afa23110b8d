"""A reconstruction's workspace: one writer per format behind one signature.

A writer is ``write(result, folder, options, sources) -> dict`` (what it wrote, for report.json) with ``enabled(options)
-> bool``, registered by name with :func:`register_writer`; :func:`write_workspace` runs every enabled writer in
registration order. The built-in writers: COLMAP sparse model (binary, text on request), PLY point cloud, COLMAP
database, the images/ folder, and nerfstudio's ``transforms.json`` (``formats=["nerfstudio"]``). A new format is one
module here: a function and one ``register_writer`` call (enabled by naming it in ``ExportOptions.formats``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantvggt.colmap import ColmapResult, export_options
from quantvggt.options import ExportOptions

WriteFn = Callable[[ColmapResult, Path, ExportOptions, "list[Path] | None"], "dict[str, Any]"]


@dataclass(frozen=True)
class Writer:
    """One export format: its name, when it runs, and how it writes into the workspace folder."""

    name: str
    write: WriteFn
    enabled: Callable[[ExportOptions], bool]


_WRITERS: dict[str, Writer] = {}


def register_writer(name: str, write: WriteFn, enabled: Callable[[ExportOptions], bool] | None = None) -> None:
    """Register a format; by default it runs when ``name`` is in ``ExportOptions.formats``."""
    _WRITERS[name] = Writer(name, write, enabled or (lambda o: name in o.formats))


def writers() -> list[str]:
    """Names of the registered formats, in the order they are written."""
    return list(_WRITERS)


def check_formats(formats: list[str]) -> None:
    """Refuse (``ValueError``, one line) format names no writer is registered for: before any work is done."""
    unknown = [f for f in formats if f not in _WRITERS]
    if unknown:
        raise ValueError(f"unknown export format(s) {', '.join(unknown)} (known: {', '.join(_WRITERS)})")


def write_workspace(
    result: ColmapResult, folder: str | Path, options: Any = None, sources: list[Path] | None = None
) -> dict[str, Any]:
    """Run every enabled writer into ``folder``; returns what was written, for report.json.

    ``sources`` are the scene's image files in the model's image order (for images/); None when unknown.
    """
    opts = export_options(options if options is not None else ExportOptions())
    check_formats(opts.formats)
    folder = Path(folder)
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    for w in _WRITERS.values():
        if w.enabled(opts):
            out.update(w.write(result, folder, opts, sources))
    out["seconds"] = round(time.perf_counter() - t0, 4)
    return out


# the built-in formats, in the order they are written (nerfstudio after images/, which its frames name)
from quantvggt.export import colmap_model, database, images, nerfstudio, ply  # noqa: E402, F401
