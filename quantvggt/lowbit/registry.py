"""Kernel registry: device implementations of quantized ops register here; quantized modules look them up.

``quantvggt.kernels`` fills it when the package is imported (``quantvggt/__init__.py`` imports it), so
``quant/`` never imports ``kernels/`` and ``kernels/`` never imports ``quant/``. A kernel may return ``None``
for a layer it does not support; the caller then runs its plain-torch path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing torch here would make `import quantvggt` (and `quantvggt --help`) pay for it
    from torch import Tensor, nn

KernelFn = Callable[["nn.Module", "Tensor"], Any]
# which QuantLinear path runs ("auto": the registered kernel; "int"/"fake": torch paths); read by quant and kernels
QLINEAR_BACKEND_ENV = "QUANTVGGT_QLINEAR_BACKEND"
CPU_MODE_ENV = "QUANTVGGT_CPU_MODE"  # kernels.cpu: "speed" / "memory"
CPU_NATIVE_ENV = "QUANTVGGT_CPU_NATIVE"  # kernels.cpu_native: "0" turns the compiled C kernels off
TRITON_QLINEAR_ENV = "QUANTVGGT_TRITON_QLINEAR"  # kernels.triton_w4a4: "fused" / "split"
# every environment variable that selects a kernel path: what workers in other processes must also see
KERNEL_ENV_NAMES = (QLINEAR_BACKEND_ENV, CPU_MODE_ENV, CPU_NATIVE_ENV, TRITON_QLINEAR_ENV)
# Per-layer state a kernel keeps on a module (prepacked weights, constants): a plain attribute, never a buffer, so
# it is not saved, copied or moved with the module. A kernel that frees the layer's packed ``qweight`` buffer (CPU speed
# mode holds the weights in its GEMM's format only) records its device type under "holder" and registers
# "qlinear_levels" for that device, which returns the integer levels ``[N, K]`` from what it holds.
KERNEL_STATE_ATTR = "_qv_kernel_state"
_KERNELS: dict[tuple[str, str], KernelFn] = {}


def kernel_env() -> dict[str, str]:
    """The kernel selections set in this process's environment, for workers in other processes (Ray runtime_env)."""
    import os

    return {k: os.environ[k] for k in KERNEL_ENV_NAMES if k in os.environ}


def register_kernel(op: str, device_type: str, fn: KernelFn) -> None:
    """Register ``fn`` as the implementation of ``op`` (e.g. ``"qlinear"``) on ``device_type`` ("cpu", "cuda")."""
    _KERNELS[(op, device_type)] = fn


def get_kernel(op: str, device_type: str) -> KernelFn | None:
    """The registered implementation of ``op`` for ``device_type``, or ``None``."""
    return _KERNELS.get((op, device_type))


def registered() -> list[tuple[str, str]]:
    """All registered (op, device type) pairs."""
    return sorted(_KERNELS)
