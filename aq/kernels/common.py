"""What aq's Triton kernels share, written once: the bit-exact rounding and qparams rule, tile swizzling, norm
statistics, and the two launchers (the fast path to a compiled kernel, and an autotuned launch that decides once).

The @triton.jit helpers here are called from kernels in other modules; Triton inlines them there, compiled and
interpreted alike.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from aq import backend


# ------------------------------------------------------------------------------------------------------ host helpers
def cdiv(a: int, b: int) -> int:
    """Host-side ceil division (triton.cdiv goes through Triton's constexpr-function machinery: slow per call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of 2 >= n (host side)."""
    return 1 << max(0, int(n) - 1).bit_length()


# ------------------------------------------------------------------------------------------------------ rounding rule
# 1.5 * 2^23: adding and subtracting it rounds an fp32 |v| < 2^22 to the nearest integer, ties to even (as torch.round),
# in compiled and interpreted Triton alike (libdevice rint does not run in the interpreter).
_RNE = tl.constexpr(12582912.0)  # a global read inside @triton.jit must be constexpr


@triton.jit
def round_half_even(v):
    return (v + _RNE) - _RNE


@triton.jit
def div_rn(a, b):
    """IEEE-rounded fp32 division (Triton's `/` is approximate on the GPU; the reference divides exactly).
    tl.math.div_rn does not broadcast its operands (mismatched shapes give garbage when compiled): broadcast first."""
    a, b = tl.broadcast(a, b)
    return tl.math.div_rn(a, b)


@triton.jit
def qparams(xmin, xmax, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, EPS: tl.constexpr):
    """Scale and zero point from a group's (clipped) minimum and maximum, operation by operation as
    aq.primitives.choose_qparams computes them on the CPU (IEEE divisions)."""
    if SYMMETRIC:
        amax = tl.maximum(tl.abs(xmax), tl.abs(xmin))
        scale = tl.maximum(div_rn(amax, tl.full(amax.shape, 2 ** (BITS - 1) - 1, tl.float32)), EPS)
        zero = tl.full(scale.shape, 2 ** (BITS - 1), tl.float32)
    else:
        lo = tl.minimum(xmin, 0.0)
        hi = tl.maximum(xmax, 0.0)
        scale = tl.maximum(div_rn(hi - lo, tl.full(hi.shape, 2**BITS - 1, tl.float32)), EPS)
        zero = round_half_even(div_rn(-lo, scale))
    return scale, zero


@triton.jit
def quant_codes(y, scale, zero, BITS: tl.constexpr, FAST_DIV: tl.constexpr):
    """clamp(round(y / scale) + zero, 0, 2^BITS - 1) as fp32, y / scale correctly rounded as torch computes it;
    scale and zero broadcast against y (e.g. [BLOCK_M, 1]).

    FAST_DIV (compiled code): one IEEE reciprocal per scale, then per element q = y * r refined by one FMA step
    (Markstein: with r = RN(1/s) and q within an ulp of y/s, RN(q + r * (y - s q)) is the correctly rounded y/s);
    3 flops instead of a full IEEE division. The interpreter has no true FMA, so it divides.
    """
    if FAST_DIV:
        s2 = tl.broadcast_to(scale, y.shape)
        r = tl.broadcast_to(tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale), y.shape)
        q0 = y * r
        t = tl.fma(r, tl.fma(-q0, s2, y), q0)
    else:
        t = div_rn(y, scale)
    q = round_half_even(t) + zero
    return tl.minimum(tl.maximum(q, 0.0), 2**BITS - 1)


@triton.jit
def fake_quant_values(x, scale, zero, BITS: tl.constexpr):
    """(q - z) * s with q = clamp(round(x / s) + z, 0, 2^b - 1); scale, zero broadcast against x."""
    return (quant_codes(x, scale, zero, BITS, False) - zero) * scale


# ------------------------------------------------------------------------------------------------------ tiles
@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid in grouped order: GROUP_M row-tiles share each column-tile while it is in L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gm = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % gm, (pid % width) // gm


# ------------------------------------------------------------------------------------------------------ norm statistics
# NORM codes shared by the norm kernels: 0 none, 1 RMSNorm, 2 LayerNorm.
@triton.jit
def norm_stats_chunked(x_ptr, rows64, rok, K, stride_xm, eps, NORM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """(mean, rstd) of rows too long for registers, BLOCK_C columns at a time: the mean (LayerNorm; 0 otherwise) and
    1 / sqrt(mean square of the centred row + eps); (0, 1) when NORM is 0."""
    cc = tl.arange(0, BLOCK_C)
    mean = tl.zeros([BLOCK_M], tl.float32)
    rstd = tl.full([BLOCK_M], 1.0, tl.float32)
    if NORM != 0:
        if NORM == 2:
            s1 = tl.zeros([BLOCK_M], tl.float32)
            for c0 in range(0, K, BLOCK_C):
                m = rok[:, None] & ((c0 + cc) < K)[None, :]
                s1 += tl.sum(tl.load(x_ptr + rows64[:, None] * stride_xm + (c0 + cc)[None, :], mask=m,
                                     other=0.0).to(tl.float32), axis=1)
            mean = s1 / K
        s2 = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, K, BLOCK_C):
            m = rok[:, None] & ((c0 + cc) < K)[None, :]
            xv = tl.load(x_ptr + rows64[:, None] * stride_xm + (c0 + cc)[None, :], mask=m, other=0.0)
            xc = tl.where(m, xv.to(tl.float32) - mean[:, None], 0.0)
            s2 += tl.sum(xc * xc, axis=1)
        rstd = 1.0 / tl.sqrt(s2 / K + eps)
    return mean, rstd


