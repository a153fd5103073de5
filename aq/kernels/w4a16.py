"""W4A16: packed low-bit weights and the fused dequantize-matmul y = x · dequant(Wq)ᵀ (+ bias), in Triton.

Quantization (done once, at pack time) is aq.primitives' asymmetric scheme per group of g consecutive input columns
(g = 32, 64, 128, ... or the whole row: per output channel), codes q in [0, 2^bits - 1], w_hat = (q - z) * s.

Packed layout (PackedWeight)
----------------------------
- ``qweight``: int32 [ceil(N / 16), K / E, 16] with E = 32 / c codes per word, c the container width: 2 bits for
  bits = 2, 4 bits for bits = 3 and 4, 8 bits for bits = 5..8. Word w of output channel n (holding k = E w ..
  E w + E - 1) is qweight[n // 16, w, n % 16]: the words of 16 consecutive channels are interleaved, so a kernel
  tile of 16 j rows by b words is j runs of 64 b contiguous bytes (2 KB for b = 32) instead of 16 j runs of 4 b bytes
  strided by a whole row; on the H100 this took the M = 1 kernel from 27 to 21.6 us on 4096x14336
  (bench/NOTES-w4a16.md).
  Rows past N (padding to 16) hold code 0. Code k of a word sits at bit offset 16 * (i % 2) + c * (i // 2), i = k % E:
  even codes fill the low half-word, odd codes the high half-word. For 4-bit, word bits 0-3 hold k = 8w, bits 16-19
  k = 8w + 1, bits 4-7 k = 8w + 2, ... This is what makes unpacking cheap: one shift and one AND-OR (LOP3) turn codes
  (2j, 2j + 1) into a packed pair of 16-bit floats base + q (the magic-number trick, base 128 in bf16, 1024 in fp16)
  ready for packed HADD2/HMUL2, and the CUDA-core kernel reads codes in place under an fp32 magic number. A word never
  straddles a group (g % E == 0).
- ``scales``, ``zeros``: [K / g, N] in fp16 or bf16 (row = group, contiguous along N), zeros integer-valued in
  [0, 2^bits - 1] (exact in both dtypes). The scale is rounded to its dtype *before* the codes are chosen, so the codes
  are those of the stored scale.
The weight is reconstructed as (q - z) * s, rounded once to the activation dtype: the dequant and (unfolded) MMA
kernels compute exactly this (q - z is exact through the magic-number trick, the product is one rounding), so their
dequantized weight is bit-identical to ``dequantize_weight``; the GEMV and the folded MMA keep (q - z) * s unrounded
in fp32 (a little closer to exact than the reference, ~2e-3 relative apart in bf16).

Kernels, and the one place that picks them (``select_config``, by M)
--------------------------------------------------------------------
- ``gemv``: CUDA-core split-K kernel for tiny M (one program row per token): per code one LOP3 (mask + fp32 magic,
  in place), one FADD, one FFMA; zero point and scale applied once per word column; fp32 partial sums.
- ``mma``: tensor-core tile kernel (tl.dot, bf16/fp16 operands, fp32 accumulator), optionally split-K, optionally
  "swapped" (computes yᵀ = W xᵀ so the dequantized weight is the left operand, which Hopper's wgmma can take from
  registers), with the dequantized K-tile either fed as E dots over the E code positions of a word (x gathered with a
  stride of E) or joined back to natural K order by a tree of tl.join (one dot, contiguous x).
  With "fold" the dot takes the raw codes and the group's zero point and scale are applied to its fp32 result.
- ``dequant``: for large M, a memory-bound kernel writes the dequantized weight once and cuBLAS does the GEMM.
Split-K partials go to an fp32 buffer reduced (+ bias, cast) by a second small kernel, so results are deterministic.
Host time: after a call shape's first call, its compiled kernels, grids and constants are kept (a launch plan) and
later calls go straight to Triton's C launchers (~35 us of host time per call on the H100 machine instead of ~150).
Configs are tuned per GPU by bench/autotune.py into aq/kernels/configs/<gpu-name>.json and read here; an untuned GPU or
shape falls back to ``heuristic_config``.

The torch reference is ``w4a16_linear_reference`` (built on aq.primitives.dequantize); ``w4a16_linear`` dispatches
through aq.backend (compiled Triton on CUDA, interpreted Triton on CPU under TRITON_INTERPRET=1, else the reference).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from aq import backend, primitives
from aq.kernels import tuned

HALF_DTYPES = (torch.float16, torch.bfloat16)
ROW_BLOCK = 16  # output channels whose words are interleaved in qweight
FAMILY = "w4a16"  # key of this kernel family in the per-GPU config files


def container_bits(bits: int) -> int:
    """Width of the slot a code of `bits` bits is stored in (3-bit codes live in 4-bit slots, 5..7 in bytes)."""
    primitives.check_bits(bits)
    return 2 if bits == 2 else 4 if bits <= 4 else 8


# ----------------------------------------------------------------------------------------------------------- packing
@dataclasses.dataclass
class PackedWeight:
    """A weight [N, K] quantized per group and packed (layout in the module docstring)."""

    qweight: torch.Tensor  # int32 [ceil(N / 16), K // elems_per_word, 16]
    scales: torch.Tensor  # fp16/bf16 [K // group_size, N]
    zeros: torch.Tensor  # same dtype and shape as scales, integer-valued
    bits: int
    group_size: int  # effective group size: K when quantized per output channel
    N: int
    K: int

    @property
    def container_bits(self) -> int:
        return container_bits(self.bits)

    @property
    def elems_per_word(self) -> int:
        return 32 // self.container_bits

    @property
    def per_channel(self) -> bool:
        return self.group_size == self.K

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device) -> "PackedWeight":
        return dataclasses.replace(self, qweight=self.qweight.to(device), scales=self.scales.to(device),
                                   zeros=self.zeros.to(device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


def _check_group(K: int, group_size: int | None, bits: int) -> int:
    g = primitives.check_group_size(K, group_size)
    e = 32 // container_bits(bits)
    if g % e != 0:
        raise ValueError(f"group size {g} must be a multiple of {e} ({bits}-bit codes are packed {e} per int32 along K)"
                         + (f"; per-channel quantization needs K % {e} == 0, got K={K}" if g == K else ""))
    return g


def _code_shifts(cb: int, device) -> torch.Tensor:
    """Bit offset of code i in its word: even codes fill the low 16 bits, odd codes the high 16 bits."""
    i = torch.arange(32 // cb, device=device, dtype=torch.int64)
    return (i % 2) * 16 + (i // 2) * cb


def pack_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None,
               dtype: torch.dtype = torch.bfloat16) -> PackedWeight:
    """Pack integer codes [N, K] with their scale and zero point [N, K // g] (as aq.primitives returns them)."""
    if dtype not in HALF_DTYPES:
        raise ValueError(f"scales and zeros are stored in fp16 or bf16, got {dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K], got shape {tuple(codes.shape)}")
    N, K = codes.shape
    g = _check_group(K, group_size, bits)
    cb, qmax = container_bits(bits), 2**bits - 1
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() > qmax):
        raise ValueError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}] not in [0, {qmax}]")
    if scale.shape != (N, K // g) or zero.shape != (N, K // g):
        raise ValueError(f"scale and zero must be [N, K // g] = {(N, K // g)}, got {tuple(scale.shape)} and "
                         f"{tuple(zero.shape)}")
    z = zero.float()
    if z.numel() and (not torch.equal(z, z.round()) or z.min() < 0 or z.max() > qmax):
        raise ValueError(f"zero points must be integers in [0, {qmax}]")
    e = 32 // cb
    words = (c.view(N, K // e, e) << _code_shifts(cb, c.device)).sum(-1)  # < 2^32: codes occupy disjoint bits
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    n_pad = -N % ROW_BLOCK
    words = torch.cat([words, words.new_zeros(n_pad, K // e)]) if n_pad else words
    words = words.view(-1, ROW_BLOCK, K // e).transpose(1, 2)  # [N / 16, K / E, 16]
    return PackedWeight(qweight=words.contiguous(), scales=scale.t().to(dtype).contiguous(),
                        zeros=z.t().to(dtype).contiguous(), bits=bits, group_size=g, N=N, K=K)


def pack_weight(w: torch.Tensor, bits: int = 4, group_size: int | None = 128, dtype: torch.dtype | None = None,
                scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> PackedWeight:
    """Quantize w [N, K] asymmetrically per group (aq.primitives) and pack it.

    group_size None, 0 or -1 means one group per output channel. dtype (fp16/bf16) is the storage dtype of scales and
    zeros; by default w's dtype if it is fp16/bf16, else bf16. scale / zero [N, K // g] (e.g. from a calibration with
    learned clipping) replace primitives.choose_qparams; the scale is rounded to dtype before the codes are chosen.
    """
    if w.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"weight must be floating point, got {w.dtype}")
    dtype = dtype or (w.dtype if w.dtype in HALF_DTYPES else torch.bfloat16)
    if dtype not in HALF_DTYPES:
        raise ValueError(f"scales and zeros are stored in fp16 or bf16, got {dtype}")
    K = w.shape[1]
    g = _check_group(K, group_size, bits)
    if scale is None:
        scale, zero = primitives.choose_qparams(w, bits, g)
    elif zero is None:
        raise ValueError("pass zero together with scale")
    scale = scale.float().to(dtype).float().clamp(min=primitives.SCALE_EPS)  # the stored scale chooses the codes
    codes = primitives.quantize(w, scale, zero.float(), bits, g)
    return pack_codes(codes, scale, zero, bits, g, dtype)


def unpack_weight(p: PackedWeight) -> torch.Tensor:
    """The codes [N, K] as uint8 (exact inverse of pack_codes)."""
    cb = p.container_bits
    words = p.qweight.transpose(1, 2).reshape(-1, p.qweight.shape[1])[: p.N].to(torch.int64) & 0xFFFFFFFF
    return ((words.unsqueeze(-1) >> _code_shifts(cb, p.device)) & (2**cb - 1)).reshape(p.N, p.K).to(torch.uint8)


def dequantize_weight(p: PackedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight [N, K] as the kernels see it: (q - z) * s in fp32, rounded once to dtype (default the scales')."""
    return primitives.dequantize(unpack_weight(p), p.scales.t().float(), p.zeros.t().float(), p.group_size,
                                 dtype or p.dtype)


def w4a16_linear_reference(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: x · dequantize_weight(p, x.dtype)ᵀ (+ bias), accumulated in fp32, returned in x's dtype."""
    _check_input(x, p, bias)
    w = dequantize_weight(p, x.dtype).float()
    y = x.reshape(-1, p.K).float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], p.N)


def _check_input(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None) -> None:
    if x.dtype not in HALF_DTYPES:
        raise ValueError(f"w4a16_linear takes fp16 or bf16 activations, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != p.K:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 'no'} input features, the packed weight expects K={p.K}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != p.N):
        raise ValueError(f"bias must be [N] = [{p.N}], got shape {tuple(bias.shape)}")


# ----------------------------------------------------------------------------------------------------------- kernels
_MAGIC_F = tl.constexpr(8388608.0)  # 2^23
_ROWS = tl.constexpr(ROW_BLOCK)


@triton.jit
def _word_offsets(offs_n, kw, KW):
    """Offsets of the words (offs_n x kw) in the packed [N / 16, KW, 16] tensor, as a [BN, BKW] tensor."""
    return ((offs_n[:, None] // _ROWS).to(tl.int64) * KW + kw[None, :]) * _ROWS + (offs_n[:, None] % _ROWS)


@triton.jit
def _codes(qw, I: tl.constexpr, BITS: tl.constexpr):
    """Code I of every int32 word of qw (layout: even codes in the low half, odd codes in the high half)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    P: tl.constexpr = (I % 2) * 16 + (I // 2) * BITS
    if P == 0:
        c = qw & MASK
    else:
        c = (qw >> P) & MASK
    return c


@triton.jit
def _dq_leaf(qw, s, zm, magic, I: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, HALF_DQ: tl.constexpr):
    """Code I of each word dequantized to DT: (q - z) * s with q - z exact and one rounding.

    fp32 path: the code OR-ed into the mantissa of 2^23 (magic = its bits) reads as 2^23 + q, and zm = 2^23 + z is
    subtracted (no I2F). HALF_DQ path (GPU only): magic | q read as a 16-bit float is base + q (base 128 in bf16, 1024
    in fp16), zm = base + z and s are in DT. The magic numbers are run-time arguments so that ptxas keeps them in a
    register and fuses the mask and the OR into one LOP3 (as immediates they take two).
    """
    if HALF_DQ:
        v = (_codes(qw, I, BITS) | magic).to(tl.int16).to(DT, bitcast=True)
        out = (v - zm) * s
    else:
        out = (((_codes(qw, I, BITS) | magic).to(tl.float32, bitcast=True) - zm) * s).to(DT)
    return out


@triton.jit
def _dq_tree(qw, s, zm, magic, START: tl.constexpr, STRIDE: tl.constexpr, COUNT: tl.constexpr, BITS: tl.constexpr,
             DT: tl.constexpr):
    """Codes START, START + STRIDE, ... (COUNT of them) of each word, dequantized and joined along new minor axes.

    The top join splits the code index by its lowest bit, the next by the following bit, ..., so that reshaping the
    result [..., 2, 2, 2] to [..., 8] puts code i at position i: natural K order, contiguous per word.
    """
    if COUNT == 1:
        return _dq_leaf(qw, s, zm, magic, START, BITS, DT, False)
    else:
        lo = _dq_tree(qw, s, zm, magic, START, STRIDE * 2, COUNT // 2, BITS, DT)
        hi = _dq_tree(qw, s, zm, magic, START + STRIDE, STRIDE * 2, COUNT // 2, BITS, DT)
        return tl.join(lo, hi)


@triton.jit
def _half_tree(qw, magic2, START: tl.constexpr, STRIDE: tl.constexpr, COUNT: tl.constexpr, HIGH: tl.constexpr,
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
        lo = _half_tree(qw, magic2, START, STRIDE * 2, COUNT // 2, HIGH, BITS, DT)
        hi = _half_tree(qw, magic2, START + STRIDE, STRIDE * 2, COUNT // 2, HIGH, BITS, DT)
        return tl.join(lo, hi)


@triton.jit
def _dq_tile(qw, s, zm, magic, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr,
             HALF_DQ: tl.constexpr):
    """The dequantized [BLOCK_N, BLOCK_KW * E] tile of the words qw [BLOCK_N, BLOCK_KW], in natural K order.

    magic: the fp32 magic bits, or with HALF_DQ the 16-bit float base's bits repeated in both half-words."""
    EPW: tl.constexpr = 32 // BITS
    if HALF_DQ:
        lo = _half_tree(qw, magic, 0, 1, EPW // 2, False, BITS, DT)
        hi = _half_tree(qw, magic, 0, 1, EPW // 2, True, BITS, DT)
        v = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_KW, EPW])
        wt = (v - zm[:, :, None]) * s[:, :, None]
    else:
        wt = _dq_tree(qw, s, zm, magic, 0, 1, EPW, BITS, DT)
    return tl.reshape(wt, [BLOCK_N, BLOCK_KW * EPW])


@triton.jit
def _load_group_params(s_ptr, z_ptr, offs_n, n_ok, kw, w0, KW, N, G, EPW: tl.constexpr, ONE_GROUP: tl.constexpr):
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
    q_ptrs = q_ptr + _word_offsets(offs_n, pid_k * K_SPLIT + tl.arange(0, BLOCK_KW), KW)  # advanced per step
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
            qn = tl.load(q_ptrs + (step + BLOCK_KW) * _ROWS,
                         mask=n_ok[:, None] & ((kn < KW) & (step + BLOCK_KW < K_SPLIT))[None, :], other=0)
        else:
            qw = tl.load(q_ptrs + step * _ROWS, mask=n_ok[:, None] & w_ok[None, :], other=0)
        s, z = _load_group_params(s_ptr, z_ptr, offs_n, n_ok, kw, w0, KW, N, G, EPW, ONE_GROUP)
        qh = qw >> 16
        t = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        xsum = tl.zeros([BLOCK_KW], tl.float32)
        for i in tl.static_range(EPW):
            xi = tl.load(x_row + kw * EPW + i, mask=w_ok, other=0.0).to(tl.float32)
            xsum += xi
            if i % 2 == 0:
                f = ((qw & (MASK << ((i // 2) * BITS))) | magic).to(tl.float32, bitcast=True) - _MAGIC_F
            else:
                f = ((qh & (MASK << ((i // 2) * BITS))) | magic).to(tl.float32, bitcast=True) - _MAGIC_F
            t += f * (xi * (1.0 / (1 << ((i // 2) * BITS))))[None, :]
        acc += s * (t - z * xsum[None, :])
    out = tl.sum(acc, axis=1)
    if not USE_PART:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + pid_m.to(tl.int64) * N + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(part_ptr + (pid_k * M + pid_m).to(tl.int64) * N + offs_n, out, mask=n_ok)


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
    # grouped order: GROUP_M row-tiles share each weight column-tile while it is in L2
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gm = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gm
    pid_n = (pid % width) // gm

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    q_ptrs = q_ptr + _word_offsets(offs_n, pid_k * K_SPLIT + tl.arange(0, BLOCK_KW), KW)  # advanced per step
    for step in range(0, K_SPLIT, BLOCK_KW):
        w0 = tl.multiple_of(pid_k * K_SPLIT + step, BLOCK_KW)  # K_SPLIT is a multiple of BLOCK_KW
        kw = w0 + tl.arange(0, BLOCK_KW)
        w_ok = kw < KW
        qw = tl.load(q_ptrs + step * _ROWS, mask=n_ok[:, None] & w_ok[None, :], other=0)
        s, z = _load_group_params(s_ptr, z_ptr, offs_n, n_ok, kw, w0, KW, N, G, EPW, ONE_GROUP)
        if FOLD:
            ks = w0 * EPW + tl.arange(0, BLOCK_K)
            xt = tl.load(x_rows[None, :] + ks[:, None], mask=(ks < K)[:, None] & m_ok[None, :], other=0.0)
            xs = tl.sum(xt.to(tl.float32), axis=0)
            if HALF_DQ:
                lo = _half_tree(qw, magic, 0, 1, EPW // 2, False, BITS, DT)
                hi = _half_tree(qw, magic, 0, 1, EPW // 2, True, BITS, DT)
                v = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])
                zb = z + HALF_BASE
            else:
                v = tl.reshape(_dq_tree(qw, 1.0, _MAGIC_F, magic, 0, 1, EPW, BITS, DT), [BLOCK_N, BLOCK_K])
                zb = z
            if DOT_F32:
                d = tl.dot(v.to(tl.float32), xt.to(tl.float32))
            else:
                d = tl.dot(v, xt)
            acc += s * (d - zb * xs[None, :])
        elif JOIN:
            if HALF_DQ:
                s = s.to(DT)
                zm = (z + HALF_BASE).to(DT)
            else:
                zm = z + _MAGIC_F
            wt = _dq_tile(qw, s, zm, magic, BLOCK_N, BLOCK_KW, BITS, DT, HALF_DQ)
            ks = w0 * EPW + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            if DOT_F32:
                wt = wt.to(tl.float32)
            if SWAP:
                xt = tl.load(x_rows[None, :] + ks[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
                if DOT_F32:
                    xt = xt.to(tl.float32)
                acc = tl.dot(wt, xt, acc)
            else:
                xt = tl.load(x_rows[:, None] + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                if DOT_F32:
                    xt = xt.to(tl.float32)
                acc = tl.dot(xt, tl.trans(wt), acc)
        else:
            if HALF_DQ:
                s = s.to(DT)
                zm = (z + HALF_BASE).to(DT)
            else:
                zm = z + _MAGIC_F
            for i in tl.static_range(EPW):
                wi = _dq_leaf(qw, s, zm, magic, i, BITS, DT, HALF_DQ)
                ks = kw * EPW + i
                if DOT_F32:
                    wi = wi.to(tl.float32)
                if SWAP:
                    xi = tl.load(x_rows[None, :] + ks[:, None], mask=w_ok[:, None] & m_ok[None, :], other=0.0)
                    if DOT_F32:
                        xi = xi.to(tl.float32)
                    acc = tl.dot(wi, xi, acc)
                else:
                    xi = tl.load(x_rows[:, None] + ks[None, :], mask=m_ok[:, None] & w_ok[None, :], other=0.0)
                    if DOT_F32:
                        xi = xi.to(tl.float32)
                    acc = tl.dot(xi, tl.trans(wi), acc)
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
    qw = tl.load(q_ptr + _word_offsets(offs_n, kw, KW), mask=n_ok[:, None] & w_ok[None, :], other=0)
    s, z = _load_group_params(s_ptr, z_ptr, offs_n, n_ok, kw, w0, KW, N, G, EPW, ONE_GROUP)
    if HALF_DQ:
        s = s.to(DT)
        zm = (z + HALF_BASE).to(DT)
    else:
        zm = z + _MAGIC_F
    wt = _dq_tile(qw, s, zm, magic, BLOCK_N, BLOCK_KW, BITS, DT, HALF_DQ)
    ks = w0 * EPW + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * K + ks[None, :], wt, mask=n_ok[:, None] & (ks < K)[None, :])


@triton.jit
def _splitk_reduce_kernel(part_ptr, b_ptr, y_ptr, MN, N, SPLIT_K, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = sum of the split-K partials [SPLIT_K, M, N] (+ bias), cast to y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------- configs
def m_bucket(M: int) -> int:
    """The M bucket configs are tuned for: the next power of two, capped at 16384."""
    return min(1 << max(M - 1, 0).bit_length(), 16384)


def shape_key(bits: int, group_size: int, K: int, N: int) -> str:
    return f"{container_bits(bits)}:{group_size}:{K}:{N}"


def _tuned_table(device_index: int) -> dict:
    return tuned.tuned(FAMILY, torch.cuda.get_device_name(device_index)) or {}


def heuristic_config(M: int, N: int, K: int, bits: int, group_size: int, num_sms: int = 132,
                     interpreting: bool = False) -> dict:
    """A sound config without tuning (also what the interpreter runs, with few large programs there)."""
    e = 32 // container_bits(bits)
    kw = K // e
    if interpreting:
        if M <= 4:
            return dict(kernel="gemv", block_n=64, block_kw=min(64, triton.next_power_of_2(kw)), split_k=1)
        return dict(kernel="mma", block_m=min(64, max(16, triton.next_power_of_2(M))), block_n=64,
                    block_kw=max(16, min(64, triton.next_power_of_2(kw))), split_k=1, swap=False, join=True)

    def split_for(tiles: int, bkw: int, waves: int) -> int:
        return max(1, min(triton.cdiv(waves * num_sms, tiles), triton.cdiv(kw, 2 * bkw)))

    if M == 1:  # what the H100 tuning picked on every LLaMA shape
        bn, bkw = 64, max(16, 256 // e)
        return dict(kernel="gemv", block_n=bn, block_kw=bkw, split_k=split_for(triton.cdiv(N, bn), bkw, 2),
                    prefetch=True, num_warps=4, num_stages=1)
    if M <= 64:
        bm, bn, bkw = max(16, triton.next_power_of_2(M)), 64, max(2, 128 // e)
        return dict(kernel="mma", block_m=bm, block_n=bn, block_kw=bkw, swap=True, join=True, half_dq=True,
                    split_k=split_for(triton.cdiv(N, bn) * triton.cdiv(M, bm), bkw, 2), num_warps=4, num_stages=3)
    if M <= 256:
        return dict(kernel="mma", block_m=128 if M <= 128 else 256, block_n=128, block_kw=max(2, 64 // e),
                    split_k=1, swap=True, join=True, half_dq=True, group_m=8, num_warps=8, num_stages=3)
    return dict(kernel="dequant", block_n=16, block_kw=max(2, 512 // e), half_dq=True, num_warps=4)


def adapt_config(cfg: dict, src_key: str, src_bucket: int, M: int, N: int, K: int, bits: int, group_size: int,
                 num_sms: int, donor_sms: int) -> dict:
    """A tuned config moved to a neighbouring problem: block shapes kept (they are what transfers between shapes), the
    split-K count re-derived so the grid fills the GPU as many times over as it did on the tuned problem, and options
    the new shape cannot take dropped (K step over K, folding across a group boundary)."""
    _, _, sK, sN = (int(v) for v in src_key.split(":"))
    e = 32 // container_bits(bits)
    kw = K // e
    out = {k: v for k, v in cfg.items() if k != "us"}
    if out["kernel"] == "dequant":
        out["block_kw"] = min(out["block_kw"], 1 << max(kw.bit_length() - 1, 1))
        return out
    bkw = min(out["block_kw"], 1 << max(kw.bit_length() - 1, 1))
    if out["kernel"] == "mma" and not out.get("join", True):
        bkw = max(bkw, 16)
    out["block_kw"] = bkw
    bm, bn = out.get("block_m", 1), out["block_n"]
    tiles = lambda m, n: (triton.cdiv(m, bm) if out["kernel"] == "mma" else m) * triton.cdiv(n, bn)  # noqa: E731
    waves = tiles(src_bucket, sN) * cfg.get("split_k", 1) / donor_sms  # how often the tuned grid filled the GPU
    split = round(waves * num_sms / tiles(M, N))
    out["split_k"] = max(1, min(split, triton.cdiv(kw, 2 * bkw)))
    if out.get("fold") and group_size % (bkw * e):
        out["fold"] = False
    return out


def fallback_config(M: int, N: int, K: int, bits: int, group_size: int, device_name: str, num_sms: int,
                    exclude: str | None = None) -> dict:
    """The config for an untuned (shape, M) or GPU: the nearest tuned shape and M bucket of this GPU's table (or the
    closest shipped GPU's), by K, N and M in log space, adapted to this problem (adapt_config); heuristic_config only
    when no table holds this container width. See aq.kernels.tuned for why there is no tuning at first call."""
    donor = tuned.donor_table(FAMILY, device_name, num_sms)
    if donor:
        table, _, donor_sms = donor
        hit = tuned.nearest_shape([k for k in table if k != exclude], container_bits(bits), group_size, K, N, m_bucket(M),
                                  lambda k: [int(b) for b in table[k]])
        if hit:
            key, b = hit
            return adapt_config(table[key][str(b)], key, b, M, N, K, bits, group_size, num_sms, donor_sms)
    return heuristic_config(M, N, K, bits, group_size, num_sms)


@functools.lru_cache(maxsize=4096)
def _select(device_index: int, bits: int, group_size: int, K: int, N: int, M: int) -> dict:
    # AQ_FALLBACK (read once per problem, for measurements): "nearest" hides the problem's own tuned entry, so the
    # fallback is timed on tuned shapes; "heuristic" also bypasses the neighbour search (the generic rule)
    mode = os.environ.get("AQ_FALLBACK", "").lower()
    key = shape_key(bits, group_size, K, N)
    entry = _tuned_table(device_index).get(key) if mode not in ("nearest", "heuristic") else None
    cfg = entry.get(str(m_bucket(M))) if entry else None
    if cfg:
        return cfg
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    if mode == "heuristic":
        return heuristic_config(M, N, K, bits, group_size, sms)
    return fallback_config(M, N, K, bits, group_size, torch.cuda.get_device_name(device_index), sms,
                           exclude=key if mode == "nearest" else None)


def select_config(M: int, p: PackedWeight, x: torch.Tensor) -> dict:
    """The one place that picks the kernel and its config for a call (by M): the tuned table of this GPU
    (aq/kernels/configs/<gpu>.json, bucket = next power of two of M), else fallback_config (nearest tuned neighbour).
    Do not mutate the result."""
    if x.device.type == "cuda":
        idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
        return _select(idx, p.bits, p.group_size, p.K, p.N, M)
    return heuristic_config(M, p.N, p.K, p.bits, p.group_size, interpreting=backend.interpreting())


# ----------------------------------------------------------------------------------------------------------- launch
_FP32_MAGIC = 0x4B000000  # the bits of the fp32 2^23: OR-ing an integer c < 2^23 into them reads 2^23 + c
_COMPILED: dict = {}  # launch key -> Triton CompiledKernel (fast path that skips Triton's Python launcher)
_PLANS: dict = {}  # call key -> _Plan: everything about a small-M call but its tensors, decided once


def _spec(a) -> object:
    """What Triton specializes an argument on, conservatively: pointer dtype and 16-byte alignment; for ints % 16,
    == 1 and 32-bit range."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, int):
        return (a % 16 == 0, a == 1, -(2**31) <= a < 2**31)
    return type(a)


def _hooks() -> tuple:
    enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
    active = bool(getattr(enter, "calls", enter)) or bool(getattr(leave, "calls", leave))
    return (enter, leave) if active else (None, None)


def _run_compiled(kernel, grid: tuple, args: list, device_index: int) -> None:
    g = tuple(grid) + (1,) * (3 - len(grid))
    stream = torch._C._cuda_getCurrentRawStream(device_index)  # what Triton's launcher itself uses
    enter, leave = _hooks()
    meta = kernel.launch_metadata(g, stream, *args) if enter is not None else None
    kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, meta, enter, leave, *args)


def _launch(fn, grid: tuple, args: list, consts: dict, num_warps: int = 4, num_stages: int = 3):
    """fn[grid](*args, **consts), minus the per-call Python work of Triton's launcher; returns the compiled kernel
    (None in the interpreter).

    The first launch of a (kernel, constants, argument specialization) goes through Triton's launcher, which compiles
    (or loads from its cache) and returns the compiled kernel; later launches call that kernel's C launcher directly
    (measured on the H100 machine: Triton's launcher took ~70 us of host time per launch, more than do_bench's L2 flush
    hides). Launch hooks (profilers) are honoured as Triton does. Arguments must be in the kernel's parameter order,
    runtime ones first, then the constexprs in `consts` in order.
    """
    if not args[0].is_cuda:
        fn[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
        return None
    key = (fn, num_warps, num_stages, args[0].device.index, tuple(consts.values()), tuple(_spec(a) for a in args))
    kernel = _COMPILED.get(key)
    if kernel is None:
        kernel = fn[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
        if kernel is not None and hasattr(kernel, "launch_metadata"):
            _COMPILED[key] = kernel
        return kernel
    _run_compiled(kernel, grid, list(args) + list(consts.values()), args[0].device.index)
    return kernel


def _half_dq(cfg: dict, x: torch.Tensor, p: PackedWeight) -> tuple[bool, int, float]:
    """Whether the 16-bit dequantization is usable (GPU, scales in x's dtype, base + code exact in it), with the magic
    bits to pass (the 16-bit base in both half-words, or the fp32 2^23) and the base."""
    h, base = (0x4300, 128.0) if x.dtype == torch.bfloat16 else (0x6400, 1024.0)
    ok = (cfg.get("half_dq", False) and not backend.interpreting() and p.dtype == x.dtype
          and (x.dtype == torch.float16 or p.container_bits <= 4))
    return ok, (h * 65537 if ok else _FP32_MAGIC), base


def _splits(KW: int, block_kw: int, split_k: int) -> tuple[int, int]:
    """Words per split (a multiple of block_kw) and the number of non-empty splits."""
    k_split = triton.cdiv(triton.cdiv(KW, max(1, split_k)), block_kw) * block_kw
    return k_split, triton.cdiv(KW, k_split)


def _one_group(p: PackedWeight, block_kw: int, k_split: int) -> bool:
    bk = block_kw * p.elems_per_word
    return p.group_size % bk == 0 and (k_split * p.elems_per_word) % bk == 0


def dequantize_weight_triton(p: PackedWeight, dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """The weight [N, K] in dtype from the Triton dequantization kernel (bit-identical to dequantize_weight)."""
    cfg = config or dict(kernel="dequant", block_n=16, block_kw=max(2, 512 // p.elems_per_word), half_dq=True)
    w = torch.empty(p.N, p.K, device=p.device, dtype=dtype)
    if backend.interpreting():
        cfg = dict(cfg, block_n=64)  # few programs in the interpreter
    half, magic, base = _half_dq(cfg, w, p)
    KW, bn, bkw = p.qweight.shape[1], cfg["block_n"], cfg["block_kw"]
    _launch(_dequant_kernel, (triton.cdiv(p.N, bn), triton.cdiv(KW, bkw)),
            [p.qweight, p.scales, p.zeros, w, p.N, p.K, KW, p.group_size, magic],
            dict(BITS=p.container_bits, BLOCK_N=bn, BLOCK_KW=bkw, ONE_GROUP=_one_group(p, bkw, bkw), HALF_DQ=half,
                 HALF_BASE=base), num_warps=cfg.get("num_warps", 4), num_stages=1)
    return w


def w4a16_linear_triton(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None = None,
                        config: dict | None = None) -> torch.Tensor:
    """The Triton path (compiled on CUDA, interpreted on CPU); config overrides select_config."""
    _check_input(x, p, bias)
    x2 = x.reshape(-1, p.K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, N, K = x2.shape[0], p.N, p.K
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    if config is None and x2.is_cuda:
        pkey = (M, N, K, p.bits, p.group_size, x2.dtype, p.dtype, x2.stride(0), x2.device.index,
                None if bias is None else _spec(bias),
                tuple(t.data_ptr() % 16 == 0 for t in (x2, p.qweight, p.scales, p.zeros)))
        plan = _PLANS.get(pkey)
        if plan is not None and _hooks()[0] is None:
            return plan(x2, p, bias).reshape(*x.shape[:-1], N)
    else:
        pkey = None
    cfg = config if config is not None else select_config(M, p, x2)
    kind = cfg["kernel"]
    if kind == "dequant":
        w = dequantize_weight_triton(p, x.dtype, cfg)
        if x2.is_cuda:
            y = torch.nn.functional.linear(x2, w, bias)
        else:  # CPU (interpreter): half matmuls there are slow or missing
            y = torch.nn.functional.linear(x2.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
        return y.reshape(*x.shape[:-1], N)
    bits, KW, G = p.container_bits, p.qweight.shape[1], p.group_size
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    b = bias if bias is not None else y  # a valid pointer when HAS_BIAS is off
    bkw = cfg["block_kw"]
    k_split, split = _splits(KW, bkw, cfg.get("split_k", 1))
    part = torch.empty(split, M, N, device=x.device, dtype=torch.float32) if split > 1 else y
    args = [x2, p.qweight, p.scales, p.zeros, b, y, part, M, N, K, KW, G, k_split, x2.stride(0)]
    nw, ns = cfg.get("num_warps", 4), cfg.get("num_stages", 3)
    if kind == "gemv":
        grid = (M, triton.cdiv(N, cfg["block_n"]), split)
        consts = dict(BITS=bits, BLOCK_N=cfg["block_n"], BLOCK_KW=bkw, USE_PART=split > 1,
                     ONE_GROUP=_one_group(p, bkw, k_split), HAS_BIAS=bias is not None,
                     PREFETCH=cfg.get("prefetch", False))
        main = _launch(_gemv_kernel, grid, args + [_FP32_MAGIC], consts, nw, ns)
        extra = [_FP32_MAGIC]
    elif kind == "mma":
        half, magic, base = _half_dq(cfg, x2, p)
        bm, bn = cfg["block_m"], cfg["block_n"]
        join = cfg.get("join", True)
        if not join and bkw < 16:
            raise ValueError("the split (join=False) mma kernel needs block_kw >= 16 (tl.dot's minimum K)")
        one = _one_group(p, bkw, k_split)
        fold = bool(cfg.get("fold", False)) and one and cfg.get("swap", False)  # else the dequantizing form
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split)
        consts = dict(BITS=bits, BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, USE_PART=split > 1,
                      GROUP_M=cfg.get("group_m", 8), ONE_GROUP=one, HAS_BIAS=bias is not None,
                      SWAP=cfg.get("swap", False), JOIN=join, HALF_DQ=half, HALF_BASE=base,
                      DOT_F32=backend.interpreting(), FOLD=fold)
        main = _launch(_mma_kernel, grid, args + [magic], consts, nw, ns)
        extra = [magic]
    else:
        raise ValueError(f"unknown w4a16 kernel {kind!r}")
    red = None
    if split > 1:
        MN = M * N
        red = _launch(_splitk_reduce_kernel, (triton.cdiv(MN, 1024),), [part, b, y, MN, N, split],
                      dict(HAS_BIAS=bias is not None, BLOCK=1024), 4, 1)
    if pkey is not None and main is not None and (split == 1 or red is not None):
        _PLANS[pkey] = _Plan(main, grid, extra + list(consts.values()), red, split, k_split)
    return y.reshape(*x.shape[:-1], N)


class _Plan:
    """A decided small-M call: compiled kernels, grids and constants; per call only the output (and split-K
    partials) are allocated and the C launchers called (a few us of host time)."""

    def __init__(self, main, grid, tail, red, split, k_split):
        self.main, self.grid, self.tail, self.red, self.split, self.k_split = main, grid, tail, red, split, k_split

    def __call__(self, x2, p, bias):
        M, N, K = x2.shape[0], p.N, p.K
        y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
        b = bias if bias is not None else y
        part = torch.empty(self.split, M, N, device=x2.device, dtype=torch.float32) if self.split > 1 else y
        dev = x2.device.index
        _run_compiled(self.main, self.grid, [x2, p.qweight, p.scales, p.zeros, b, y, part, M, N, K,
                                             p.qweight.shape[1], p.group_size, self.k_split, x2.stride(0)]
                      + self.tail, dev)
        if self.split > 1:
            MN = M * N
            _run_compiled(self.red, (triton.cdiv(MN, 1024),), [part, b, y, MN, N, self.split, bias is not None,
                                                                1024], dev)
        return y


def w4a16_linear(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """y = x · dequant(p)ᵀ (+ bias) for x [..., K] in fp16/bf16, on whichever path aq.backend picks."""
    tensors = [x, p.qweight, p.scales, p.zeros] + ([bias] if bias is not None else [])
    if backend.choose(*tensors) == backend.TRITON:
        return w4a16_linear_triton(x, p, bias, config)
    return w4a16_linear_reference(x, p, bias)
