"""The CPU path for QuantLinear: exact integer GEMM on our levels, int4 weights packed at rest.

Per call (``x [M, K]``, fp32 or bf16):
    levels, s = act_quant(x)          # sign flip + Hadamard + pre-scale + per-token quantize -> int8, one fused pass
    acc = int_gemm(levels)            # exact integer sums (see the GEMM backends below)
    y = (acc * s) * w_scale + bias    # same fp32 op order as QuantLinear.forward_int; written in x's dtype
``act_quant`` and the epilogue are the small C kernels of :mod:`.cpu_native` (compiled on first use); without a C
compiler the same math runs as torch ops (slower; same levels up to float summation order in the rotation).

Two GEMM backends (``KernelOptions.cpu_gemm``; "auto" picks per CPU, see :func:`gemm_backend`):

* ``onednn`` (auto on CPUs with AMX-INT8): oneDNN's int8 GEMM on weights prepacked once per layer
  (``torch.ops.onednn.qlinear_prepack`` at load, ``qlinear_pointwise`` per call) at unit scales, so its fp32 output
  is the exact integer sum; the quantize and epilogue passes are split over the threads like the GEMM. 2.5x
  ``_int_mm`` at 1044 x 1024 -> 3072 on an AMX Xeon (``_int_mm`` reorders the weights on every call).
* ``int_mm`` (the portable path): ``torch._int_mm`` on int8 ``[K, N]``, or fbgemm below SMALL_M tokens.

Two modes for the weights, chosen by :data:`mode` or the environment variable ``QUANTVGGT_CPU_MODE``:

* ``speed`` (default): each layer converts its weights once, on its first call (or :func:`prepare`), into the
  GEMM's format: int8 ``[K, N]`` for ``_int_mm``, or fbgemm's packing for layers called with fewer than
  :data:`SMALL_M` tokens (where ``_int_mm``'s per-call weight reorder dominates). That copy is the only one kept:
  the packed int4 ``qweight`` buffer is freed (set to None), so RAM holds 1 byte/weight, 4x under fp32, like
  ``torch.ao``'s int8 dynamic quantization. The checkpoint format is unchanged: :class:`QuantLinear` rebuilds int4
  from the held copy (:func:`held_levels`) when it is saved, copied, pickled or moved to another device, and a new
  ``qweight`` (``set_weight``, ``load_state_dict``, assignment) replaces the held copy. A layer whose call size
  crosses :data:`SMALL_M` later converts its one copy to the other format.
* ``memory``: nothing cached; int4 is unpacked to int8 per call by a vectorised kernel (about 0.1-0.4 ms for a
  4096 x 1024 layer) and fed to ``_int_mm``, which needs no prepacking. RAM stays at 0.5 byte/weight.

Exactness: on AVX2 without VNNI the u8 x s8 pair sums of both GEMMs saturate at int16 for 8-bit weights
(255 * 127 * 2 > 32767), while 4- and 6-bit weights are safe (255 * 32 * 2 < 32767). Rather than trusting the ISA,
each (weight width, GEMM) pair is checked once per process on worst-case operands (:func:`int_gemm_exact`); a width
that fails on ``_int_mm`` runs as float GEMM on dequantized weights, as do 16-bit activations (W4A16).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantvggt.kernels import cpu_info, cpu_native
from quantvggt.lowbit import quantizer as qz
from quantvggt.lowbit.hadamard import hadamard_transform
from quantvggt.lowbit.registry import CPU_MODE_ENV, KERNEL_STATE_ATTR, kernel_options

log = logging.getLogger(__name__)

MODE_ENV = CPU_MODE_ENV
_CONVERT_LOCK = threading.Lock()
MODES = ("speed", "memory")
mode: str | None = None  # set to "speed" / "memory" to override QUANTVGGT_CPU_MODE in this process
_STATE_ATTR = KERNEL_STATE_ATTR  # {"act": constants, "weight": _Held, "holder": "cpu"}: a plain attribute
SMALL_M = 128  # below this many tokens per call, fbgemm on prepacked weights beats _int_mm (measured, see module doc)
GEMMS = ("onednn", "int_mm")
gemm: str | None = None  # set to "onednn" / "int_mm" to override KernelOptions.cpu_gemm in this process
# elements per extra thread of the native quantize/epilogue passes next to the (multi-threaded) oneDNN GEMM: at
# 1044 x 1024 each pass then runs on 2 threads (the default bar of cpu_native keeps them on one)
ONEDNN_MIN_PER_THREAD = 1 << 17


def cpu_mode() -> str:
    """The active weight mode: :data:`mode` if set, else ``KernelOptions.cpu_mode`` (``$QUANTVGGT_CPU_MODE`` wins)."""
    m = mode or os.environ.get(MODE_ENV) or kernel_options().cpu_mode
    if m not in MODES:
        raise ValueError(f"unknown CPU mode {m!r}; choose from {MODES}")
    return m


def onednn_available() -> bool:
    """oneDNN's prepacked int8 linear ops are in this torch build."""
    return hasattr(torch.ops.onednn, "qlinear_prepack") and hasattr(torch.ops.onednn, "qlinear_pointwise")