@triton.jit
def norm_stats_rows(x, m, K, eps, NORM: tl.constexpr):
    """(x centred (LayerNorm) or x itself (RMSNorm), rstd) of whole rows x [BLOCK_M, BLOCK_K] in registers (masked
    entries 0), NORM 1 or 2."""
    if NORM == 2:
        mean = tl.sum(x, axis=1) / K
        xc = tl.where(m, x - mean[:, None], 0.0)
    else:
        xc = x
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + eps)
    return xc, rstd


# ------------------------------------------------------------------------------------------------------ fast launcher
COMPILED: dict = {}  # launch key -> Triton CompiledKernel (fast path that skips Triton's Python launcher)


def arg_spec(a) -> object:
    """What Triton specializes an argument on, conservatively: pointer dtype and 16-byte alignment; for ints % 16,
    == 1 and 32-bit range."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, int):
        return (a % 16 == 0, a == 1, -(2**31) <= a < 2**31)
    return type(a)


def launch_hooks() -> tuple:
    """Triton's (enter, exit) launch hooks when a profiler set any, else (None, None)."""
    enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
    active = bool(getattr(enter, "calls", enter)) or bool(getattr(leave, "calls", leave))
    return (enter, leave) if active else (None, None)


def run_compiled(kernel, grid: tuple, args: list, device_index: int) -> None:
    """Call a compiled kernel's C launcher with all its arguments (runtime ones, then constexprs) in order."""
    g = tuple(grid) + (1,) * (3 - len(grid))
    stream = torch._C._cuda_getCurrentRawStream(device_index)  # what Triton's launcher itself uses
    enter, leave = launch_hooks()
    meta = kernel.launch_metadata(g, stream, *args) if enter is not None else None
    kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, meta, enter, leave, *args)


def launch(fn, grid: tuple, args: list, consts: dict, num_warps: int = 4, num_stages: int = 3):
    """fn[grid](*args, **consts), minus the per-call Python work of Triton's launcher; returns the compiled kernel
    (None in the interpreter).

    The first launch of a (kernel, constants, argument specialization) goes through Triton's launcher, which compiles
    (or loads from its cache) and returns the compiled kernel; later launches call that kernel's C launcher directly
    (measured on the H100 machine: Triton's launcher took ~70 us of host time per launch, more than do_bench's L2 flush
    hides). Launch hooks (profilers) are honoured as Triton does. Arguments must be in the kernel's parameter order,
    runtime ones first, then the constexprs in `consts` in order; plain tensors and scalars only (no descriptors).
    """
    if not args[0].is_cuda:
        fn[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
        return None
    key = (fn, num_warps, num_stages, args[0].device.index, tuple(consts.values()), tuple(arg_spec(a) for a in args))
    kernel = COMPILED.get(key)
    if kernel is None:
        kernel = fn[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
        if kernel is not None and hasattr(kernel, "launch_metadata"):
            COMPILED[key] = kernel
        return kernel
    run_compiled(kernel, grid, list(args) + list(consts.values()), args[0].device.index)
    return kernel


# ----------------------------------------------------------------------------------------------------- autotuned launch
TUNED: dict = {}  # launch key -> chosen triton.Config (the autotuner's pick, or the first fitting config)


def no_tuning() -> bool:
    """The interpreter cannot time configs; AQ_FAST_TUNE=1 skips the timing on a GPU too (first fitting config)."""
    return backend.interpreting() or os.environ.get("AQ_FAST_TUNE") == "1"


def quick_bench(fn, quantiles=None):
    """Autotuning timer: short (the configs differ by far more than its noise)."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def launch_tuned(kernel, grid, prune, args, kwargs, key):
    """Launch a @triton.autotune kernel. The first call for a key autotunes (or, when no_tuning(), takes the first
    config `prune` keeps, without timing); later calls go straight to the JIT function with the chosen config (the
    autotuner's own per-call bookkeeping costs tens of microseconds of host time, which small layers notice)."""
    key = (key, no_tuning())
    cfg = TUNED.get(key)
    if cfg is None:
        if not no_tuning():
            kernel[grid](*args, **kwargs)
            TUNED[key] = kernel.best_config
            return
        cfg = TUNED[key] = prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs)[0]
    meta = {**kwargs, **cfg.kwargs}
    g = grid(meta) if callable(grid) else grid
    kernel.fn[g](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
