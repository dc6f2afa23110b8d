"""Fixtures shared by the reliability tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``quantvggt ARGS`` in this process (library commands only) -> (exit code, stdout, stderr)."""
    from quantvggt import cli

    monkeypatch.setattr(cli, "plugin_commands", lambda taken=(): [])

    def run(*argv: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run
