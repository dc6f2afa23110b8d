"""Issue 25: the oneDNN prepacked GEMM backend, bf16 in/out of the native passes, per-CPU choice, KernelOptions.

The oneDNN backend is compared with the exact-levels reference ``QuantLinear.forward_int``: bit-identical in fp32 (the
GEMM runs at unit scales, so its fp32 output is the integer sum and the epilogue is the reference's op order); with
bf16 activations the only difference is the output's one rounding to bf16 (relative error < 4e-3, bf16's 2^-8).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import quantvggt.kernels.cpu as cpu
from quantvggt.kernels import cpu_info, cpu_native
from quantvggt.kernels.options import apply_kernel_options, resolve_float_dtype
from quantvggt.lowbit import quantizer as qz
from quantvggt.lowbit import registry
from quantvggt.lowbit.hadamard import random_signs
from quantvggt.lowbit.registry import KernelOptions, kernel_options, set_kernel_options
from quantvggt.quant.linear import FakeQuantLinear, QuantLinear

needs_onednn = pytest.mark.skipif(not cpu.onednn_available(), reason="torch build without onednn.qlinear_* ops")
needs_native = pytest.mark.skipif(cpu_native.lib() is None, reason="no C compiler: native CPU kernels unavailable")
BF16_REL = 4e-3  # one rounding to bf16 (2^-8 relative, 2^-9 on average)


def _ql(K: int, N: int, bits: tuple[int, int] = (4, 4), seed: int = 0, bias: bool = True) -> QuantLinear:
    torch.manual_seed(seed)
    return FakeQuantLinear(
        nn.Linear(K, N, bias=bias), *bits, random_signs(K, seed), torch.rand(K) + 0.5
    ).to_quant_linear()


@pytest.fixture(params=["s8", "u8"])
def onednn(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oneDNN backend in speed mode, whatever this CPU would choose, with signed activations (AMX) or shifted to
    unsigned with zero point 128 (VNNI without AMX: signed runs a reference loop there, 4000x slower)."""
    monkeypatch.setattr(cpu, "gemm", "onednn")
    monkeypatch.setattr(cpu, "mode", "speed")
    monkeypatch.setattr(cpu, "_signed_source", lambda: request.param == "s8")


@pytest.fixture(autouse=True)
def _default_options() -> None:
    prev = set_kernel_options(None)
    yield
    set_kernel_options(prev)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@needs_onednn
@pytest.mark.parametrize("bits", [(4, 4), (4, 8), (8, 8)])
@pytest.mark.parametrize(("K", "N"), [(256, 96), (1024, 64), (96, 32)])  # 96: Paley width, torch rotation
@pytest.mark.parametrize("M", [1, 5, 200])
def test_onednn_matches_exact_levels_reference(onednn: None, bits: tuple[int, int], K: int, N: int, M: int) -> None:
    ql = _ql(K, N, bits)
    ref = copy.deepcopy(ql)
    x = torch.randn(M, K) * 2
    want = ref.forward_int(x)
    got = ql(x)
    if not cpu.int_gemm_exact(bits[0], "onednn"):
        pytest.skip(f"oneDNN not exact for {bits[0]}-bit weights on this CPU (falls back)")
    assert cpu._held(ql).fmt == "onednn" and ql.qweight is None
    assert torch.equal(got, want)  # unit-scale GEMM + the reference's epilogue order: bit-identical
    xb = x.bfloat16()
    yb = ql(xb)
    assert yb.dtype == torch.bfloat16
    assert _rel(yb, ref.forward_int(xb.float())) < BF16_REL


@needs_onednn
def test_onednn_held_weights_round_trip_to_int4(onednn: None) -> None:
    ql = _ql(2048, 48, (4, 4), bias=False)
    packed = ql.qweight.clone()
    ql(torch.randn(3, 2048))
    assert ql.qweight is None and cpu.cached_bytes(ql) == 2048 * 48
    assert torch.equal(ql.int_weight(), qz.unpack_int4(packed))  # levels back from the opaque prepacked layout
    assert torch.equal(ql.state_dict()["qweight"], packed)
    cpu.release(ql)
    assert torch.equal(ql.qweight, packed)


@needs_native
def test_native_passes_take_and_give_bf16() -> None:
    torch.manual_seed(0)
    x = (torch.randn(70, 512) * 3).bfloat16()
    sg, ps = torch.randint(0, 2, (512,)).float() * 2 - 1, torch.rand(512) + 0.5
    for fwht in (True, False):
        a, s = cpu_native.act_quant(x, sg if fwht else None, ps, 0.9, 8, fwht, min_per_thread=1 << 10)
        b, t = cpu_native.act_quant(x.float(), sg if fwht else None, ps, 0.9, 8, fwht)
        assert torch.equal(a, b) and torch.equal(s, t)  # widening bf16 is exact: same levels and scales
    acc = torch.randint(-(2**20), 2**20, (70, 200), dtype=torch.int32)
    s, ws, bias = torch.rand(70, 1), torch.rand(200), torch.randn(200)
    for a, b in ((acc, bias), (acc.float(), None)):
        want = (a.float() * s) * ws
        want = want + b if b is not None else want
        got = cpu_native.dequant_epilogue(a.clone(), s, ws, b, torch.bfloat16, min_per_thread=1 << 10)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())  # fp32 math, one RNE rounding
    nan = torch.full((2, 16), float("nan"))
    assert cpu_native.dequant_epilogue(nan, torch.ones(2, 1), torch.ones(16), None, torch.bfloat16).isnan().all()


