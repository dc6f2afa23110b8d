"""Small native CPU kernels for the QuantLinear CPU path, compiled from C on first use and called through ctypes.

Three kernels, each a single pass over its data with rows split across ``torch.get_num_threads()`` threads (torch's
OpenMP pool when torch uses OpenMP, else pthreads):

* ``act_quant``: per token, sign flip + in-register fast Walsh-Hadamard transform + pre-scale + absmax + round +
  clamp -> int8 levels and the fp32 per-token scale (the rotation and quantization without any [M, K] temporary);
* ``unpack_int4``: packed int4 -> int8 levels (the "memory" mode's per-call unpack);
* ``dequant_epilogue``: int32 (or exact fp32) accumulators -> ``(acc * s_tok) * w_scale + bias`` in place.

There is no build step: the C source below is compiled with the system C compiler (``$CC`` or ``cc``/``gcc``,
``-O3 -march=native``) into ``$QUANTVGGT_CPU_KERNEL_DIR`` (default ``~/.cache/quantvggt/cpu-kernels``), keyed by a
hash of the source, the flags, the compiler and the CPU's model/flags, so a cache shared between different machines
never loads code built for another CPU. Without a compiler (or with ``QUANTVGGT_CPU_NATIVE=0``) :func:`lib` returns
``None`` and :mod:`quantvggt.kernels.cpu` uses its plain-torch path (same results, slower).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from quantvggt.lowbit.registry import CPU_NATIVE_ENV

log = logging.getLogger(__name__)

NATIVE_ENV = CPU_NATIVE_ENV
DIR_ENV = "QUANTVGGT_CPU_KERNEL_DIR"
# no -ffast-math: division, round-half-even and the epilogue's (acc * s) * w order must match torch's fp32 ops
CFLAGS = [
    "-O3",
    "-march=native",
    "-fPIC",
    "-shared",
    "-pthread",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-fno-strict-aliasing",
    "-std=gnu11",
]
# a thread per call only pays above ~1 ms of work: these passes take 0.3-2.5 ms at VGGT-1B shapes, and each split
# adds a thread start and a join, which on an oversubscribed machine waits out a descheduled thread (measured:
# act_quant at 1044 x 1024 took 0.9 ms on one thread and 10 ms split over two while other jobs shared the cores)
MIN_ELEMENTS_PER_THREAD = 1 << 21
# ... unless a caller passes ``min_per_thread``: next to the prepacked oneDNN GEMM (multi-threaded, 2-3x faster than
# ``_int_mm``) these passes were the one-thread part of a 2-thread layer (issue 25); kernels.cpu lowers the bar there


SOURCE = r"""
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));  /* GCC vector extensions: one zmm, or two ymm on AVX2 */
typedef int32_t v16i __attribute__((vector_size(64)));

/* The first four butterfly stages inside one 16-float vector: y = v * S_h + v[j ^ h] (the products are exact, so
   this equals the butterfly (a + b, a - b) bit for bit). */
static const v16i P1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
static const v16i P2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
static const v16i P4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
static const v16i P8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
static const v16 S1 = {1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1};
static const v16 S2 = {1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1};
static const v16 S4 = {1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1};
static const v16 S8 = {1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1};

static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }

/* buf = x * signs with the first four Walsh-Hadamard stages applied per 16-float chunk (K % 16 == 0), while
   prefetching the next row into L2 one cache line per chunk (``next`` may be NULL): its loads then overlap this
   row's compute in L1 instead of stalling the next row's first pass. */
static void signs_fwht16(float *restrict buf, const float *restrict x, const float *restrict sg, int64_t K,
                         const float *next) {
    for (int64_t c = 0; c < K; c += 16) {
        if (next) __builtin_prefetch(next + c, 0, 2);
        v16 a = sg ? load16(x + c) * load16(sg + c) : load16(x + c);
        a = a * S1 + __builtin_shuffle(a, P1);
        a = a * S2 + __builtin_shuffle(a, P2);
        a = a * S4 + __builtin_shuffle(a, P4);
        a = a * S8 + __builtin_shuffle(a, P8);
        memcpy(buf + c, &a, sizeof a);
    }
}

