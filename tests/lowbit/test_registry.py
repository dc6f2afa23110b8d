"""The kernel registry's environment names match what the kernels read, and travel to workers."""

from __future__ import annotations

import pytest

from quantvggt.kernels import cpu, cpu_native
from quantvggt.lowbit import registry


def test_kernel_env_names_are_the_kernels_own() -> None:
    names = {registry.QLINEAR_BACKEND_ENV, cpu.MODE_ENV, cpu_native.NATIVE_ENV}
    try:
        from quantvggt.kernels import triton_w4a4

        names.add(triton_w4a4.PATH_ENV)
    except ImportError:  # no triton here: the name is still listed for workers that have it
        names.add("QUANTVGGT_TRITON_QLINEAR")
    assert set(registry.KERNEL_ENV_NAMES) == names


def test_kernel_env_passes_only_what_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in registry.KERNEL_ENV_NAMES:
        monkeypatch.delenv(k, raising=False)
    assert registry.kernel_env() == {}
    monkeypatch.setenv(cpu.MODE_ENV, "memory")
    monkeypatch.setenv("QUANTVGGT_STORE", "/elsewhere")  # a path, not a kernel selection: stays home
    assert registry.kernel_env() == {cpu.MODE_ENV: "memory"}
