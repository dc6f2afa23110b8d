"""Low-bit kernels, registered per device type. ``QuantLinear`` asks :func:`dispatch` for the device's forward;
a kernel may return ``None`` for a layer it does not support, and the plain-torch path runs instead.
Set ``QUANTVGGT_QLINEAR_BACKEND=fake`` (or ``int``) to force a reference path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from torch import Tensor, nn

KernelFn = Callable[[nn.Module, Tensor], Tensor | None]
_REGISTRY: dict[str, KernelFn] = {}


def register(device_type: str, fn: KernelFn) -> None:
    """Register a QuantLinear forward implementation for a device type ("cuda", "cpu")."""
    _REGISTRY[device_type] = fn


def _cuda(layer: nn.Module, x: Tensor) -> Tensor | None:
    try:
        from quantvggt.kernels.triton_w4a4 import qlinear_forward
    except ImportError:  # triton missing: torch path
        return None
    return qlinear_forward(layer, x)


def _cpu(layer: nn.Module, x: Tensor) -> Tensor | None:
    from quantvggt.kernels.cpu import qlinear_forward

    return qlinear_forward(layer, x)


register("cuda", _cuda)
register("cpu", _cpu)


def dispatch(layer: nn.Module, x: Tensor) -> KernelFn | None:
    """The registered kernel for ``x``'s device, or ``None``."""
    return _REGISTRY.get(x.device.type)