/* The remaining stages h = 16 .. K/2 of the in-place unnormalised transform: radix-4 butterflies (two stages per
   pass over the row, which stays in L1: 16 KB at K = 4096), then one radix-2 stage if log2(K) is odd. */
static void fwht_rest(float *restrict v, int64_t K) {
    int64_t h = 16;
    for (; 4 * h <= K; h *= 4) {
        for (int64_t i = 0; i < K; i += 4 * h) {
            float *restrict p0 = v + i, *restrict p1 = p0 + h, *restrict p2 = p1 + h, *restrict p3 = p2 + h;
            for (int64_t j = 0; j < h; j++) {
                const float a = p0[j] + p1[j], b = p0[j] - p1[j], c = p2[j] + p3[j], d = p2[j] - p3[j];
                p0[j] = a + c; p1[j] = b + d; p2[j] = a - c; p3[j] = b - d;
            }
        }
    }
    if (h < K) {
        float *restrict p0 = v, *restrict p1 = v + h;
        for (int64_t j = 0; j < h; j++) {
            const float a = p0[j], b = p1[j];
            p0[j] = a + b; p1[j] = a - b;
        }
    }
}

/* bf16 <-> fp32: the top 16 bits of an fp32; rounding to nearest even, NaN kept quiet (as torch converts) */
static inline float bf2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16u16 __attribute__((vector_size(32)));
static inline v16u16 f2bf16(v16 f) {  /* f2bf on 16 lanes */
    v16u u;
    memcpy(&u, &f, sizeof u);
    v16u r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    v16u nan = (v16u)((u & 0x7fffffffu) > 0x7f800000u);  /* all-ones lanes where NaN */
    r = (r & ~nan) | (((u >> 16) | 0x40u) & nan);
    return __builtin_convertvector(r, v16u16);
}

typedef struct {
    const float *x; int64_t ldx, K; const float *signs, *prescale; float clip, qmax;
    int8_t *out; float *scale; int fwht; const uint16_t *xb;
    int64_t r0, r1;
} act_job;

static void *act_rows(void *arg) {
    /* struct fields copied to restrict locals: int8 stores could otherwise alias them and block vectorisation */
    const act_job *j = (const act_job *)arg;
    const int64_t K = j->K, ldx = j->ldx, r0 = j->r0, r1 = j->r1;
    const float *restrict sg = j->signs, *restrict ps = j->prescale;
    const float clip = j->clip, qmax = j->qmax, lo = -qmax - 1.f;
    int8_t *restrict out = j->out;
    float *restrict buf = (float *)aligned_alloc(64, (size_t)((K * 4 + 63) / 64 * 64));
    float *restrict row = j->xb ? (float *)aligned_alloc(64, (size_t)((K * 4 + 63) / 64 * 64)) : NULL;
    for (int64_t m = r0; m < r1; m++) {
        const float *restrict xr = j->x + m * ldx;
        if (row) {  /* bf16 input: widened into a row buffer (exact), then the fp32 path */
            const uint16_t *restrict xbr = j->xb + m * ldx;
            for (int64_t k = 0; k < K; k++) row[k] = bf2f(xbr[k]);
            xr = row;
        }
        if (j->fwht) {
            signs_fwht16(buf, xr, sg, K, (m + 1 < r1 && !row) ? xr + ldx : NULL);
            fwht_rest(buf, K);
        } else if (sg) {
            for (int64_t k = 0; k < K; k++) buf[k] = xr[k] * sg[k];
        } else {
            memcpy(buf, xr, (size_t)K * 4);
        }
        /* absmax as an integer max over the bit patterns of |h| (same order for non-negative floats; NaN wins,
           as in torch): an integer max reduction vectorises, a float one does not without -ffast-math */
        int32_t mb = 0;
        for (int64_t k = 0; k < K; k++) {
            const float h = buf[k] * ps[k];
            buf[k] = h;
            int32_t b;
            memcpy(&b, &h, 4);
            b &= 0x7fffffff;
            mb = b > mb ? b : mb;
        }
        float amax;
        memcpy(&amax, &mb, 4);
        /* symmetric_scale: clamp(amax * clip, 1e-8) / qmax, all in fp32 as torch does */
        const float s = fmaxf(amax * clip, 1e-8f) / qmax;
        j->scale[m] = s;
        int8_t *restrict o = out + m * K;
        for (int64_t k = 0; k < K; k++) {
            float q = nearbyintf(buf[k] / s);  /* round half to even, like torch.round */
            q = q < lo ? lo : q;
            q = q > qmax ? qmax : q;
            o[k] = (int8_t)(int32_t)q;
        }
    }
    free(buf);
    free(row);
    return NULL;
}

