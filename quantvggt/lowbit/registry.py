"""Kernel registry: device implementations of quantized ops register here; quantized modules look them up.

``quantvggt.kernels`` fills it when the package is imported (``quantvggt/__init__.py`` imports it), so
``quant/`` never imports ``kernels/`` and ``kernels/`` never imports ``quant/``. A kernel may return ``None``
for a layer it does not support; the caller then runs its plain-torch path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
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


# -- typed kernel choice ------------------------------------------------------------------------------------------
_CHOICES: dict[str, tuple[Any, ...]] = {
    "qlinear_backend": ("auto", "int", "fake"),
    "cpu_gemm": ("auto", "onednn", "int_mm"),
    "cpu_mode": ("speed", "memory"),
    "float_dtype": ("auto", "fp32", "bf16"),
    "triton_qlinear": ("fused", "split"),
}


@dataclass(frozen=True)
class KernelOptions:
    """Which kernels run a model, carried by loaders and workers (JSON-safe via :meth:`to_dict`/:meth:`from_dict`).

    * ``qlinear_backend``: "auto" (the device's kernel), or the torch reference paths "int" (exact levels) / "fake";
    * ``cpu_gemm``: "auto" picks per CPU when a model is prepared: "onednn" (prepacked int8 GEMM, AMX CPUs),
      else "int_mm" (``torch._int_mm`` / fbgemm, the portable path);
    * ``cpu_mode``: "speed" (weights held in the GEMM's format, 1 byte/weight) or "memory" (int4 unpacked per call);
    * ``float_dtype``: dtype of everything that is not a quantized GEMM on CPU: "auto" = bf16 where the CPU has
      AMX-BF16 or AVX512-BF16, else fp32;
    * ``compile``: ``torch.compile`` (CPU Inductor with freezing) when the options are applied;
    * ``cpu_native``: the compiled C kernels of :mod:`quantvggt.kernels.cpu_native` (False: plain torch);
    * ``triton_qlinear``: the CUDA W4A4 path, "fused" or "split".

    The environment variables of :data:`KERNEL_ENV_NAMES` still override the matching fields (backward compatible).
    """

    qlinear_backend: str = "auto"
    cpu_gemm: str = "auto"
    cpu_mode: str = "speed"
    float_dtype: str = "auto"
    compile: bool = False
    cpu_native: bool = True
    triton_qlinear: str = "fused"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _CHOICES:
                if v not in _CHOICES[f.name]:
                    raise ValueError(f"KernelOptions.{f.name} must be one of {_CHOICES[f.name]}, got {v!r}")
            elif not isinstance(v, bool):
                raise ValueError(f"KernelOptions.{f.name} must be a bool, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> KernelOptions:
        """Parse ``d`` (missing fields take their defaults); unknown or invalid fields raise ``ValueError``."""
        if isinstance(d, KernelOptions):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"KernelOptions: expected an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"KernelOptions: unknown fields {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> KernelOptions:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)


# environment variable -> (field, parser); a value the parser rejects raises ValueError naming the variable
_ENV_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    QLINEAR_BACKEND_ENV: ("qlinear_backend", str),
    CPU_MODE_ENV: ("cpu_mode", str),
    CPU_NATIVE_ENV: ("cpu_native", lambda v: v != "0"),
    TRITON_QLINEAR_ENV: ("triton_qlinear", str),
}
_OPTIONS = KernelOptions()
_EFFECTIVE: tuple[tuple[Any, ...], KernelOptions] | None = None


def set_kernel_options(options: KernelOptions | dict[str, Any] | None) -> KernelOptions:
    """Set this process's kernel options (``None``: the defaults); returns the previous ones."""
    global _OPTIONS, _EFFECTIVE
    prev = _OPTIONS
    _OPTIONS = KernelOptions() if options is None else KernelOptions.from_dict(options)
    _EFFECTIVE = None
    return prev


def kernel_options() -> KernelOptions:
    """This process's kernel options with the environment overrides of :data:`KERNEL_ENV_NAMES` applied."""
    global _EFFECTIVE
    env = tuple(os.environ.get(k) for k in _ENV_FIELDS)
    cached = _EFFECTIVE
    if cached is not None and cached[0] == (_OPTIONS, env):
        return cached[1]
    changes = {field: parse(v) for (field, parse), v in zip(_ENV_FIELDS.values(), env, strict=True) if v}
    try:
        opts = _OPTIONS.replace(**changes) if changes else _OPTIONS
    except ValueError as e:
        names = sorted(k for k in _ENV_FIELDS if os.environ.get(k))
        raise ValueError(f"kernel environment variables {names}: {e}") from e
    _EFFECTIVE = ((_OPTIONS, env), opts)
    return opts
