"""Quantized linear layers: the calibration-time fake-quant wrapper and the deployable packed ``QuantLinear``.

Deployable forward (per token ``x``):
    h = (x R) * act_scale            # Hadamard rotation R = diag(signs) H / sqrt(n); act_scale = 1 / smoothing
    q, s_tok = per_token_quant(h)    # symmetric, dynamic, clipped by act_clip
    acc = q @ Wq^T                   # integer GEMM, int32 accumulation
    y = acc * s_tok * w_scale + bias
with ``Wq`` = per-output-channel quantized ``(W R) * smoothing``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import weakref
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantvggt.lowbit import quantizer as qz
from quantvggt.lowbit.hadamard import HadamardPlan, rotate
from quantvggt.lowbit.registry import KERNEL_STATE_ATTR, get_kernel
from quantvggt.lowbit.registry import QLINEAR_BACKEND_ENV as BACKEND_ENV

BACKENDS = ("auto", "int", "fake")
SpecT = TypeVar("SpecT", bound="_Spec")


class _Spec:
    """Shared (de)serialisation for layer specs: exact keys, checked types, tuples for JSON lists."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples as lists)."""
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls: type[SpecT], d: Any, where: str = "layer") -> SpecT:
        """Parse and validate; any missing, unknown or mistyped key raises ``ValueError`` naming ``where``."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        missing, unknown = sorted(set(fields) - set(d)), sorted(set(d) - set(fields))
        if missing or unknown:
            raise ValueError(f"{where}: missing keys {missing}, unknown keys {unknown}")
        out: dict[str, Any] = {}
        for k, typ in fields.items():
            v = d[k]
            if typ == "bool":
                ok = isinstance(v, bool)
            elif typ == "int":
                ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
            else:  # tuple[int, int]
                ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) and i >= 0 for i in v)
                v = tuple(v) if ok else v
            if not ok:
                raise ValueError(f"{where}: {k} must be {typ}, got {v!r}")
            out[k] = v
        try:
            return cls(**out)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e


@dataclass(frozen=True)
class QuantLinearSpec(_Spec):
    """Everything that fixes a :class:`QuantLinear`'s buffers: what checkpoints write and read per layer."""

    in_features: int
    out_features: int
    w_bits: int
    a_bits: int
    bias: bool
    rotate: bool

    def __post_init__(self) -> None:
        if self.w_bits not in (4, 6, 8) or self.a_bits not in (4, 6, 8, 16):
            raise ValueError(f"unsupported bits w{self.w_bits}a{self.a_bits}")
        if self.w_bits == 4 and self.in_features % 2:
            raise ValueError(f"int4 packing needs an even in_features, got {self.in_features}")


