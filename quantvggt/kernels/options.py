"""Apply a :class:`~quantvggt.lowbit.registry.KernelOptions` to a loaded model: float dtype, prepacking, compile.

One call for every loader and worker (the options object travels to Ray actors as ``options.to_dict()``)::

    model = apply_kernel_options(model, KernelOptions(float_dtype="auto", compile=False))

On CPU: sets the process's kernel options (the CPU kernels read them per call), casts everything that is not a
quantized GEMM to the resolved float dtype (bf16 on CPUs with AMX-BF16/AVX512-BF16 for ``"auto"``; quantized
layers keep their fp32 scales), prepacks every quantized linear for the chosen GEMM (speed mode), and optionally
compiles (CPU Inductor with freezing). Compile time is paid on the first forward; pass ``example`` to pay it here,
logged at INFO.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor, nn

from quantvggt.kernels import cpu, cpu_info
from quantvggt.lowbit.registry import KernelOptions, kernel_options, set_kernel_options

log = logging.getLogger(__name__)


def resolve_float_dtype(options: KernelOptions, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of the non-quantized ops: ``"auto"`` is bf16 on a CPU with native bf16 (else fp32, and CUDA fp32)."""
    if options.float_dtype == "bf16":
        return torch.bfloat16
    if options.float_dtype == "fp32" or torch.device(device).type != "cpu":
        return torch.float32
    return torch.bfloat16 if cpu_info.has_fast_bf16() else torch.float32


def _device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def compile_model(model: nn.Module, example: Tensor | None = None) -> float | None:
    """``torch.compile`` ``model`` in place (Inductor, freezing on CPU); with ``example``, compile now: seconds."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights become constants: folded and prepacked by Inductor (inference only)
    if hasattr(model, "compile_"):
        model.compile_()
    else:
        model.compile()
    if example is None:
        log.info("torch.compile (inductor, freezing): compiles on the first forward")
        return None
    t0 = time.perf_counter()
    with torch.no_grad():
        model(example)
    seconds = time.perf_counter() - t0
    log.info("torch.compile (inductor, freezing): first forward incl. compilation %.1f s", seconds)
    return seconds


def apply_kernel_options(
    model: nn.Module, options: KernelOptions | dict[str, Any] | None = None, example: Tensor | None = None
) -> nn.Module:
    """Make ``options`` this process's kernel options and prepare ``model`` for them (in place); returns ``model``."""
    if options is not None:
        set_kernel_options(KernelOptions.from_dict(options))
    opts = kernel_options()  # with the environment overrides
    device = _device(model)
    if device.type == "cpu":
        dtype = resolve_float_dtype(opts, device)
        model.to(dtype)  # quantized layers keep their fp32 scales (QuantLinear/QuantConv2d._apply)
        held = cpu.prepare(model) if opts.qlinear_backend == "auto" and cpu.cpu_mode() == "speed" else 0
        log.info(
            "CPU kernels: float dtype %s, GEMM %s, mode %s, %.0f MB of weights prepacked (%s)",
            str(dtype).removeprefix("torch."),
            cpu.gemm_backend(),
            cpu.cpu_mode(),
            held / 1e6,
            cpu_info.flags_line(),
        )
    if opts.compile:
        compile_model(model, example)
    return model
