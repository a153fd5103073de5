"""W4A16 tensor-core strategy (small and middle M): tile kernel (tl.dot, bf16/fp16 operands, fp32 accumulator),
optionally split-K, optionally "swapped" (yᵀ = W xᵀ, the dequantized weight the left operand), the K-tile fed as E dots
over the code positions of a word or joined back to natural K order (JOIN), or the raw codes dotted and the group's zero
point and scale applied to the fp32 result (FOLD). ``mma_call`` is its descriptor for aq.kernels.w4a16's dispatch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from aq import backend
from aq.kernels.common import cdiv, grouped_tile
from aq.kernels.w4a16_dequant import (MAGIC_F, ROWS, dq_leaf, dq_operands, dq_tile, dq_tree, half_dq, half_tree,
                                      load_group_params, one_group, word_offsets)


@triton.jit
def _dot_x(w, x_rows, ks, k_ok, m_ok, acc, SWAP: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + the product of the dequantized weight columns w [BLOCK_N, len(ks)] with x's columns ks: w xᵀ into
    acc [BLOCK_N, BLOCK_M] when SWAP, else x wᵀ into acc [BLOCK_M, BLOCK_N] (fp32 operands with DOT_F32)."""
    if DOT_F32:
        w = w.to(tl.float32)
    if SWAP:
        xt = tl.load(x_rows[None, :] + ks[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        if DOT_F32:
            xt = xt.to(tl.float32)
        acc = tl.dot(w, xt, acc)
    else:
        xt = tl.load(x_rows[:, None] + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_F32:
            xt = xt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(w), acc)
    return acc


@triton.jit(do_not_specialize=["M", "K_SPLIT"])
def _mma_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr,
    M, N, K, KW, G, K_SPLIT, stride_xm, magic,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    USE_PART: tl.constexpr, GROUP_M: tl.constexpr, ONE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    SWAP: tl.constexpr, JOIN: tl.constexpr, HALF_DQ: tl.constexpr, HALF_BASE: tl.constexpr, DOT_F32: tl.constexpr,
    FOLD: tl.constexpr,
):
    """A [BLOCK_M, BLOCK_N] tile of y over one split of K on tensor cores (tl.dot, fp32 accumulator).

    FOLD (swapped, one group per K step): the dot takes the raw codes (base + q as a 16-bit float, straight out of
    the shift + LOP3, or q itself) and the group's zero point and scale are applied to the fp32 dot result:
    y += s * (sum_k (base + q) x - (base + z) * sum_k x). The products are exact and the fp32 sums lose ~1e-5
    relative, and the per-code HADD2/HMUL2 disappear; the per-step cost moves to [BLOCK_N, BLOCK_M], cheap for small M.
    """
    EPW: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = BLOCK_KW * EPW
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    q_ptrs = q_ptr + word_offsets(offs_n, pid_k * K_SPLIT + tl.arange(0, BLOCK_KW), KW)  # advanced per step
    for step in range(0, K_SPLIT, BLOCK_KW):
        w0 = tl.multiple_of(pid_k * K_SPLIT + step, BLOCK_KW)  # K_SPLIT is a multiple of BLOCK_KW
        kw = w0 + tl.arange(0, BLOCK_KW)
        w_ok = kw < KW
        qw = tl.load(q_ptrs + step * ROWS, mask=n_ok[:, None] & w_ok[None, :], other=0)
        s, z = load_group_params(s_ptr, z_ptr, offs_n, n_ok, kw, w0, KW, N, G, EPW, ONE_GROUP)
        if FOLD:
            ks = w0 * EPW + tl.arange(0, BLOCK_K)
            xt = tl.load(x_rows[None, :] + ks[:, None], mask=(ks < K)[:, None] & m_ok[None, :], other=0.0)
            xs = tl.sum(xt.to(tl.float32), axis=0)
            if HALF_DQ:
                lo = half_tree(qw, magic, 0, 1, EPW // 2, False, BITS, DT)
                hi = half_tree(qw, magic, 0, 1, EPW // 2, True, BITS, DT)
                v = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])
                zb = z + HALF_BASE
            else:
                v = tl.reshape(dq_tree(qw, 1.0, MAGIC_F, magic, 0, 1, EPW, BITS, DT), [BLOCK_N, BLOCK_K])
                zb = z
            if DOT_F32:
                d = tl.dot(v.to(tl.float32), xt.to(tl.float32))
            else:
                d = tl.dot(v, xt)
            acc += s * (d - zb * xs[None, :])
        elif JOIN:
            s, zm = dq_operands(s, z, HALF_BASE, DT, HALF_DQ)
            wt = dq_tile(qw, s, zm, magic, BLOCK_N, BLOCK_KW, BITS, DT, HALF_DQ)
            ks = w0 * EPW + tl.arange(0, BLOCK_K)
            acc = _dot_x(wt, x_rows, ks, ks < K, m_ok, acc, SWAP, DOT_F32)
        else:
            s, zm = dq_operands(s, z, HALF_BASE, DT, HALF_DQ)
            for i in tl.static_range(EPW):
                wi = dq_leaf(qw, s, zm, magic, i, BITS, DT, HALF_DQ)
                acc = _dot_x(wi, x_rows, kw * EPW + i, w_ok, m_ok, acc, SWAP, DOT_F32)
    if SWAP:  # acc[n, m] is y[m, n]: store it through transposed offsets (no layout change of the accumulator)
        mask = n_ok[:, None] & m_ok[None, :]
        if not USE_PART:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(part_ptr + (pid_k * M + offs_m[None, :]).to(tl.int64) * N + offs_n[:, None], acc, mask=mask)
    else:
        mask = m_ok[:, None] & n_ok[None, :]
        if not USE_PART:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(part_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :], acc, mask=mask)


def mma_call(cfg: dict, x2, p, M: int, split: int, k_split: int, has_bias: bool):
    """(kernel, grid, run-time arguments after the common ones, constexprs) of a tensor-core launch under config cfg."""
    half, magic, base = half_dq(cfg, x2, p)
    bm, bn, bkw = cfg["block_m"], cfg["block_n"], cfg["block_kw"]
    join = cfg.get("join", True)
    if not join and bkw < 16:
        raise ValueError("the split (join=False) mma kernel needs block_kw >= 16 (tl.dot's minimum K)")
    one = one_group(p, bkw, k_split)
    fold = bool(cfg.get("fold", False)) and one and cfg.get("swap", False)  # else the dequantizing form
    grid = (cdiv(M, bm) * cdiv(p.N, bn), split)
    consts = dict(BITS=p.container_bits, BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, USE_PART=split > 1,
                  GROUP_M=cfg.get("group_m", 8), ONE_GROUP=one, HAS_BIAS=has_bias,
                  SWAP=cfg.get("swap", False), JOIN=join, HALF_DQ=half, HALF_BASE=base,
                  DOT_F32=backend.interpreting(), FOLD=fold)
    return _mma_kernel, grid, [magic], consts
