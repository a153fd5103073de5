"""W4A16 dequantization in registers (the jit helpers every W4A16 kernel calls) and the large-M strategy built on them:
a memory-bound kernel that writes the dequantized weight once, for cuBLAS to multiply (aq.kernels.w4a16 dispatches).
Word layout: aq.packing (W4A16 words); the magic-number tricks: aq/kernels/w4a16.py's docstring.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from aq import backend
from aq.kernels.common import cdiv, launch
from aq.packing import W4A16_ROW_BLOCK

MAGIC_F = tl.constexpr(8388608.0)  # 2^23
ROWS = tl.constexpr(W4A16_ROW_BLOCK)
FP32_MAGIC = 0x4B000000  # the bits of the fp32 2^23: OR-ing an integer c < 2^23 into them reads 2^23 + c

if TYPE_CHECKING:
    from aq.kernels.w4a16 import PackedWeight


@triton.jit
def word_offsets(offs_n, kw, KW):
    """Offsets of the words (offs_n x kw) in the packed [N / 16, KW, 16] tensor, as a [BN, BKW] tensor."""
    return ((offs_n[:, None] // ROWS).to(tl.int64) * KW + kw[None, :]) * ROWS + (offs_n[:, None] % ROWS)


@triton.jit
def word_code(qw, I: tl.constexpr, BITS: tl.constexpr):
    """Code I of every int32 word of qw (layout: even codes in the low half, odd codes in the high half)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    P: tl.constexpr = (I % 2) * 16 + (I // 2) * BITS
    if P == 0:
        c = qw & MASK
    else:
        c = (qw >> P) & MASK
    return c


@triton.jit
def dq_leaf(qw, s, zm, magic, I: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, HALF_DQ: tl.constexpr):
    """Code I of each word dequantized to DT: (q - z) * s with q - z exact and one rounding.

    fp32 path: the code OR-ed into the mantissa of 2^23 (magic = its bits) reads as 2^23 + q, and zm = 2^23 + z is
    subtracted (no I2F). HALF_DQ path (GPU only): magic | q read as a 16-bit float is base + q (base 128 in bf16, 1024
    in fp16), zm = base + z and s are in DT. The magic numbers are run-time arguments so that ptxas keeps them in a
    register and fuses the mask and the OR into one LOP3 (as immediates they take two).
    """
    if HALF_DQ:
        v = (word_code(qw, I, BITS) | magic).to(tl.int16).to(DT, bitcast=True)
        out = (v - zm) * s
    else:
        out = (((word_code(qw, I, BITS) | magic).to(tl.float32, bitcast=True) - zm) * s).to(DT)
    return out


@triton.jit
def dq_tree(qw, s, zm, magic, START: tl.constexpr, STRIDE: tl.constexpr, COUNT: tl.constexpr, BITS: tl.constexpr,
             DT: tl.constexpr):
    """Codes START, START + STRIDE, ... (COUNT of them) of each word, dequantized and joined along new minor axes.

    The top join splits the code index by its lowest bit, the next by the following bit, ..., so that reshaping the
    result [..., 2, 2, 2] to [..., 8] puts code i at position i: natural K order, contiguous per word.
    """
    if COUNT == 1:
        return dq_leaf(qw, s, zm, magic, START, BITS, DT, False)
    else:
        lo = dq_tree(qw, s, zm, magic, START, STRIDE * 2, COUNT // 2, BITS, DT)
        hi = dq_tree(qw, s, zm, magic, START + STRIDE, STRIDE * 2, COUNT // 2, BITS, DT)
        return tl.join(lo, hi)


@triton.jit
def half_tree(qw, magic2, START: tl.constexpr, STRIDE: tl.constexpr, COUNT: tl.constexpr, HIGH: tl.constexpr,
               BITS: tl.constexpr, DT: tl.constexpr):
    """base + code, as DT, of the code pairs START, START + STRIDE, ... of each word; low (even codes) or high half.

    Pair j of a word is (code 2j, code 2j + 1) at bits (BITS * j, 16 + BITS * j): one shift and one LOP3 give both as
    a 16-bit-float pair (magic2 = the base's bits in both halves), which packed HADD2/HMUL2 then dequantize.
    """
    if COUNT == 1:
        PMASK: tl.constexpr = ((1 << BITS) - 1) * 65537
        if START == 0:
            t = (qw & PMASK) | magic2
        else:
            t = ((qw >> (START * BITS)) & PMASK) | magic2
        if HIGH:
            h = (t >> 16).to(tl.int16)
        else:
            h = t.to(tl.int16)
        return h.to(DT, bitcast=True)
    else:
        lo = half_tree(qw, magic2, START, STRIDE * 2, COUNT // 2, HIGH, BITS, DT)
        hi = half_tree(qw, magic2, START + STRIDE, STRIDE * 2, COUNT // 2, HIGH, BITS, DT)
        return tl.join(lo, hi)


@triton.jit
def dq_tile(qw, s, zm, magic, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr,
             HALF_DQ: tl.constexpr):
    """The dequantized [BLOCK_N, BLOCK_KW * E] tile of the words qw [BLOCK_N, BLOCK_KW], in natural K order.

    magic: the fp32 magic bits, or with HALF_DQ the 16-bit float base's bits repeated in both half-words."""
    EPW: tl.constexpr = 32 // BITS
    if HALF_DQ:
        lo = half_tree(qw, magic, 0, 1, EPW // 2, False, BITS, DT)
        hi = half_tree(qw, magic, 0, 1, EPW // 2, True, BITS, DT)
        v = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_KW, EPW])
        wt = (v - zm[:, :, None]) * s[:, :, None]
    else:
        wt = dq_tree(qw, s, zm, magic, 0, 1, EPW, BITS, DT)
    return tl.reshape(wt, [BLOCK_N, BLOCK_KW * EPW])


@triton.jit
def dq_operands(s, z, HALF_BASE: tl.constexpr, DT: tl.constexpr, HALF_DQ: tl.constexpr):
    """(scale, offset zero point) as dq_leaf / dq_tile take them: in DT with base + z (HALF_DQ), else fp32 with
    2^23 + z."""
    if HALF_DQ:
        s_out = s.to(DT)
        zm = (z + HALF_BASE).to(DT)
    else:
        s_out = s
        zm = z + MAGIC_F
    return s_out, zm


@triton.jit
def load_group_params(s_ptr, z_ptr, offs_n, n_ok, kw, w0, KW, N, G, EPW: tl.constexpr, ONE_GROUP: tl.constexpr):
    """Scale and zero of the words kw (all in one group when ONE_GROUP) as fp32, shaped to broadcast on [BN, BKW]."""
    if ONE_GROUP:
        grp = (w0 * EPW) // G
        m = n_ok & (w0 < KW)
        s = tl.load(s_ptr + grp * N + offs_n, mask=m, other=0.0).to(tl.float32)[:, None]
        z = tl.load(z_ptr + grp * N + offs_n, mask=m, other=0.0).to(tl.float32)[:, None]
    else:
        grp = (kw * EPW) // G
        m = n_ok[:, None] & (kw < KW)[None, :]
        off = grp[None, :] * N + offs_n[:, None]
        s = tl.load(s_ptr + off, mask=m, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + off, mask=m, other=0.0).to(tl.float32)
    return s, z



@triton.jit
def _dequant_kernel(
    q_ptr, s_ptr, z_ptr, w_ptr, N, K, KW, G, magic,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, ONE_GROUP: tl.constexpr,
    HALF_DQ: tl.constexpr, HALF_BASE: tl.constexpr,
):
    """Writes the dequantized weight [N, K] in w's dtype (for the large-M path: dequantize once, then cuBLAS)."""
    EPW: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = BLOCK_KW * EPW
    DT: tl.constexpr = w_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w0 = pid_k * BLOCK_KW
    kw = w0 + tl.arange(0, BLOCK_KW)
    w_ok = kw < KW
    qw = tl.load(q_ptr + word_offsets(offs_n, kw, KW), mask=n_ok[:, None] & w_ok[None, :], other=0)
    s, z = load_group_params(s_ptr, z_ptr, offs_n, n_ok, kw, w0, KW, N, G, EPW, ONE_GROUP)
    s, zm = dq_operands(s, z, HALF_BASE, DT, HALF_DQ)
    wt = dq_tile(qw, s, zm, magic, BLOCK_N, BLOCK_KW, BITS, DT, HALF_DQ)
    ks = w0 * EPW + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * K + ks[None, :], wt, mask=n_ok[:, None] & (ks < K)[None, :])



def half_dq(cfg: dict, x: torch.Tensor, p: PackedWeight) -> tuple[bool, int, float]:
    """Whether the 16-bit dequantization is usable (GPU, scales in x's dtype, base + code exact in it), with the magic
    bits to pass (the 16-bit base in both half-words, or the fp32 2^23) and the base."""
    h, base = (0x4300, 128.0) if x.dtype == torch.bfloat16 else (0x6400, 1024.0)
    ok = (cfg.get("half_dq", False) and not backend.interpreting() and p.dtype == x.dtype
          and (x.dtype == torch.float16 or p.container_bits <= 4))
    return ok, (h * 65537 if ok else FP32_MAGIC), base



def one_group(p: PackedWeight, block_kw: int, k_split: int) -> bool:
    bk = block_kw * p.elems_per_word
    return p.group_size % bk == 0 and (k_split * p.elems_per_word) % bk == 0



def dequantize_weight_triton(p: PackedWeight, dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """The weight [N, K] in dtype from the Triton dequantization kernel (bit-identical to dequantize_weight)."""
    cfg = config or dict(kernel="dequant", block_n=16, block_kw=max(2, 512 // p.elems_per_word), half_dq=True)
    w = torch.empty(p.N, p.K, device=p.device, dtype=dtype)
    if backend.interpreting():
        cfg = dict(cfg, block_n=64)  # few programs in the interpreter
    half, magic, base = half_dq(cfg, w, p)
    KW, bn, bkw = p.qweight.shape[1], cfg["block_n"], cfg["block_kw"]
    launch(_dequant_kernel, (cdiv(p.N, bn), cdiv(KW, bkw)),
            [p.qweight, p.scales, p.zeros, w, p.N, p.K, KW, p.group_size, magic],
            dict(BITS=p.container_bits, BLOCK_N=bn, BLOCK_KW=bkw, ONE_GROUP=one_group(p, bkw, bkw), HALF_DQ=half,
                 HALF_BASE=base), num_warps=cfg.get("num_warps", 4), num_stages=1)
    return w

