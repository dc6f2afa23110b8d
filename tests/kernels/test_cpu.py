"""The CPU QuantLinear path (native kernels, integer GEMM, speed/memory modes) vs the plain-torch references."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import quantvggt.kernels.cpu as cpu
from quantvggt.kernels import cpu_native
from quantvggt.kernels.cpu import hadamard_kron, qlinear_forward
from quantvggt.lowbit import quantizer as qz
from quantvggt.lowbit.hadamard import hadamard_transform, random_signs
from quantvggt.quant.linear import FakeQuantLinear, QuantLinear

needs_native = pytest.mark.skipif(cpu_native.lib() is None, reason="no C compiler: native CPU kernels unavailable")


def _ql(K: int, N: int, bits: tuple[int, int] = (4, 4), rotate: bool = True, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    signs = random_signs(K, seed) if rotate else None
    return FakeQuantLinear(nn.Linear(K, N), *bits, signs, torch.rand(K) + 0.5).to_quant_linear()


@pytest.fixture(autouse=True)
def portable_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests pin the portable GEMM path (_int_mm / fbgemm); test_cpu_onednn.py covers the oneDNN backend."""
    monkeypatch.setattr(cpu, "gemm", "int_mm")


@pytest.fixture(params=["speed", "memory"])
def cpu_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test in each weight mode."""
    monkeypatch.setattr(cpu, "mode", request.param)
    yield request.param


@pytest.fixture(params=["native", "torch"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the native kernels and with the plain-torch fallback."""
    if request.param == "native" and cpu_native.lib() is None:
        pytest.skip("no C compiler")
    if request.param == "torch":
        monkeypatch.setattr(cpu_native, "lib", lambda: None)
    return request.param


@pytest.mark.parametrize("K", [64, 128, 1024, 2048])
def test_kron_hadamard_equals_fwht(K: int) -> None:
    x = torch.randn(5, K, dtype=torch.float64)
    torch.testing.assert_close(hadamard_kron(x), hadamard_transform(x))


@needs_native
@pytest.mark.parametrize("a_bits", [4, 6, 8])
@pytest.mark.parametrize("K", [16, 128, 1024, 4096, 96])  # 96: Paley width, torch rotation + native quantize
@pytest.mark.parametrize("M", [1, 33, 300])
def test_native_act_quant_matches_torch_levels(a_bits: int, K: int, M: int) -> None:
    ql = _ql(K, 8, (4, a_bits))
    ql.act_clip.fill_(0.9)
    x = torch.randn(M, K) * 3
    x[0, 0] = 40.0  # an outlier token
    levels, s = cpu.act_quant(ql, x)
    assert levels.dtype == torch.int8 and s.shape == (M, 1)
    # the exact reference: float64 rotation, then torch's fp32 quantize on the same fp32 values
    h = hadamard_transform(x.double() * ql.signs.double(), ql.plan).float() * ql.act_scale
    want_s = qz.symmetric_scale(h.abs().amax(-1, keepdim=True) * ql.act_clip, a_bits)
    want = h.div(want_s).round().clamp(-qz.qmax(a_bits) - 1, qz.qmax(a_bits))
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=0)
    # fp32 rotations in another summation order may flip a level that sits on a rounding tie
    assert (levels.float() - want).abs().max() <= 1
    assert (levels.float() != want).float().mean() < 1e-3


@needs_native
def test_native_quantize_is_bit_exact_without_rotation() -> None:
    ql = _ql(256, 8, rotate=False)
    x = torch.randn(300, 256)
    x[:, 7] = 2.5 * (torch.randn(300, 1).abs() + 1).squeeze()  # .5 ties on some rows once scaled
    levels, s = cpu.act_quant(ql, x)
    want, want_s = cpu.act_levels(ql, x)
    assert torch.equal(s, want_s)
    assert torch.equal(levels.float(), want)


@needs_native
def test_native_unpack_and_epilogue_are_exact() -> None:
    p = torch.randint(0, 256, (64, 50), dtype=torch.uint8)
    assert torch.equal(cpu_native.unpack_int4(p), qz.unpack_int4(p))
    acc = torch.randint(-3000, 3000, (300, 48), dtype=torch.int32)
    s, w, b = torch.rand(300, 1), torch.rand(48), torch.randn(48)
    assert torch.equal(cpu_native.dequant_epilogue(acc.clone(), s, w, b), acc.float() * s * w + b)
    assert torch.equal(cpu_native.dequant_epilogue(acc.clone(), s, w, None), acc.float() * s * w)


@pytest.mark.parametrize("backend", ["int_mm", "fbgemm"])
@pytest.mark.parametrize("w_bits", [4, 6, 8])
def test_int_gemm_exactness_probe(w_bits: int, backend: str) -> None:
    # 4- and 6-bit weights cannot saturate even on AVX2 (255 * 32 * 2 < 32767); 8-bit ones depend on the ISA
    if w_bits < 8:
        assert cpu.int_gemm_exact(w_bits, backend)
    else:
        assert isinstance(cpu.int_gemm_exact(w_bits, backend), bool)


