"""Fast low-bit kernels, registered per device; ``dispatch`` returns ``None`` to use the plain-torch path."""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

KernelFn = Callable[[nn.Module, Tensor], Tensor]
_REGISTRY: dict[str, KernelFn] = {}


def register(device_type: str, fn: KernelFn) -> None:
    """Register a QuantLinear forward implementation for a device type ("cuda", "cpu")."""
    _REGISTRY[device_type] = fn


def dispatch(layer: nn.Module, x: Tensor) -> Optional[KernelFn]:
    """The registered kernel for ``x``'s device, or ``None``."""
    return _REGISTRY.get(x.device.type)
