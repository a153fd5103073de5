"""W4A16 GEMV strategy (tiny M): CUDA-core split-K kernel, one program row per token, fp32 partial sums; per code one
LOP3 (mask + fp32 magic, in place), one FADD, one FFMA, with zero point and scale applied once per word column.
``gemv_call`` is its descriptor for aq.kernels.w4a16's dispatch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from aq.kernels.common import cdiv
from aq.kernels.w4a16_dequant import FP32_MAGIC, MAGIC_F, ROWS, load_group_params, one_group, word_offsets


@triton.jit(do_not_specialize=["M", "K_SPLIT"])
def _gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr,
    M, N, K, KW, G, K_SPLIT, stride_xm, magic,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, USE_PART: tl.constexpr,
    ONE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr,
):
    """One token row (program_id 0), BLOCK_N output channels, one split of K; CUDA cores, fp32.

    Codes are not shifted down: code i sits at bit p of its half-word, so OR-ing the magic 2^23 over it in place reads
    2^23 + 2^p q (exact: p + BITS <= 16 < 23); the 2^p goes into x (x_i * 2^-p, once per x value, shared by all
    rows), and the zero point is taken out per word: sum_i x_i (q_i - z) = sum_i x_i q_i - z * sum_i x_i.
    Per code: one LOP3, one FADD, one FFMA. PREFETCH loads the next step's words before computing on this step's.
    """
    EPW: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
    q_ptrs = q_ptr + word_offsets(offs_n, pid_k * K_SPLIT + tl.arange(0, BLOCK_KW), KW)  # advanced per step
    if PREFETCH:
        kw = pid_k * K_SPLIT + tl.arange(0, BLOCK_KW)
        qn = tl.load(q_ptrs, mask=n_ok[:, None] & (kw < KW)[None, :], other=0)
    for step in range(0, K_SPLIT, BLOCK_KW):
        w0 = tl.multiple_of(pid_k * K_SPLIT + step, BLOCK_KW)  # K_SPLIT is a multiple of BLOCK_KW
        kw = w0 + tl.arange(0, BLOCK_KW)
        w_ok = kw < KW
        if PREFETCH:
            qw = qn
            kn = kw + BLOCK_KW
            qn = tl.load(q_ptrs + (step + BLOCK_KW) * ROWS,
                         mask=n_ok[:, None] & ((kn < KW) & (step + BLOCK_KW < K_SPLIT))[None, :], other=0)
        else:
            qw = tl.load(q_ptrs + step * ROWS, mask=n_ok[:, None] & w_ok[None, :], other=0)
        s, z = load_group_params(s_ptr, z_ptr, offs_n, n_ok, kw, w0, KW, N, G, EPW, ONE_GROUP)
        qh = qw >> 16
        t = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        xsum = tl.zeros([BLOCK_KW], tl.float32)
        for i in tl.static_range(EPW):
            xi = tl.load(x_row + kw * EPW + i, mask=w_ok, other=0.0).to(tl.float32)
            xsum += xi
            if i % 2 == 0:
                f = ((qw & (MASK << ((i // 2) * BITS))) | magic).to(tl.float32, bitcast=True) - MAGIC_F
            else:
                f = ((qh & (MASK << ((i // 2) * BITS))) | magic).to(tl.float32, bitcast=True) - MAGIC_F
            t += f * (xi * (1.0 / (1 << ((i // 2) * BITS))))[None, :]
        acc += s * (t - z * xsum[None, :])
    out = tl.sum(acc, axis=1)
    if not USE_PART:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + pid_m.to(tl.int64) * N + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(part_ptr + (pid_k * M + pid_m).to(tl.int64) * N + offs_n, out, mask=n_ok)


def gemv_call(cfg: dict, x2, p, M: int, split: int, k_split: int, has_bias: bool):
    """(kernel, grid, run-time arguments after the common ones, constexprs) of a GEMV launch under config cfg."""
    bkw = cfg["block_kw"]
    grid = (M, cdiv(p.N, cfg["block_n"]), split)
    consts = dict(BITS=p.container_bits, BLOCK_N=cfg["block_n"], BLOCK_KW=bkw, USE_PART=split > 1,
                  ONE_GROUP=one_group(p, bkw, k_split), HAS_BIAS=has_bias, PREFETCH=cfg.get("prefetch", False))
    return _gemv_kernel, grid, [FP32_MAGIC], consts