def gemm_backend() -> str:
    """The integer GEMM of this process: :data:`gemm` if set, else ``KernelOptions.cpu_gemm``, "auto" resolved.

    "auto" is "onednn" on CPUs with AMX-INT8 where oneDNN's ops exist, else "int_mm" (as fast on VNNI without AMX).
    Memory mode always runs "int_mm" (it has no prepacked weights to hand to oneDNN).
    """
    g = gemm or kernel_options().cpu_gemm
    if g == "auto":
        # without AMX, oneDNN's int8 GEMM is no faster than _int_mm (7.7 vs 7.6 ms at 1044 x 1024 -> 3072 on an
        # AVX512-VNNI Zen 4), and its signed-activation path there is a reference loop (34 s for the same layer)
        g = "onednn" if cpu_info.has_amx_int8() and onednn_available() else "int_mm"
    if g not in GEMMS:
        raise ValueError(f"unknown CPU GEMM {g!r}; choose from {GEMMS}")
    return "int_mm" if cpu_mode() == "memory" else g


# -- activations -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_kron(x: Tensor, normalize: bool = True) -> Tensor:
    """Hadamard of the last dim (power of two) as ``H_a^T X H_b`` with ``K = a*b`` (two small matmuls)."""
    K = x.shape[-1]
    a = 1 << (int(math.log2(K)) // 2)
    b = K // a
    Ha, Hb = _sylvester(a).to(x), _sylvester(b).to(x)
    y = torch.matmul(Ha.T, x.reshape(-1, a, b))  # [M, a, b]
    y = torch.matmul(y, Hb).reshape(x.shape)
    return y.mul_(1.0 / math.sqrt(K)) if normalize else y


def _pow2_rotation(layer: nn.Module) -> bool:
    K = layer.in_features
    return bool(layer.rotate) and K & (K - 1) == 0


def act_levels(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Plain-torch rotate + pre-scale + quantize of ``x [M, K]`` -> (float levels, scale ``[M, 1]``), or (h, None)."""
    K = layer.in_features
    h = x.float()
    if _pow2_rotation(layer):
        # fewer passes over memory: unnormalised transform, 1/sqrt(K) folded into the pre-scale, in-place ops
        h = hadamard_kron(h * layer.signs.to(h.dtype), normalize=False).mul_(layer.act_scale * (1.0 / math.sqrt(K)))
    elif layer.rotate:
        h = hadamard_transform(h * layer.signs.to(h.dtype), layer.plan) * layer.act_scale
    else:
        h = h * layer.act_scale
    if layer.a_bits >= 16:
        return h, None
    amax = h.abs().amax(dim=-1, keepdim=True)  # 10x faster here than vector_norm(ord=inf)
    scale = qz.symmetric_scale(amax * layer.act_clip, layer.a_bits)
    q = qz.qmax(layer.a_bits)
    return h.div_(scale).round_().clamp_(-q - 1, q), scale


def act_quant(layer: nn.Module, x: Tensor, min_per_thread: int | None = None) -> tuple[Tensor, Tensor]:
    """``x [M, K]`` -> (int8 levels ``[M, K]``, fp32 per-token scale ``[M, 1]``), fused native kernel when available."""
    K = layer.in_features
    if cpu_native.lib() is None:
        levels, s = act_levels(layer, x)
        assert s is not None
        return levels.to(torch.int8), s
    h = x if x.dtype == torch.bfloat16 else x.float()  # the native kernel widens bf16 rows itself
    if h.stride(-1) != 1:
        h = h.contiguous()
    fused = _pow2_rotation(layer) and K >= 16

    def constants() -> tuple[Tensor, Tensor, float]:
        # per-call these small conversions cost ~25 us, a tenth of a 4-token camera-head call
        prescale = layer.act_scale * (1.0 / math.sqrt(K)) if fused else layer.act_scale.float()
        return layer.signs.to(torch.float32).contiguous(), prescale.contiguous(), float(layer.act_clip)

    signs, prescale, clip = _cached(layer, "act", constants, (layer.signs, layer.act_scale, layer.act_clip))
    if fused:
        return cpu_native.act_quant(h, signs, prescale, clip, layer.a_bits, fwht=True, min_per_thread=min_per_thread)
    if layer.rotate:  # Paley / block-diagonal widths: torch rotation, then the fused quantize
        h = hadamard_transform(h.float() * signs, layer.plan)
    return cpu_native.act_quant(h, None, prescale, clip, layer.a_bits, fwht=False, min_per_thread=min_per_thread)


# -- weights -----------------------------------------------------------------------------------------------------
@dataclass
class _Held:
    """A layer's weights in one GEMM format, held instead of its packed ``qweight`` (speed mode)."""

    fmt: str  # "int8": [K, N] for _int_mm; "fbgemm": its packed params; "onednn": (prepacked, ones, zeros)
    operand: Any
    nbytes: int
    source: Any  # weakref to the qweight it was built from: a different buffer put in later makes this stale


def _held(layer: nn.Module) -> _Held | None:
    h = layer.__dict__.get(_STATE_ATTR, {}).get("weight")
    q = layer.qweight
    if h is not None and q is not None and h.source() is not q:  # a new buffer was put in since: h is stale
        return None
    return h


def held_levels(layer: nn.Module) -> Tensor:
    """Integer levels ``[N, K]`` int8 of a layer whose weights this module holds in a GEMM format."""
    h = _held(layer)
    if h is None:
        raise RuntimeError("no CPU-held weights on this layer")
    if h.fmt == "int8":
        return h.operand.t()
    if h.fmt == "onednn":
        return _onednn_levels(h.operand, layer.in_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ops.quantized.linear_unpack(h.operand)[0].int_repr()


def _unpack(layer: nn.Module) -> Tensor:
    """Integer weight levels ``[N, K]`` int8 (vectorised unpack of int4 when the native kernels are there)."""
    if layer.qweight is None:
        return held_levels(layer)
    if layer.w_bits == 4 and cpu_native.lib() is not None:
        return cpu_native.unpack_int4(layer.qweight)
    return layer.int_weight()


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors carry no version counter (and cannot be edited outside it)
        return -1


def _cached(layer: nn.Module, kind: str, build: Callable[[], Any], deps: tuple[Tensor, ...]) -> Any:
    """``build()`` once per layer and state of ``deps``: keyed on those tensor objects (weakly) and their versions."""
    caches = layer.__dict__.setdefault(_STATE_ATTR, {})  # a plain attribute: not a buffer, not in the state dict
    key = tuple(_version(t) for t in deps)
    hit = caches.get(kind)
    if hit is not None and hit[1] == key and all(r() is t for r, t in zip(hit[0], deps, strict=True)):
        return hit[2]
    value = build()
    caches[kind] = (tuple(weakref.ref(t) for t in deps), key, value)
    return value


def held_weight(layer: nn.Module, fmt: str) -> Any:
    """Speed mode: the weights in GEMM format ``fmt`` ("int8" or "fbgemm"), kept as their only copy in RAM."""
    h = _held(layer)
    if h is not None and h.fmt == fmt:
        return h.operand  # the hot path takes no lock
    with _CONVERT_LOCK:  # threads sharing a model convert a layer once; readers never see it half-converted
        h = _held(layer)
        if h is not None and h.fmt == fmt:
            return h.operand
        q = layer.qweight
        levels = _unpack(layer)
        if h is not None:
            log.debug("%s weights re-held as %s: the call size crossed SMALL_M", layer.__class__.__name__, fmt)
        if fmt == "int8":
            operand = levels.t().contiguous()
        elif fmt == "onednn":
            operand = _onednn_prepack(levels.contiguous())
        else:
            operand = _fbgemm_prepack(levels.contiguous())
        state = layer.__dict__.setdefault(_STATE_ATTR, {})
        source = h.source if h is not None and q is None else weakref.ref(q)
        state["weight"] = _Held(fmt, operand, layer.in_features * layer.out_features, source)
        state["holder"] = "cpu"
        layer.qweight = None  # after the held copy is in place; QuantLinear rebuilds int4 from it when needed
        return operand


def _onednn_prepack(wi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """oneDNN's prepacked int8 levels ``[N, K]``, with the unit scales and zero points its GEMM takes."""
    N = wi.shape[0]
    return torch.ops.onednn.qlinear_prepack(wi, None), torch.ones(N), torch.zeros(N, dtype=torch.long)


def _onednn_gemm(levels: Tensor, operand: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Exact integer sums ``levels @ W^T`` as fp32 (unit scales, zero point 0: int8 activations as they are)."""
    w, ones, zeros = operand
    if _signed_source():
        return torch.ops.onednn.qlinear_pointwise(
            levels, 1.0, 0, w, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )
    # VNNI without AMX: oneDNN's fast kernels take unsigned activations (vpdpbusd is u8 x s8); level + 128 with zero
    # point 128 gives the same exact sums (oneDNN subtracts 128 * colsum(W) in int32). x ^ 0x80 is x + 128 as u8.
    shifted = torch.bitwise_xor(levels, -128).view(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(
        shifted, 1.0, 128, w, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )


def _signed_source() -> bool:
    """oneDNN runs int8 (signed) activations at speed only on AMX; elsewhere it falls back to a reference loop."""
    return cpu_info.has_amx_int8()


def _onednn_levels(operand: tuple[Tensor, Tensor, Tensor], K: int) -> Tensor:
    """Integer levels ``[N, K]`` back from a prepacked weight (opaque layout): the GEMM of identity rows, exact."""
    rows = []
    for k0 in range(0, K, 1024):  # bounded temporaries at K = 4096
        eye = torch.zeros(min(1024, K - k0), K, dtype=torch.int8)
        eye[:, k0 : k0 + eye.shape[0]].fill_diagonal_(1)
        rows.append(_onednn_gemm(eye, operand))
    return torch.cat(rows).t().to(torch.int8).contiguous()


def gemm_weight(layer: nn.Module) -> Tensor:
    """The int8 ``[K, N]`` operand of ``_int_mm``: held per layer in speed mode, unpacked per call in memory mode."""
    if cpu_mode() == "memory":
        return _unpack(layer).t()  # a transposed view: _int_mm takes it as is (measured ~4% slower than [K, N])
    return held_weight(layer, "int8")


def _fbgemm_prepack(wi: Tensor) -> Any:
    """fbgemm's packing of int8 levels ``[N, K]`` at unit scales, so its fp32 output is the exact integer sum."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized-tensor constructors warn about a future deprecation
        wq = torch._make_per_channel_quantized_tensor(
            wi, torch.ones(wi.shape[0], dtype=torch.double), torch.zeros(wi.shape[0], dtype=torch.long), 0
        )
        prev = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"  # the packed type, not the engine, picks the kernel at call time
        try:
            return torch.ops.quantized.linear_prepack(wq, None)
        finally:
            torch.backends.quantized.engine = prev


def _on_cpu(m: nn.Module) -> bool:
    return m.qweight is None or m.qweight.device.type == "cpu"


def prepare(model: nn.Module) -> int:
    """Convert every CPU QuantLinear in ``model`` to its speed-mode int8 ``[K, N]`` weights now (e.g. after loading).

    Returns the bytes now held. Calls do the same lazily, choosing the format by the call's token count (fbgemm's
    packing below :data:`SMALL_M` tokens); this only moves the large-M conversion out of the first forward.
    Layers that will not take the integer path (W4A16, an inexact weight width) keep their packed buffer.
    """
    onednn = gemm_backend() == "onednn"
    for m in model.modules():
        if hasattr(m, "qweight") and hasattr(m, "a_bits") and _on_cpu(m) and _int_path_ok(m):
            if onednn and int_gemm_exact(m.w_bits, "onednn"):
                held_weight(m, "onednn")
            else:
                gemm_weight(m)
    return cached_bytes(model)


def release(model: nn.Module) -> None:
    """Back to the packed int4 buffers (0.5 byte/weight) in ``model`` until the next speed-mode call."""
    for m in model.modules():
        if _STATE_ATTR in m.__dict__:
            if hasattr(m, "restore_packed"):
                m.restore_packed()
            m.__dict__.pop(_STATE_ATTR, None)


def cached_bytes(model: nn.Module) -> int:
    """Bytes of the weights held in a GEMM format in ``model`` (1 per weight), instead of the packed buffers."""
    total = 0
    for m in model.modules():
        h = m.__dict__.get(_STATE_ATTR, {}).get("weight")
        total += h.nbytes if h is not None and getattr(m, "qweight", None) is None else 0
    return total


# -- GEMM --------------------------------------------------------------------------------------------------------
def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"
    )


@functools.cache
def int_gemm_exact(w_bits: int, backend: str = "int_mm") -> bool:
    """Whether ``backend`` ("int_mm", "fbgemm", "onednn") is exact here for 8-bit activations x ``w_bits`` weights.

    Checked on worst-case operands: long runs of extreme levels make every u8 x s8 pair sum as large as it gets,
    which is where AVX2's 16-bit saturation would show.
    """
    q = qz.qmax(w_bits)
    g = torch.Generator().manual_seed(0)
    a = torch.where(torch.rand(64, 512, generator=g) < 0.5, -128, 127).to(torch.int8)
    a[:8] = 127
    a[8:16] = -128
    w = torch.where(torch.rand(512, 32, generator=g) < 0.5, -q - 1, q).to(torch.int8)
    w[:, :4] = q
    w[:, 4:8] = -q - 1
    want = (a.double() @ w.double()).to(torch.int32)
    try:
        if backend == "int_mm":
            got = torch._int_mm(a, w)
        elif backend == "onednn":
            if not onednn_available():
                return False
            got = _onednn_gemm(a, _onednn_prepack(w.T.contiguous()))
        elif _fbgemm_available():
            packed = _fbgemm_prepack(w.T.contiguous())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(a.float(), 1.0, 128, packed)
        else:
            return False
    except (RuntimeError, AttributeError) as e:
        log.info("%s unavailable on CPU (%s)", backend, e)
        return False
    ok = torch.equal(got.to(torch.int32) if got.is_floating_point() else got, want)
    if not ok:
        log.info("%s saturates for %d-bit weights on this CPU: not used for them", backend, w_bits)
    return ok


def _int_path_ok(layer: nn.Module) -> bool:
    return layer.a_bits < 16 and int_gemm_exact(layer.w_bits)


def int_gemm(layer: nn.Module, levels: Tensor) -> Tensor:
    """Exact ``levels @ W^T`` accumulators ``[M, N]``: int32 from ``_int_mm``, or fp32 integers from fbgemm.

    ``_int_mm`` takes plain int8 weights but reorders them on every call, which dominates below ~128 tokens
    (12.7 ms vs 1.1 ms for a 2048 x 8192 camera-head layer at 4 tokens); there, in speed mode, fbgemm runs on
    weights packed once. Above, ``_int_mm`` (oneDNN) is the faster GEMM (15.3 vs 18.2 ms at 1024 x 3072, M = 1044).
    With the "onednn" backend (:func:`gemm_backend`, speed mode) every call runs oneDNN on weights prepacked once.
    """
    if gemm_backend() == "onednn" and int_gemm_exact(layer.w_bits, "onednn"):
        return _onednn_gemm(levels, held_weight(layer, "onednn"))
    if levels.shape[0] < SMALL_M and cpu_mode() == "speed" and int_gemm_exact(layer.w_bits, "fbgemm"):
        packed = held_weight(layer, "fbgemm")
        zp = 2 ** (layer.a_bits - 1)
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(levels.float(), 1.0, zp, packed)
    return torch._int_mm(levels, gemm_weight(layer))


def _epilogue(
    acc: Tensor, s: Tensor, layer: nn.Module, out_dtype: torch.dtype = torch.float32, min_per_thread: int | None = None
) -> Tensor:
    if cpu_native.lib() is not None:
        return cpu_native.dequant_epilogue(acc, s, layer.w_scale, layer.bias, out_dtype, min_per_thread)
    y = acc.float().mul_(s).mul_(layer.w_scale)  # same order as QuantLinear.forward_int: (acc * s) * w_scale
    y = y.add_(layer.bias) if layer.bias is not None else y
    return y.to(out_dtype)


def qlinear_forward(layer: nn.Module, x: Tensor) -> Tensor | None:
    """QuantLinear forward on CPU (integer GEMM where exact, else float GEMM on transiently dequantized weights)."""
    K, N = layer.in_features, layer.out_features
    x2 = x.reshape(-1, K)
    if x2.shape[0] == 0:
        return None  # nothing to compute: the plain-torch path handles the empty shape
    if _int_path_ok(layer):
        # next to the multi-threaded oneDNN GEMM, split the quantize and epilogue passes over the threads too
        split = ONEDNN_MIN_PER_THREAD if gemm_backend() == "onednn" else None
        levels, s = act_quant(layer, x2, split)
        out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        y = _epilogue(int_gemm(layer, levels), s, layer, out_dtype, split)
    else:
        levels, s = act_levels(layer, x2)
        h = levels if s is None else levels * s
        w = _unpack(layer).to(torch.float32).mul_(layer.w_scale[:, None])  # transient: packed at rest
        y = F.linear(h, w, layer.bias)
    return y.reshape(*x.shape[:-1], N).to(x.dtype)