@dataclass(frozen=True)
class QuantConv2dSpec(_Spec):
    """Everything that fixes a :class:`QuantConv2d`'s buffers."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    bias: bool
    w_bits: int
    transposed: bool

    def __post_init__(self) -> None:
        if self.w_bits not in (4, 8):
            raise ValueError(f"QuantConv2d supports 4 or 8 weight bits, got {self.w_bits}")


class QuantLinear(nn.Module):
    """A linear layer with packed low-bit weights and on-the-fly activation quantization."""

    def __init__(self, in_features: int, out_features: int, w_bits: int, a_bits: int, bias: bool, rotate: bool) -> None:
        super().__init__()
        if w_bits not in (4, 6, 8) or a_bits not in (4, 6, 8, 16):
            raise ValueError(f"unsupported bits w{w_bits}a{a_bits}")
        if w_bits == 4 and in_features % 2:
            raise ValueError(f"int4 packing needs an even in_features, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.rotate = w_bits, a_bits, rotate
        self.plan = HadamardPlan.for_width(in_features) if rotate else None
        self.register_buffer("qweight", self._empty_packed())
        self.register_buffer("w_scale", torch.ones(out_features))
        self.register_buffer("act_scale", torch.ones(in_features))
        self.register_buffer("act_clip", torch.ones(1))
        self.register_buffer("signs", torch.ones(in_features, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.backend = "auto"
        self._register()

    def spec(self) -> QuantLinearSpec:
        """This layer's :class:`QuantLinearSpec`."""
        return QuantLinearSpec(
            self.in_features, self.out_features, self.w_bits, self.a_bits, self.bias is not None, self.rotate
        )

    @classmethod
    def from_spec(cls, spec: QuantLinearSpec) -> QuantLinear:
        """An empty layer (buffers of the right shapes) for ``spec``; fill it with ``load_state_dict``."""
        return cls(spec.in_features, spec.out_features, spec.w_bits, spec.a_bits, spec.bias, spec.rotate)

    def extra_repr(self) -> str:
        """Shape and format summary."""
        return f"in={self.in_features}, out={self.out_features}, w{self.w_bits}a{self.a_bits}, rotate={self.rotate}"

    # -- weights ---------------------------------------------------------------------------------------------
    # A device kernel may free ``qweight`` (set it to None) while it holds the same levels in its GEMM's own format
    # (CPU speed mode: 1 byte/weight instead of 1.5). The packed form is rebuilt from what it holds wherever the
    # buffer itself is needed: saving (state_dict), moving or casting (_apply), copying and pickling.
    def _packed_layout(self) -> tuple[tuple[int, int], torch.dtype]:
        """``qweight``'s shape and dtype: ``[out, in/2]`` uint8 (two int4 per byte) for 4-bit weights, else int8."""
        if self.w_bits == 4:
            return (self.out_features, self.in_features // 2), torch.uint8
        return (self.out_features, self.in_features), torch.int8

    def _empty_packed(self) -> Tensor:
        shape, dtype = self._packed_layout()
        return torch.zeros(shape, dtype=dtype)

    def _held_levels(self) -> Tensor:
        holder = self.__dict__.get(KERNEL_STATE_ATTR, {}).get("holder")
        fn = get_kernel("qlinear_levels", holder) if holder else None
        if fn is None:
            raise RuntimeError(f"QuantLinear({self.extra_repr()}): packed weights were freed and no kernel holds them")
        return fn(self, None)

    def _packed_from_held(self) -> Tensor:
        lv = self._held_levels()
        return qz.pack_int4(lv) if self.w_bits == 4 else lv.contiguous().clone()

    def restore_packed(self) -> None:
        """Rebuild the ``qweight`` buffer if a kernel freed it, and drop that kernel's state."""
        if self.qweight is None:
            self.qweight = self._packed_from_held()
        self.__dict__.pop(KERNEL_STATE_ATTR, None)

    def int_weight(self) -> Tensor:
        """Integer weight levels ``[out, in]`` (int8 container)."""
        if self.qweight is None:
            return self._held_levels()
        return qz.unpack_int4(self.qweight) if self.w_bits == 4 else self.qweight

    def dequantized_weight(self) -> Tensor:
        """Float weight ``Wq * w_scale`` in the rotated/smoothed basis ``[out, in]``."""
        return self.int_weight().float() * self.w_scale[:, None]

    def set_weight(self, w_levels: Tensor, w_scale: Tensor) -> None:
        """Store integer levels (packed for 4-bit) and per-channel scales."""
        lv = w_levels.to(torch.int8)
        self.__dict__.pop(KERNEL_STATE_ATTR, None)
        self.qweight = qz.pack_int4(lv) if self.w_bits == 4 else lv
        self.w_scale = w_scale.float().contiguous()

    # -- activations -----------------------------------------------------------------------------------------
    def transform_input(self, x: Tensor) -> Tensor:
        """Rotate and pre-scale activations into the quantization basis (float32)."""
        h = x.float()
        if self.rotate:
            h = rotate(h, self.signs.float(), self.plan)
        return h * self.act_scale

    def quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """-> (integer levels, per-token scale ``[..., 1]``) or (float h, None) for 16-bit activations."""
        h = self.transform_input(x)
        if self.a_bits >= 16:
            return h, None
        return qz.per_token_quant(h, self.a_bits, self.act_clip)

    # -- forward paths ---------------------------------------------------------------------------------------
    def forward_int(self, x: Tensor) -> Tensor:
        """Reference integer path: exact integer GEMM (float64 holds int32 sums exactly), then dequantize."""
        q, s = self.quantize_input(x)
        if s is None:
            y = F.linear(q, self.dequantized_weight())
        else:
            acc = torch.matmul(q.double(), self.int_weight().double().T).to(torch.int32)
            y = acc.float() * s * self.w_scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def forward_fake(self, x: Tensor) -> Tensor:
        """Quantize-dequantize path in float (what calibration optimised)."""
        q, s = self.quantize_input(x)
        h = q if s is None else q * s
        return F.linear(h, self.dequantized_weight(), self.bias).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """The device kernel; under ``torch.compile`` the same, called as the opaque op ``quantvggt::qlinear``."""
        if torch.compiler.is_compiling():
            return torch.ops.quantvggt.qlinear(x, self._handle, self.out_features)
        return self.forward_eager(x)

    def _register(self) -> None:
        self._handle = next(_HANDLES)
        _LIVE[self._handle] = self

    def __getstate__(self) -> dict[str, Any]:
        """Copies carry the packed weights, never a kernel's state (prepacked formats are rebuilt on first use)."""
        state = self.__dict__.copy()
        state.pop(KERNEL_STATE_ATTR, None)
        if self.qweight is None:
            state["_buffers"] = {**self._buffers, "qweight": self._packed_from_held()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Copies (deepcopy, pickling to Ray workers) get their own op handle."""
        super().__setstate__(state)
        self._register()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight is None:  # freed by a kernel: the checkpoint format is always the packed one
            destination[prefix + "qweight"] = self._packed_from_held()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.qweight is None:  # give the loader a buffer to fill; the kernel's copy is stale from here on
            self.qweight = self._empty_packed()
        self.__dict__.pop(KERNEL_STATE_ATTR, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        fn = _keep_fp32(fn)  # scales, signs and bias stay fp32 under model.to(bfloat16): they are the format
        if self.qweight is not None:
            return super()._apply(fn, recurse)
        probe = torch.empty(0, dtype=torch.uint8)
        moved = fn(probe)
        if moved.device != probe.device or moved.dtype != probe.dtype:  # the held format belongs to the old device
            self.restore_packed()
        return super()._apply(fn, recurse)  # a no-op for integer CPU tensors (e.g. .float(), .to("cpu")) keeps it

    def forward_eager(self, x: Tensor) -> Tensor:
        """Dispatch on ``backend`` (or the ``QUANTVGGT_QLINEAR_BACKEND`` environment variable)."""
        backend = os.environ.get(BACKEND_ENV, self.backend)
        if backend == "int":
            return self.forward_int(x)
        if backend == "fake":
            return self.forward_fake(x)
        if backend == "auto":
            fn = get_kernel("qlinear", x.device.type)
            y = fn(self, x) if fn is not None else None
            return y if y is not None else self.forward_fake(x)
        raise ValueError(f"unknown QuantLinear backend {backend!r}; choose from {BACKENDS}")

    def weight_bytes(self) -> int:
        """Bytes of this layer at rest (packed weights, scales, signs, bias), whatever format a kernel holds now."""
        rest = sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "qweight")
        (rows, cols), _ = self._packed_layout()
        return rest + rows * cols  # one byte per element in either layout


def _keep_fp32(fn: Any) -> Any:
    """``fn`` for ``Module._apply`` that moves fp32 tensors but never changes their dtype (``.to(bfloat16)``)."""

    def apply(t: Tensor) -> Tensor:
        out = fn(t)
        if t.dtype == torch.float32 and out.dtype != torch.float32:  # the move without the cast (no round trip)
            return t.to(out.device)
        return out

    return apply


# Compiled graphs call quantized layers through one custom op, so the kernels (fbgemm prepacks, Triton launches,
# caches on the layer) stay opaque to Dynamo: no graph breaks, and Inductor fuses the elementwise work around them.
# The op takes a handle to the live layer because a custom op cannot take a module.
_HANDLES = itertools.count(1)
_LIVE: weakref.WeakValueDictionary[int, QuantLinear] = weakref.WeakValueDictionary()


@torch.library.custom_op("quantvggt::qlinear", mutates_args=())
def _qlinear_op(x: Tensor, handle: int, out_features: int) -> Tensor:
    layer = _LIVE.get(handle)
    if layer is None:
        raise RuntimeError(f"quantvggt::qlinear: layer handle {handle} is gone (the model was freed)")
    return layer.forward_eager(x)


@_qlinear_op.register_fake
def _qlinear_fake(x: Tensor, handle: int, out_features: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class FakeQuantLinear(nn.Module):
    """Calibration wrapper: rotation + learnable smoothing + learnable weight/activation clipping, fake-quantized."""

    def __init__(
        self,
        linear: nn.Linear,
        w_bits: int,
        a_bits: int,
        signs: Tensor | None,
        smooth: Tensor | None = None,
        learn_smooth: bool = False,
        lwc: bool = False,
        lac: bool = False,
        clip_init: float = 4.0,
    ) -> None:
        super().__init__()
        self.w_bits, self.a_bits = w_bits, a_bits
        self.in_features, self.out_features = linear.in_features, linear.out_features
        dev = linear.weight.device
        self.plan = HadamardPlan.for_width(self.in_features) if signs is not None else None
        self.register_buffer("signs", None if signs is None else signs.float().to(dev))
        w = linear.weight.detach().float()
        w_rot = rotate(w, self.signs, self.plan) if signs is not None else w
        self.register_buffer("w_rot", w_rot)  # W R, [out, in]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        s = torch.ones(self.in_features, device=dev) if smooth is None else smooth.float().to(dev)
        if learn_smooth:
            self.log_s = nn.Parameter(s.log())
        else:
            self.register_buffer("log_s", s.log())
        self.lwc = nn.Parameter(torch.full((self.out_features,), clip_init, device=dev)) if lwc else None
        self.lac = nn.Parameter(torch.full((1,), clip_init, device=dev)) if (lac and a_bits < 16) else None

    def scale_params(self) -> list[nn.Parameter]:
        """Learnable smoothing parameters."""
        return [self.log_s] if isinstance(self.log_s, nn.Parameter) else []

    def clip_params(self) -> list[nn.Parameter]:
        """Learnable clipping parameters."""
        return [p for p in (self.lwc, self.lac) if p is not None]

    def _weight_q(self) -> Tensor:
        w = self.w_rot * self.log_s.exp()
        clip = torch.sigmoid(self.lwc) if self.lwc is not None else 1.0
        scale = qz.symmetric_scale(w.abs().amax(dim=1) * clip, self.w_bits)
        return qz.fake_quant_ste(w, scale[:, None], self.w_bits)

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantized forward with gradients to smoothing and clipping parameters."""
        h = x.float()
        if self.signs is not None:
            h = rotate(h, self.signs, self.plan)
        h = h / self.log_s.exp()
        if self.a_bits < 16:
            clip = torch.sigmoid(self.lac) if self.lac is not None else 1.0
            scale = qz.symmetric_scale(h.abs().amax(dim=-1, keepdim=True) * clip, self.a_bits)
            h = qz.fake_quant_ste(h, scale, self.a_bits)
        return F.linear(h, self._weight_q(), self.bias).to(x.dtype)

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """Fold smoothing, clipping and signs into a deployable :class:`QuantLinear`."""
        ql = QuantLinear(
            self.in_features, self.out_features, self.w_bits, self.a_bits, self.bias is not None, self.signs is not None
        )
        s = self.log_s.detach().exp()
        w = self.w_rot * s
        clip = torch.sigmoid(self.lwc.detach()) if self.lwc is not None else 1.0
        levels, scale = qz.per_channel_weight_quant(w, self.w_bits, clip)
        ql.set_weight(levels, scale)
        ql.act_scale = (1.0 / s).float().contiguous()
        ql.act_clip = (torch.sigmoid(self.lac.detach()) if self.lac is not None else torch.ones(1)).float().reshape(1)
        if self.signs is not None:
            ql.signs = self.signs.to(torch.int8)
        if self.bias is not None:
            ql.bias = self.bias.clone()
        return ql.to(self.w_rot.device)


class QuantConv2d(nn.Module):
    """Weight-only quantized (transposed) 2-D convolution: packed int4/int8 weights per channel, float activations.

    Used for the DPT heads, whose cost is memory rather than GEMM time; weights are dequantized per call.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        bias: bool,
        w_bits: int,
        transposed: bool,
    ) -> None:
        super().__init__()
        if w_bits not in (4, 8):
            raise ValueError(f"QuantConv2d supports 4 or 8 weight bits, got {w_bits}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), tuple(padding)
        self.w_bits, self.transposed = w_bits, transposed
        fan = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.fan = fan
        padded = fan + (fan % 2 if w_bits == 4 else 0)
        self.register_buffer(
            "qweight",
            torch.zeros(
                out_channels, padded // 2 if w_bits == 4 else padded, dtype=torch.uint8 if w_bits == 4 else torch.int8
            ),
        )
        self.register_buffer("w_scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)

    def spec(self) -> QuantConv2dSpec:
        """This layer's :class:`QuantConv2dSpec`."""
        return QuantConv2dSpec(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,  # type: ignore[arg-type]
            self.bias is not None,
            self.w_bits,
            self.transposed,
        )

    @classmethod
    def from_spec(cls, spec: QuantConv2dSpec) -> QuantConv2d:
        """An empty layer for ``spec``; fill it with ``load_state_dict``."""
        return cls(
            spec.in_channels,
            spec.out_channels,
            spec.kernel_size,
            spec.stride,
            spec.padding,
            spec.bias,
            spec.w_bits,
            spec.transposed,
        )

    @staticmethod
    def from_float(conv: nn.Module, w_bits: int) -> QuantConv2d:
        """Quantize an ``nn.Conv2d`` / ``nn.ConvTranspose2d`` (groups=1, dilation=1) per output channel (RTN)."""
        transposed = isinstance(conv, nn.ConvTranspose2d)
        w = conv.weight.detach().float()
        if transposed:
            w = w.transpose(0, 1)  # [in, out, kh, kw] -> [out, in, kh, kw]
        q = QuantConv2d(
            w.shape[1],
            w.shape[0],
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.bias is not None,
            w_bits,
            transposed,
        )
        flat = w.reshape(w.shape[0], -1)
        levels, scale = qz.per_channel_weight_quant(flat, w_bits)
        if flat.shape[1] != q.qweight.shape[1] * (2 if w_bits == 4 else 1):
            levels = F.pad(levels, (0, 1))
        q.qweight = qz.pack_int4(levels.to(torch.int8)) if w_bits == 4 else levels.to(torch.int8)
        q.w_scale = scale.float()
        if conv.bias is not None:
            q.bias = conv.bias.detach().float().clone()
        return q.to(conv.weight.device)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantConv2d:
        return super()._apply(_keep_fp32(fn), recurse)  # per-channel scales and bias stay fp32 (a bf16 model)

    def weight(self) -> Tensor:
        """Dequantized weight in the float module's layout."""
        lv = qz.unpack_int4(self.qweight) if self.w_bits == 4 else self.qweight
        w = (lv[:, : self.fan].float() * self.w_scale[:, None]).reshape(
            self.out_channels, self.in_channels, *self.kernel_size
        )
        return w.transpose(0, 1) if self.transposed else w

    def forward(self, x: Tensor) -> Tensor:
        """Convolution with transiently dequantized weights."""
        w = self.weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.transposed:
            return F.conv_transpose2d(x, w, b, self.stride, self.padding)
        return F.conv2d(x, w, b, self.stride, self.padding)