typedef struct {
    const uint8_t *p; int8_t *out; int64_t r0, r1, n;
} unpack_job;

static void *unpack_rows(void *arg) {
    const unpack_job *j = (const unpack_job *)arg;
    const uint8_t *restrict p = j->p;
    int8_t *restrict out = j->out;
    const int64_t i0 = j->r0 * j->n, i1 = j->r1 * j->n;
    for (int64_t i = i0; i < i1; i++) {
        const uint8_t b = p[i];
        out[2 * i] = (int8_t)(((b & 15) ^ 8) - 8);
        out[2 * i + 1] = (int8_t)(((b >> 4) ^ 8) - 8);
    }
    return NULL;
}

typedef struct {
    int32_t *acc; int64_t N; const float *s, *ws, *bias; int is_float; uint16_t *out_bf16; int64_t r0, r1;
} epi_job;

static void *epi_rows(void *arg) {
    const epi_job *j = (const epi_job *)arg;
    const int64_t N = j->N;
    const float *restrict ws = j->ws, *restrict bias = j->bias;
    for (int64_t m = j->r0; m < j->r1; m++) {
        const int32_t *a = j->acc + m * N;
        float *y = (float *)(j->acc + m * N);  /* fp32 written over the int32 it came from (-fno-strict-aliasing) */
        const float sm = j->s[m];
        if (j->out_bf16) {  /* fp32 math as below, rounded once to bf16 into a separate [M, N] output */
            uint16_t *restrict o = j->out_bf16 + m * N;
            const float *restrict af = (const float *)a;
            int64_t n = 0;
            for (; n + 16 <= N; n += 16) {  /* 16 at a time, branch-free rounding: vectorises */
                v16 acc16;
                if (j->is_float) acc16 = load16(af + n);
                else { v16i ai; memcpy(&ai, a + n, sizeof ai); acc16 = __builtin_convertvector(ai, v16); }
                v16 y0 = (acc16 * sm) * load16(ws + n);
                if (bias) y0 = y0 + load16(bias + n);
                v16u16 r = f2bf16(y0);
                memcpy(o + n, &r, sizeof r);
            }
            for (; n < N; n++) {
                const float y0 = ((j->is_float ? af[n] : (float)a[n]) * sm) * ws[n];
                o[n] = f2bf(bias ? y0 + bias[n] : y0);
            }
        } else if (j->is_float) {  /* the accumulators are exact fp32 integers (fbgemm's output at unit scales) */
            if (bias) for (int64_t n = 0; n < N; n++) y[n] = (y[n] * sm) * ws[n] + bias[n];
            else for (int64_t n = 0; n < N; n++) y[n] = (y[n] * sm) * ws[n];
        } else if (bias) {
            for (int64_t n = 0; n < N; n++) y[n] = ((float)a[n] * sm) * ws[n] + bias[n];
        } else {
            for (int64_t n = 0; n < N; n++) y[n] = ((float)a[n] * sm) * ws[n];
        }
    }
    return NULL;
}

/* Run fn over rows [0, M) split into nt contiguous ranges (the calling thread takes the first). */
#define SPLIT(JOB_T, FN, INIT)                                                        \
    if (nt < 1) nt = 1;                                                               \
    if (nt > 64) nt = 64;                                                             \
    if (nt > M) nt = (int)(M > 0 ? M : 1);                                            \
    JOB_T jobs[64];                                                                   \
    for (int t = 0; t < nt; t++) {                                                    \
        jobs[t] = INIT; jobs[t].r0 = M * t / nt; jobs[t].r1 = M * (t + 1) / nt;  \
    }                                                                                 \
    RUN_JOBS(JOB_T, FN)