def test_gemm_choice_per_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "gemm", None)
    monkeypatch.setattr(cpu, "mode", "speed")
    monkeypatch.setattr(cpu_info, "has_amx_int8", lambda: False)
    assert cpu.gemm_backend() == "int_mm"  # no AMX (VNNI or not): the portable path, as fast as oneDNN there
    monkeypatch.setattr(cpu_info, "has_amx_int8", lambda: True)
    assert cpu.gemm_backend() == ("onednn" if cpu.onednn_available() else "int_mm")
    set_kernel_options(KernelOptions(cpu_gemm="int_mm"))
    assert cpu.gemm_backend() == "int_mm"
    set_kernel_options(KernelOptions(cpu_gemm="onednn"))
    monkeypatch.setattr(cpu, "mode", "memory")
    assert cpu.gemm_backend() == "int_mm"  # memory mode has no prepacked weights


def test_float_dtype_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_info, "has_fast_bf16", lambda: False)
    assert resolve_float_dtype(KernelOptions()) == torch.float32
    monkeypatch.setattr(cpu_info, "has_fast_bf16", lambda: True)
    assert resolve_float_dtype(KernelOptions()) == torch.bfloat16
    assert resolve_float_dtype(KernelOptions(float_dtype="fp32")) == torch.float32
    assert resolve_float_dtype(KernelOptions(), "cuda") == torch.float32


@pytest.mark.skipif(not cpu_info.has_amx(), reason="CPU without AMX: the AMX choices are not made here")
def test_amx_cpu_chooses_onednn_and_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "gemm", None)
    monkeypatch.setattr(cpu, "mode", "speed")
    assert cpu.gemm_backend() == "onednn"
    assert resolve_float_dtype(KernelOptions()) == torch.bfloat16
    assert "AMX" in cpu_info.onednn_isa()


def test_kernel_options_json_round_trip_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    o = KernelOptions(cpu_gemm="onednn", float_dtype="bf16", compile=True)
    assert KernelOptions.from_dict(json.loads(json.dumps(o.to_dict()))) == o
    assert KernelOptions.from_dict({}) == KernelOptions()
    with pytest.raises(ValueError, match="cpu_gemm"):
        KernelOptions(cpu_gemm="mkl")
    with pytest.raises(ValueError, match="compile"):
        KernelOptions.from_dict({"compile": "yes"})
    with pytest.raises(ValueError, match="unknown fields"):
        KernelOptions.from_dict({"threads": 2})
    for k in registry.KERNEL_ENV_NAMES:
        monkeypatch.delenv(k, raising=False)
    set_kernel_options({"cpu_mode": "memory"})
    assert kernel_options().cpu_mode == "memory" and cpu.cpu_mode() == "memory"
    monkeypatch.setenv(cpu.MODE_ENV, "speed")  # the environment variable still overrides (backward compatible)
    assert kernel_options().cpu_mode == "speed"
    monkeypatch.setenv(registry.CPU_NATIVE_ENV, "0")
    assert kernel_options().cpu_native is False
    monkeypatch.setenv(cpu.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="cpu_mode"):
        kernel_options()


def _tiny() -> nn.Module:
    from quantvggt.model import VGGT, VGGTConfig

    cfg_path = Path(__file__).resolve().parents[2] / "quantvggt" / "assets" / "vggt-tiny-config.json"
    torch.manual_seed(0)
    return VGGT(VGGTConfig.from_dict(json.loads(cfg_path.read_text()))).eval()


def test_float_model_runs_in_bf16() -> None:
    m = _tiny()
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        want = m(x)
        got = m.to(torch.bfloat16)(x)  # fp32 images in, the DPT heads' position embedding added in bf16
    for k in ("depth", "world_points", "pose_enc"):
        assert got[k].dtype == torch.float32 and _rel(got[k], want[k]) < 3e-2, k


@needs_onednn
def test_apply_kernel_options_fp32_is_the_exact_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantvggt.quant import get_recipe, quantize_

    m = _tiny()
    quantize_(m, get_recipe("quarot-w4a8", scope=("aggregator", "camera_head", "dpt_heads")))
    ref = copy.deepcopy(m)
    for mod in ref.modules():
        if isinstance(mod, QuantLinear):
            mod.backend = "int"
    monkeypatch.setattr(cpu, "mode", "speed")
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        want = ref(x)
        apply_kernel_options(m, KernelOptions(cpu_gemm="onednn", float_dtype="fp32"))
        assert cpu.cached_bytes(m) > 0  # prepacked at load, not on the first call
        got = m(x)
        for k in ("depth", "world_points", "pose_enc"):
            assert _rel(got[k], want[k]) < 1e-5, k
        apply_kernel_options(m, KernelOptions(cpu_gemm="onednn", float_dtype="bf16"))
        q = next(mod for mod in m.modules() if isinstance(mod, QuantLinear))
        assert q.w_scale.dtype == torch.float32 and q.act_scale.dtype == torch.float32  # scales stay fp32
        got = m(x)
    for k in ("depth", "world_points"):
        assert _rel(got[k], want[k]) < 5e-2, k