@pytest.mark.parametrize("bits", [(4, 4), (4, 8), (6, 6), (8, 8), (4, 16)])
@pytest.mark.parametrize("K", [128, 96])  # 96: Paley construction falls back to the structured transform
@pytest.mark.parametrize("tokens", [33, 300])
def test_cpu_path_matches_integer_reference(
    bits: tuple[int, int], K: int, tokens: int, cpu_mode: str, kernels: str
) -> None:
    ql = _ql(K, 48, bits)
    x = torch.randn(3, tokens // 3, K)
    y, want = qlinear_forward(ql, x), ql.forward_int(x)
    # the two rotations round differently, so a near-tie level may flip; compare by relative error
    rel = (y - want).norm() / want.norm()
    assert rel < 2e-3, rel


@pytest.mark.parametrize("tokens", [5, 40, 300])  # fbgemm (speed mode) below SMALL_M tokens, _int_mm above
@pytest.mark.parametrize("bits", [(4, 4), (4, 8)])
def test_gemm_is_exact_on_identical_levels(tokens: int, bits: tuple[int, int], cpu_mode: str, kernels: str) -> None:
    ql = _ql(256, 64, bits)
    assert cpu._int_path_ok(ql)
    x = torch.randn(tokens, 256)
    levels, s = cpu.act_quant(ql, x)
    acc = torch.matmul(levels.double(), ql.int_weight().double().T).to(torch.int32)
    want = acc.float() * s * ql.w_scale + ql.bias  # QuantLinear.forward_int's fp32 epilogue, same op order
    assert torch.equal(qlinear_forward(ql, x), want)


def test_threads_do_not_change_results(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_native, "MIN_ELEMENTS_PER_THREAD", 1024)  # split even these small passes
    ql = _ql(1024, 96)
    x = torch.randn(500, 1024)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = qlinear_forward(ql, x)
        torch.set_num_threads(2)
        y2 = qlinear_forward(ql, x)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("tokens", [40, 200])  # fbgemm's packing below SMALL_M tokens, int8 [K, N] above
def test_speed_mode_holds_one_copy_and_follows_new_weights(tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "mode", "speed")
    torch.manual_seed(0)
    ql = FakeQuantLinear(nn.Linear(128, 32, bias=False), 4, 4, random_signs(128, 0)).to_quant_linear()
    packed = ql.qweight.clone()
    x = torch.randn(tokens, 128)
    y0 = qlinear_forward(ql, x)
    kind = "fbgemm" if tokens < cpu.SMALL_M else "int8"
    held = cpu._held(ql)
    # the GEMM's format replaces the int4 buffer: 1 byte/weight in all
    assert ql.qweight is None and held is not None and held.fmt == kind and cpu.cached_bytes(ql) == 128 * 32
    assert torch.equal(qlinear_forward(ql, x), y0) and cpu._held(ql).operand is held.operand  # reused, not rebuilt
    assert torch.equal(ql.int_weight(), qz.unpack_int4(packed))  # levels come back from the held copy
    sd = ql.state_dict()
    assert set(sd) == {"qweight", "w_scale", "act_scale", "act_clip", "signs"} and torch.equal(sd["qweight"], packed)
    assert ql.qweight is None  # saving repacks into the state dict only
    # new weights (set_weight, load_state_dict, assignment) replace the held copy
    ql.set_weight(ql.int_weight().float().neg(), ql.w_scale)
    assert cpu._held(ql) is None and torch.equal(qlinear_forward(ql, x), -y0)
    ql.load_state_dict(sd)
    assert torch.equal(qlinear_forward(ql, x), y0) and ql.qweight is None
    ql.qweight = qz.pack_int4(-qz.unpack_int4(packed))
    assert torch.equal(qlinear_forward(ql, x), -y0)
    cpu.release(ql)
    assert cpu.cached_bytes(ql) == 0 and ql.qweight is not None
    assert torch.equal(ql.qweight, qz.pack_int4(-qz.unpack_int4(packed)))


def test_speed_mode_switches_format_when_call_size_crosses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "mode", "speed")
    ql = _ql(256, 64)
    small, large = torch.randn(8, 256), torch.randn(300, 256)
    want_small, want_large = ql.forward_int(small), ql.forward_int(large)
    for x, want, fmt in [(small, want_small, "fbgemm"), (large, want_large, "int8"), (small, want_small, "fbgemm")]:
        y = qlinear_forward(ql, x)
        assert cpu._held(ql).fmt == fmt and cpu.cached_bytes(ql) == 256 * 64
        assert (y - want).norm() / want.norm() < 2e-3