/* With OpenMP the ranges run on the process's OpenMP pool, the one torch's own ops use (libgomp.so.1 is already
   loaded by torch when this library is), so its workers are not left spinning beside threads of ours. */
#ifdef _OPENMP
#define RUN_JOBS(JOB_T, FN)                                                           \
    if (nt == 1) { FN(&jobs[0]); } else {                                             \
        _Pragma("omp parallel for num_threads(nt) schedule(static, 1)")              \
        for (int t = 0; t < nt; t++) FN(&jobs[t]);                                    \
    }
#else
#define RUN_JOBS(JOB_T, FN)                                                           \
    pthread_t th[64]; int started[64] = {0};                                          \
    for (int t = 1; t < nt; t++) started[t] = pthread_create(&th[t], NULL, FN, &jobs[t]) == 0; \
    FN(&jobs[0]);                                                                     \
    for (int t = 1; t < nt; t++) { if (started[t]) pthread_join(th[t], NULL); else FN(&jobs[t]); }
#endif

void qv_act_quant(const float *x, int64_t M, int64_t K, int64_t ldx, const float *signs, const float *prescale,
                  float clip, int qmax, int fwht, int8_t *out, float *scale, int nt, const uint16_t *xb) {
    SPLIT(act_job, act_rows, ((act_job){x, ldx, K, signs, prescale, clip, (float)qmax, out, scale, fwht, xb, 0, 0}))
}

void qv_unpack_int4(const uint8_t *p, int64_t M, int64_t n, int8_t *out, int nt) {
    SPLIT(unpack_job, unpack_rows, ((unpack_job){p, out, 0, 0, n}))
}

void qv_epilogue(int32_t *acc, int64_t M, int64_t N, const float *s, const float *ws, const float *bias, int is_float,
                 int nt, uint16_t *out_bf16) {
    SPLIT(epi_job, epi_rows, ((epi_job){acc, N, s, ws, bias, is_float, out_bf16, 0, 0}))
}
"""


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(keep))


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    env = os.environ.get(DIR_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quantvggt" / "cpu-kernels"


def _openmp() -> bool:
    """torch runs its ops on OpenMP here: our kernels then share that pool (``-fopenmp``), else use pthreads."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _build(cc: str, cache_dir: Path | None = None) -> Path:
    if _openmp():
        try:
            return _build_with(cc, [*CFLAGS, "-fopenmp"], cache_dir)
        except RuntimeError as e:  # no OpenMP in this compiler: the pthread build
            log.info("native CPU kernels without OpenMP (%s)", str(e)[:200])
    return _build_with(cc, CFLAGS, cache_dir)


