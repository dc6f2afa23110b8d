"""Device kernels for the low-bit ops, registered into :mod:`quantvggt.lowbit.registry` on import.

``QuantLinear`` asks the registry for its device's ``qlinear`` forward; a kernel may return ``None`` for a
layer it does not support, and the plain-torch path runs instead. Set ``QUANTVGGT_QLINEAR_BACKEND=fake`` (or
``int``) to force a reference path. Every kernel has a plain-torch reference in :mod:`.reference`.

``qlinear_levels`` (``fn(layer, None) -> int8 [N, K]``): the integer weights of a layer whose packed ``qweight`` the
device's kernel freed because it holds them in its own format (CPU speed mode).

``attention_int8`` (``fn(q, k, v) -> out``, ``[B, H, N, D]``) is INT8 Q·K^T attention: the Triton kernel on CUDA
(:mod:`.triton_attention`), the plain-torch reference :func:`quantvggt.lowbit.attention.int8_attention_ref` on CPU,
so both devices quantize alike. ``None`` from a kernel means "not supported here": the caller runs the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantvggt.lowbit.registry import register_kernel

if TYPE_CHECKING:  # registration must stay free of torch so that `import quantvggt` is cheap
    from torch import Tensor, nn


def _cuda(layer: nn.Module, x: Tensor) -> Tensor | None:
    try:
        from quantvggt.kernels.triton_w4a4 import qlinear_forward
    except ImportError:  # triton missing: torch path
        return None
    return qlinear_forward(layer, x)


def _cpu(layer: nn.Module, x: Tensor) -> Tensor | None:
    from quantvggt.kernels.cpu import qlinear_forward

    return qlinear_forward(layer, x)


def _cpu_levels(layer: nn.Module, _: object) -> Tensor:
    from quantvggt.kernels.cpu import held_levels

    return held_levels(layer)


register_kernel("qlinear", "cuda", _cuda)
register_kernel("qlinear", "cpu", _cpu)
register_kernel("qlinear_levels", "cpu", _cpu_levels)  # weights held in the GEMM's format (speed mode)


def _attention_cuda(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    try:
        from quantvggt.kernels.triton_attention import attention_forward
    except ImportError:  # triton missing: the caller runs the torch reference
        return None
    return attention_forward(q, k, v)


def _attention_cpu(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from quantvggt.lowbit.attention import int8_attention_ref

    return int8_attention_ref(q, k, v)


register_kernel("attention_int8", "cuda", _attention_cuda)
register_kernel("attention_int8", "cpu", _attention_cpu)


def _apply_options(model: Any, options: Any) -> Any:
    from quantvggt.kernels.options import apply_kernel_options

    return apply_kernel_options(model, options)


register_kernel("apply_options", "any", _apply_options)  # loaders (quant/) apply KernelOptions through the registry