def test_speed_mode_conversion_is_safe_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(cpu, "mode", "speed")
    layers = [_ql(128, 32, seed=i) for i in range(16)]
    x = {n: torch.randn(n, 128) for n in (8, 300)}  # both formats, so layers also switch while others read
    want = {(i, n): layers[i].forward_int(x[n]) for i in range(16) for n in x}

    def run(job: tuple[int, int]) -> float:
        i, n = job
        y = qlinear_forward(layers[i], x[n])
        return float((y - want[i, n]).norm() / want[i, n].norm())

    jobs = [(i, n) for _ in range(4) for i in range(16) for n in x]
    with ThreadPoolExecutor(4) as pool:
        errs = list(pool.map(run, jobs))
    assert max(errs) < 2e-3
    assert all(m.qweight is None for m in layers)


def test_held_layer_copies_pickles_and_moves_with_its_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import copy
    import pickle

    monkeypatch.setattr(cpu, "mode", "speed")
    ql = _ql(128, 32)
    packed = ql.qweight.clone()
    x = torch.randn(200, 128)
    y = qlinear_forward(ql, x)
    assert ql.qweight is None
    for twin in (copy.deepcopy(ql), pickle.loads(pickle.dumps(ql))):
        assert torch.equal(twin.qweight, packed) and cpu.cached_bytes(twin) == 0  # packed, no kernel state
        assert torch.equal(qlinear_forward(twin, x), y)
    ql.float()  # a no-op for the integer weights: the held copy stays
    assert ql.qweight is None
    ql.to(torch.device("meta"))  # another device: the buffer comes back and moves
    assert ql.qweight is not None and ql.qweight.device.type == "meta" and cpu.cached_bytes(ql) == 0


def test_activation_constants_follow_edits(kernels: str) -> None:
    ql = _ql(128, 32)
    x = torch.randn(300, 128)
    qlinear_forward(ql, x)
    ql.act_clip.fill_(0.5)
    ql.act_scale.mul_(2.0)
    ql.signs.neg_()
    y, want = qlinear_forward(ql, x), ql.forward_int(x)
    assert (y - want).norm() / want.norm() < 2e-3


def test_gemm_weight_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    ql = _ql(128, 32)
    for m in ("speed", "memory"):
        monkeypatch.setattr(cpu, "mode", m)
        w = cpu.gemm_weight(ql)
        assert w.shape == (128, 32) and torch.equal(w, ql.int_weight().T)
    monkeypatch.setattr(cpu, "mode", "speed")
    assert cpu.gemm_weight(ql) is cpu.gemm_weight(ql) and cpu.gemm_weight(ql).is_contiguous()


def test_memory_mode_keeps_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "mode", "memory")
    model = nn.Sequential(_ql(128, 64), _ql(64, 16, seed=1))
    model(torch.randn(20, 128))
    assert cpu.cached_bytes(model) == 0
    monkeypatch.setattr(cpu, "mode", "speed")
    assert cpu.prepare(model) == 128 * 64 + 64 * 16 == cpu.cached_bytes(model)


def test_mode_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "mode", None)
    monkeypatch.delenv(cpu.MODE_ENV, raising=False)
    assert cpu.cpu_mode() == "speed"
    monkeypatch.setenv(cpu.MODE_ENV, "memory")
    assert cpu.cpu_mode() == "memory"
    monkeypatch.setenv(cpu.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="unknown CPU mode"):
        cpu.cpu_mode()


def test_half_input_and_empty_batch() -> None:
    ql = _ql(128, 32)
    x = torch.randn(2, 40, 128)
    y = ql(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 40, 32)
    assert ql(torch.randn(0, 128)).shape == (0, 32)
    assert math.isfinite(float(y.float().abs().max()))


def test_native_build_is_cached(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    cc = cpu_native._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv(cpu_native.DIR_ENV, str(tmp_path))
    so = cpu_native._build(cc)
    assert so.parent == tmp_path and so.exists()
    mtime = so.stat().st_mtime_ns
    assert cpu_native._build(cc) == so and so.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [so.name]  # no temporary leftovers


def test_native_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_native.NATIVE_ENV, "0")
    cpu_native.lib.cache_clear()
    try:
        assert cpu_native.lib() is None
        ql = _ql(128, 32)
        x = torch.randn(40, 128)
        assert (qlinear_forward(ql, x) - ql.forward_int(x)).norm() / ql.forward_int(x).norm() < 2e-3
    finally:
        monkeypatch.delenv(cpu_native.NATIVE_ENV)
        cpu_native.lib.cache_clear()


def test_auto_backend_uses_cpu_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    orig = cpu.qlinear_forward
    monkeypatch.setattr(cpu, "qlinear_forward", lambda layer, x: calls.append(1) or orig(layer, x))
    ql = FakeQuantLinear(nn.Linear(64, 8), 4, 4, None).to_quant_linear()
    ql(torch.randn(2, 64))
    assert calls == [1]
