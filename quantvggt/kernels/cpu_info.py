"""What this CPU can do for the CPU kernels: int8 dot products (VNNI / AMX-INT8), bf16 (AVX512-BF16 / AMX-BF16).

Read once per process from ``/proc/cpuinfo`` (Linux; elsewhere nothing is assumed and the portable paths run).
:func:`onednn_isa` asks oneDNN itself which ISA it dispatches to (one tiny GEMM in a child process with
``ONEDNN_VERBOSE=1``), which is what every CPU benchmark prints at the top of its results.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ("amx_tile", "amx_int8", "amx_bf16", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx2")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU flags of :data:`FLAGS` this machine reports (empty where ``/proc/cpuinfo`` is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split()) & frozenset(FLAGS)
    return frozenset()


def has_int8_dot() -> bool:
    """An int8 dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX-INT8): the prepacked oneDNN GEMM pays here."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def has_amx_int8() -> bool:
    """AMX-INT8 tiles: oneDNN's int8 GEMM takes signed (s8) activations natively here."""
    return "amx_int8" in cpu_flags()


def has_fast_bf16() -> bool:
    """Native bf16 arithmetic (AMX-BF16 or AVX512-BF16): bf16 float ops beat fp32 here."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def has_amx() -> bool:
    """AMX tiles with int8 and bf16 (Sapphire Rapids and later)."""
    return {"amx_tile", "amx_int8", "amx_bf16"} <= cpu_flags()


def flags_line() -> str:
    """``amx=yes avx512_bf16=yes vnni=yes`` style summary for benchmark headers."""
    f = cpu_flags()
    vnni = "avx512_vnni" if "avx512_vnni" in f else "avx_vnni" if "avx_vnni" in f else "no"
    return f"amx={'int8+bf16' if has_amx() else 'no'} avx512_bf16={'yes' if 'avx512_bf16' in f else 'no'} vnni={vnni}"


_ISA_PROBE = (
    "import torch\n"
    "a = torch.randn(16, 64); b = torch.randn(64, 16)\n"
    "torch.backends.mkldnn.verbose(1)\n"
    "torch.nn.functional.linear(a.bfloat16(), b.t().bfloat16())\n"
    "torch.ops.onednn.qlinear_pointwise(torch.ones(16, 64, dtype=torch.int8), 1.0, 0,"
    " torch.ops.onednn.qlinear_prepack(torch.ones(16, 64, dtype=torch.int8), None), torch.ones(16),"
    " torch.zeros(16, dtype=torch.long), None, 1.0, 0, torch.float32, 'none', [], '')\n"
)


@functools.cache
def onednn_isa() -> str:
    """oneDNN's own ISA line (e.g. ``oneDNN v3.x ... isa:Intel AVX-512 with AVX512BW, ...``), or why it is unknown."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"}
    try:
        res = subprocess.run(
            [sys.executable, "-c", _ISA_PROBE], capture_output=True, text=True, timeout=120, env=env, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"
    lines = (res.stdout + res.stderr).splitlines()
    isa = [ln.split("isa:", 1)[1].strip() for ln in lines if "isa:" in ln]
    version = [ln.split("info,", 1)[1].strip() for ln in lines if "info,oneDNN v" in ln]
    if not isa:
        return "unknown (oneDNN printed no isa line)"
    return f"{version[0] + ', ' if version else ''}isa: {isa[0]}"