def _build_with(cc: str, cflags: list[str], cache_dir: Path | None) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE, " ".join(cflags), version, _cpu_id()]).encode()).hexdigest()[:20]
    out = (cache_dir or _cache_dir()) / f"qv_cpu_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, so = Path(tmp) / "qv_cpu.c", Path(tmp) / "qv_cpu.so"
        src.write_text(SOURCE)
        proc = subprocess.run(
            [cc, *cflags, str(src), "-o", str(so), "-lm"], capture_output=True, text=True, timeout=300
        )
        if proc.returncode:
            raise RuntimeError(f"{cc} failed: {proc.stderr[-2000:]}")
        os.replace(so, out)  # atomic: concurrent builders each publish a complete file
    log.info("compiled the native CPU kernels into %s", out)
    return out


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The compiled kernels (built on first call), or ``None`` if disabled or no C compiler works here."""
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found: the CPU QuantLinear path runs its slower plain-torch kernels")
        return None
    try:
        try:
            path = _build(cc)
        except OSError as e:  # e.g. a read-only home: build in the temp folder instead (per user, per process tree)
            log.info("cannot use %s (%s): building the native CPU kernels in the temp folder", _cache_dir(), e)
            path = _build(cc, Path(tempfile.gettempdir()) / f"quantvggt-cpu-kernels-{os.getuid()}")
        so = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("native CPU kernels unavailable (%s): using the plain-torch path", e)
        return None
    i64, f32, i32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    so.qv_act_quant.argtypes = [ptr, i64, i64, i64, ptr, ptr, f32, i32, i32, ptr, ptr, i32, ptr]
    so.qv_unpack_int4.argtypes = [ptr, i64, i64, ptr, i32]
    so.qv_epilogue.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i32, i32, ptr]
    for fn in (so.qv_act_quant, so.qv_unpack_int4, so.qv_epilogue):
        fn.restype = None
    return so


def _threads(rows: int, cols: int, min_per_thread: int | None = None) -> int:
    return max(1, min(torch.get_num_threads(), rows * cols // (min_per_thread or MIN_ELEMENTS_PER_THREAD)))


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def act_quant(
    x: Tensor,
    signs: Tensor | None,
    prescale: Tensor,
    clip: float,
    bits: int,
    fwht: bool,
    min_per_thread: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``x [M, K]`` fp32 or bf16 (unit stride in K) -> (int8 levels ``[M, K]``, fp32 scale ``[M, 1]``).

    Per token: ``h = FWHT(x * signs) * prescale`` (the FWHT unnormalised; fold ``1/sqrt(K)`` into ``prescale``),
    ``s = max(absmax(h) * clip, 1e-8) / qmax``, levels ``clamp(round_half_even(h / s), -qmax - 1, qmax)``.
    """
    so = lib()
    assert so is not None and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 2 and x.stride(1) == 1
    xb = x if x.dtype == torch.bfloat16 else None
    M, K = x.shape
    if fwht and (K < 16 or K & (K - 1)):
        raise ValueError(f"the native FWHT needs a power-of-two width >= 16, got {K}")
    out = torch.empty(M, K, dtype=torch.int8)
    scale = torch.empty(M, 1, dtype=torch.float32)
    sg = None if signs is None else signs.to(torch.float32).contiguous()
    ps = prescale.to(torch.float32).contiguous()
    qmax = 2 ** (bits - 1) - 1
    so.qv_act_quant(
        None if xb is not None else x.data_ptr(), M, K, x.stride(0), _ptr(sg), ps.data_ptr(), float(clip), qmax,
        int(fwht), out.data_ptr(), scale.data_ptr(), _threads(M, K, min_per_thread), _ptr(xb),
    )  # fmt: skip
    return out, scale


def unpack_int4(packed: Tensor) -> Tensor:
    """Packed int4 ``[N, K/2]`` uint8 -> int8 levels ``[N, K]`` (same layout as ``quantizer.unpack_int4``)."""
    so = lib()
    assert so is not None and packed.dtype == torch.uint8 and packed.dim() == 2
    p = packed.contiguous()
    out = torch.empty(p.shape[0], p.shape[1] * 2, dtype=torch.int8)
    so.qv_unpack_int4(p.data_ptr(), p.shape[0], p.shape[1], out.data_ptr(), _threads(*p.shape))
    return out


def dequant_epilogue(
    acc: Tensor,
    s: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype = torch.float32,
    min_per_thread: int | None = None,
) -> Tensor:
    """``acc [M, N]`` (int32, or fp32 holding exact integers) -> ``(acc * s) * w_scale + bias`` computed in fp32.

    fp32: in place, a float32 view of ``acc``'s memory; bf16: a new tensor, each value rounded once.
    """
    so = lib()
    assert so is not None and acc.dtype in (torch.int32, torch.float32) and acc.is_contiguous()
    M, N = acc.shape
    s, ws = s.contiguous(), w_scale.to(torch.float32).contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    is_float = int(acc.dtype == torch.float32)
    out = torch.empty(M, N, dtype=torch.bfloat16) if out_dtype == torch.bfloat16 else None
    so.qv_epilogue(
        acc.data_ptr(), M, N, s.data_ptr(), ws.data_ptr(), _ptr(b), is_float, _threads(M, N, min_per_thread), _ptr(out)
    )
    return out if out is not None else acc.view(torch.float32)
