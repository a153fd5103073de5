"""W4A4 on int8 tensor cores: per-token activation quantization (fused with the norm and transform before it), int4
weight packing, and an int8 x int8 -> int32 GEMM with a fused dequantizing epilogue. Hopper has no int4 tensor cores, so
int4 is the storage format and int8 the arithmetic.

Public API
----------
- ``pack_w4a4_weight(w, wbits=4, symmetric=False, scale=None, zero=None) -> W4A4Weight``
  Per-output-channel quantization of w [N, K] (codes of ``aq.primitives.quantize``), packed two codes per byte, plus the
  per-channel scale, zero point and row sum of the codes (for the zero-point correction in the GEMM epilogue).
  Pass ``scale``/``zero`` ([N]) to pack with calibrated qparams (e.g. learned clipping) instead of min/max ones.
- ``quantize_activation(x, bits=4, symmetric=False, norm=None, norm_weight=None, norm_bias=None, norm_eps=1e-6,
  transform=None) -> QuantizedActivation(q, scale, zero, code_sum)``
  Per-token quantization of x [..., K]: q int8 codes in [0, 2^bits - 1] (exactly those of
  ``primitives.quantize(y, *primitives.choose_qparams(y, bits, None, symmetric), bits)``), scale float32 [...],
  zero int32 [...], code_sum int32 [...] (sum of each token's codes). y is x itself (``norm=None``), or
  ``norm(x) * norm_weight (+ norm_bias)`` with ``norm="rms"`` or ``"layer"``; then optionally times a diagonal
  (``transform`` of shape [K]) or right-multiplied block by block by a block-diagonal matrix (``transform`` of shape
  [K // h, h, h]: ``y[:, b*h:(b+1)*h] @ transform[b]``; h a power of two >= 16). Without a block-diagonal transform
  it is one kernel and the normalized row never goes to memory; a block-diagonal transform takes two kernels (the
  products, block-parallel, through a float32 buffer, then the norm and quantization). Rows longer than 16384 go
  through a chunked kernel. bits 2..7 (codes must fit an int8 operand); with ``signed=True`` bits 2..8 and the
  codes, zero point and code sum are stored shifted by -2^(bits-1) (int8 containers of aq.kernels.w8a8: q - z and
  the dequantized values are unchanged).
- ``w4a4_matmul(a: QuantizedActivation, weight: W4A4Weight, bias=None, out_dtype=torch.float16) -> y [..., N]``
  y = ((qa - za) sa) ((qw - zw) sw)^T + bias. ``out_dtype=torch.int32`` returns the exact integer sum_k (qa-za)(qw-zw).
- ``w4a4_linear(x, weight, bias=None, *, abits=4, a_symmetric=False, norm=..., transform=..., out_dtype=None)``:
  both steps; out_dtype defaults to x's dtype (float32 for float32 inputs).
- References in plain torch beside them: ``quantize_activation_reference``, ``w4a4_matmul_reference``. Also
  ``pick_config(M, N, K, device)`` (the dispatch) and ``unpack_weight_int8``.
All calls go through ``aq.backend``: compiled Triton on CUDA, interpreted Triton on CPU under TRITON_INTERPRET=1, the
torch references otherwise.

Formats
-------
- Weight codes, [N, Kh] uint8 with Kh = ceil(K / 2): byte j of row n holds code k = j in its low nibble and code
  k = Kh + j in its high nibble (0 past K). A K-step of the GEMM loads one [BLOCK_N, BLOCK_KH] byte tile and gets two
  int8 operand tiles (``p & 15`` and ``p >> 4``) whose activation partners are two contiguous column ranges of A, so no
  interleaving is needed in registers.
- Epilogue: with acc = sum_k qa qw (unsigned codes, int8 operands, int32 accumulator),
  sum_k (qa - za)(qw - zw) = acc - za * Rw[n] - zw[n] * Ra[m] + K za zw, Rw the weight code row sums (pack time) and
  Ra the activation code row sums (written by the quantization kernel). All of it is exact int32; one float multiply
  by sa * sw, plus bias, gives the output.
- Activation codes are exact: min/max, scale and zero point follow aq.primitives operation by operation; the division
  y / scale is correctly rounded (an IEEE reciprocal per row, then one FMA refinement step per element in compiled code,
  tl.div_rn in the interpreter), so codes equal those of aq.primitives on the CPU. (torch on CUDA divides a tensor by a
  Python scalar through its reciprocal, so primitives run on a GPU can differ from the CPU by an ulp in the scale:
  compare kernels with the CPU reference.) Fused norms/transforms round differently from the float32 reference and
  may move a code by one at a near-tie.

GEMM kernels and dispatch
-------------------------
Dispatch by M lives in ``pick_config`` alone: small M runs the "swap" form (the weight tile is the wide side of the
dot, the few tokens the narrow side), larger M the plain tiled form; per M bucket the block shapes and options come
from the "w4a4" entry of ``configs/<GPU_NAME>.json`` (aq.kernels.tuned) when present (written by ``bench/w4a4.py sweep``), else from DEFAULT_CONFIGS (the
H100 winners). Options: TMA (tensor-descriptor loads; used when K % 32 == 0 and the K tiles divide), W8 (large M: the
weight is unpacked to int8 in one extra pass, so both operands go straight from TMA to the tensor cores), SPLIT (split-K
with self-resetting per-device tile counters: one such GEMM at a time per device; allocate them outside CUDA-graph
capture by calling once first). Measured on the H100 (bench/results/w4a4.md): 1.9-3.0x cuBLAS bf16 at M <= 16 for the
GEMM alone, 1.10-1.34x at M >= 2048 (above cuBLAS int8).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from aq import backend, primitives
from aq.kernels import tuned
from aq.kernels.norm import apply_transform, check_transform

__all__ = [
    "W4A4Weight", "QuantizedActivation", "pack_w4a4_weight", "unpack_w4a4_codes", "quantize_activation",
    "quantize_activation_reference", "w4a4_matmul", "w4a4_matmul_reference", "w4a4_linear", "pick_config",
    "unpack_weight_int8",
]

_NORMS = {None: 0, "rms": 1, "layer": 2}
_MAX_ROW_BLOCK = 16384  # rows up to this many columns are quantized with the whole row in registers
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int32)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class W4A4Weight:
    """A linear weight [N, K] quantized per output channel and packed two codes per byte (layout in the module doc)."""
    packed: torch.Tensor    # uint8 [N, ceil(K/2)]
    scale: torch.Tensor     # float32 [N]
    zero: torch.Tensor      # int32 [N]
    code_sum: torch.Tensor  # int32 [N], sum over k of the codes
    N: int
    K: int
    bits: int = 4
    symmetric: bool = False

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> "W4A4Weight":
        return W4A4Weight(self.packed.to(device), self.scale.to(device), self.zero.to(device),
                          self.code_sum.to(device), self.N, self.K, self.bits, self.symmetric)

    def codes(self) -> torch.Tensor:
        """The codes as uint8 [N, K]."""
        return unpack_w4a4_codes(self.packed, self.K)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return primitives.dequantize(self.codes(), self.scale[:, None], self.zero.float()[:, None], None, dtype)


class QuantizedActivation(NamedTuple):
    """Per-token codes of an activation [..., K]."""
    q: torch.Tensor         # int8 [..., K], codes in [0, 2^bits - 1]
    scale: torch.Tensor     # float32 [...]
    zero: torch.Tensor      # int32 [...]
    code_sum: torch.Tensor  # int32 [...], sum over k of the codes


def _check_float(t: torch.Tensor, what: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{what} must be float16, bfloat16 or float32, got {t.dtype}")


def _check_wbits(bits):
    primitives.check_bits(bits, "wbits")
    if bits > 4:
        raise ValueError(f"W4A4 weights hold at most 4 bits per code (two per byte), got wbits={bits}")
    return bits


def _check_abits(bits, signed=False):
    primitives.check_bits(bits, "abits")
    if bits > 7 and not signed:
        raise ValueError(f"activation codes must fit a signed int8 operand (<= 7 bits), got bits={bits}")
    return bits


# ----------------------------------------------------------------------------------------------------------------------
# Weight packing (torch, at load time)
# ----------------------------------------------------------------------------------------------------------------------
def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (< 16) -> [N, ceil(K/2)] bytes: low nibble k = j, high nibble k = ceil(K/2) + j."""
    N, K = q.shape
    Kh = (K + 1) // 2
    hi = torch.zeros(N, Kh, dtype=torch.uint8, device=q.device)
    hi[:, : K - Kh] = q[:, Kh:]
    return (q[:, :Kh] | (hi << 4)).contiguous()


def unpack_w4a4_codes(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of the packing: [N, ceil(K/2)] bytes -> uint8 codes [N, K]."""
    Kh = (K + 1) // 2
    if packed.dim() != 2 or packed.shape[1] != Kh:
        raise ValueError(f"packed codes must be [N, {Kh}] for K={K}, got {tuple(packed.shape)}")
    return torch.cat([packed & 15, packed >> 4], dim=1)[:, :K].contiguous()


def pack_w4a4_weight(w: torch.Tensor, wbits: int = 4, symmetric: bool = False,
                     scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> W4A4Weight:
    """Quantize a linear weight w [N, K] per output channel (aq.primitives) and pack it for the W4A4 GEMM."""
    _check_float(w, "weight")
    _check_wbits(wbits)
    if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"weight must be a non-empty 2-D [N, K] tensor, got shape {tuple(w.shape)}")
    N, K = w.shape
    wf = w.float()
    if (scale is None) != (zero is None):
        raise ValueError("give both scale and zero, or neither")
    if scale is None:
        scale, zero = (t.squeeze(-1) for t in primitives.choose_qparams(wf, wbits, None, symmetric))
    else:
        scale = scale.float().reshape(-1).to(w.device)
        zero = zero.float().reshape(-1).to(w.device)
        if scale.numel() != N or zero.numel() != N:
            raise ValueError(f"scale and zero must have N={N} entries, got {scale.numel()} and {zero.numel()}")
        if (scale <= 0).any() or (zero != zero.round()).any() or (zero < 0).any() or (zero > 2**wbits - 1).any():
            raise ValueError("scale must be > 0 and zero an integer in [0, 2^wbits - 1]")
    q = primitives.quantize(wf, scale[:, None], zero[:, None], wbits)
    return W4A4Weight(pack_codes(q), scale.float().contiguous(), zero.to(torch.int32).contiguous(),
                      q.sum(1, dtype=torch.int32).contiguous(), N, K, wbits, symmetric)


# ----------------------------------------------------------------------------------------------------------------------
# Activation quantization: references
# ----------------------------------------------------------------------------------------------------------------------
def _normed_reference(x, norm, norm_weight, norm_bias, norm_eps, transform):
    """y = norm(x) * w (+ b), then the transform; float32, operation order of the kernels."""
    y = x.float()
    if norm == "rms":
        rstd = 1.0 / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + norm_eps)
        y = (y * rstd) * norm_weight.float()
    elif norm == "layer":
        yc = y - y.mean(-1, keepdim=True)
        rstd = 1.0 / torch.sqrt(yc.pow(2).mean(-1, keepdim=True) + norm_eps)
        y = (yc * rstd) * norm_weight.float()
        if norm_bias is not None:
            y = y + norm_bias.float()
    if transform is not None:
        y = apply_transform(y, transform)
    return y


def quantize_activation_reference(x, bits=4, symmetric=False, norm=None, norm_weight=None, norm_bias=None,
                                  norm_eps=1e-6, transform=None, signed=False) -> QuantizedActivation:
    """Plain-torch reference of quantize_activation (aq.primitives on the float32 normalized, transformed row)."""
    _check_act_args(x, bits, norm, norm_weight, norm_bias, transform, signed)
    y = _normed_reference(x, norm, norm_weight, norm_bias, norm_eps, transform)
    scale, zero = primitives.choose_qparams(y, bits, None, symmetric)
    q = primitives.quantize(y, scale, zero, bits).to(torch.int32) - _offset(bits, signed)
    zero = zero.squeeze(-1).to(torch.int32) - _offset(bits, signed)
    return QuantizedActivation(q.to(torch.int8), scale.squeeze(-1), zero, q.sum(-1, dtype=torch.int32))


def _offset(bits: int, signed: bool) -> int:
    """What stored codes are shifted down by: 2^(bits-1) for signed (int8-container) codes, else 0."""
    return 2 ** (bits - 1) if signed else 0


def _check_act_args(x, bits, norm, norm_weight, norm_bias, transform, signed=False):
    _check_float(x, "activation x")
    _check_abits(bits, signed)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"activation must have a non-empty last dimension, got shape {tuple(x.shape)}")
    K = x.shape[-1]
    if norm not in _NORMS:
        raise ValueError(f"norm must be None, 'rms' or 'layer', got {norm!r}")
    if norm is None and (norm_weight is not None or norm_bias is not None):
        raise ValueError("norm_weight/norm_bias given without norm='rms' or 'layer'")
    if norm is not None:
        if norm_weight is None:
            raise ValueError(f"norm={norm!r} needs norm_weight of shape [{K}]")
        _check_float(norm_weight, "norm_weight")
        if tuple(norm_weight.shape) != (K,):
            raise ValueError(f"norm_weight must have shape [{K}], got {tuple(norm_weight.shape)}")
    if norm_bias is not None:
        if norm != "layer":
            raise ValueError("norm_bias is only used with norm='layer'")
        _check_float(norm_bias, "norm_bias")
        if tuple(norm_bias.shape) != (K,):
            raise ValueError(f"norm_bias must have shape [{K}], got {tuple(norm_bias.shape)}")
    if transform is not None:
        _check_float(transform, "transform")
        check_transform(transform, K)


# ----------------------------------------------------------------------------------------------------------------------
# Activation quantization: Triton
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _rne(v):
    # round half to even for |v| < 2^22 in fp32 (1.5 * 2^23), compiled and interpreted alike (as torch.round)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _qparams(xmin, xmax, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, SCALE_EPS: tl.constexpr):
    """aq.primitives.choose_qparams on row minima/maxima, with IEEE divisions (as torch on the CPU)."""
    if SYMMETRIC:
        amax = tl.maximum(tl.abs(xmax), tl.abs(xmin))
        scale = tl.maximum(tl.div_rn(amax, tl.full(amax.shape, 2 ** (BITS - 1) - 1, tl.float32)), SCALE_EPS)
        zero = tl.full(amax.shape, 2 ** (BITS - 1), tl.float32)
    else:
        lo = tl.minimum(xmin, 0.0)
        hi = tl.maximum(xmax, 0.0)
        scale = tl.maximum(tl.div_rn(hi - lo, tl.full(hi.shape, 2**BITS - 1, tl.float32)), SCALE_EPS)
        zero = _rne(tl.div_rn(-lo, scale))
    return scale, zero


@triton.jit
def _codes(y, scale, zero, BITS: tl.constexpr, FAST_DIV: tl.constexpr):
    """clamp(round(y / scale) + zero) with y / scale correctly rounded, as torch computes it.

    FAST_DIV (compiled code): one IEEE reciprocal per row, then per element q = y * r refined by one FMA step
    (Markstein: with r = RN(1/s) and q within an ulp of y/s, RN(q + r * (y - s q)) is the correctly rounded y/s);
    3 flops instead of a full IEEE division. The interpreter has no true FMA, so it divides.
    """
    s2 = tl.broadcast_to(scale[:, None], y.shape)
    if FAST_DIV:
        r = tl.broadcast_to(tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)[:, None], y.shape)
        q0 = y * r
        t = tl.fma(r, tl.fma(-q0, s2, y), q0)
    else:
        t = tl.div_rn(y, s2)
    q = _rne(t) + zero[:, None]
    return tl.minimum(tl.maximum(q, 0.0), 2**BITS - 1)


@triton.jit
def _act_quant_rows_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, cs_ptr, nw_ptr, nb_ptr, d_ptr, st_ptr, u_ptr, v_ptr,
    M, K, NB, stride_xm, stride_qm, eps,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, NORM: tl.constexpr, HAS_NB: tl.constexpr, DIAG: tl.constexpr,
    POST: tl.constexpr, H: tl.constexpr, FAST_DIV: tl.constexpr, SCALE_EPS: tl.constexpr, OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    """Whole rows in registers: one load, norm, diagonal, range, codes, stores.

    POST: x is z = (x * w) @ T from _blockdiag_kernel and the norm is applied after the transform, from the
    per-block statistics st ([M, NB] sums of squares, or [2, M, NB] block sums and centred sums of squares):
    rms: y = rstd z; layer: y = rstd (z - mean u) + v with u = w @ T, v = b @ T (per column).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    rok = rows < M
    cok = cols < K
    m = rok[:, None] & cok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if POST:
        if NORM != 0:
            bb = tl.arange(0, BLOCK_NB)
            sm = rok[:, None] & (bb < NB)[None, :]
            sp = st_ptr + rows64[:, None] * NB + bb[None, :]
            if NORM == 1:
                rstd = 1.0 / tl.sqrt(tl.sum(tl.load(sp, mask=sm, other=0.0), axis=1) / K + eps)
                x = x * rstd[:, None]
            else:
                bs = tl.load(sp, mask=sm, other=0.0)
                bm2 = tl.load(sp + M * NB, mask=sm, other=0.0)
                mean = tl.sum(bs, axis=1) / K
                dev = tl.where(sm, bs / H - mean[:, None], 0.0)
                var = (tl.sum(bm2, axis=1) + H * tl.sum(dev * dev, axis=1)) / K
                rstd = 1.0 / tl.sqrt(var + eps)
                u = tl.load(u_ptr + cols, mask=cok, other=0.0)
                x = (x - mean[:, None] * u[None, :]) * rstd[:, None]
                if HAS_NB:
                    x = x + tl.load(v_ptr + cols, mask=cok, other=0.0)[None, :]
    else:
        if NORM == 1:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / K + eps)
            w = tl.load(nw_ptr + cols, mask=cok, other=0.0).to(tl.float32)
            x = (x * rstd[:, None]) * w[None, :]
        elif NORM == 2:
            mean = tl.sum(x, axis=1) / K
            xc = tl.where(m, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + eps)
            w = tl.load(nw_ptr + cols, mask=cok, other=0.0).to(tl.float32)
            x = (xc * rstd[:, None]) * w[None, :]
            if HAS_NB:
                x = x + tl.load(nb_ptr + cols, mask=cok, other=0.0).to(tl.float32)[None, :]
        if DIAG:
            x = x * tl.load(d_ptr + cols, mask=cok, other=0.0).to(tl.float32)[None, :]
    xmax = tl.max(tl.where(m, x, float("-inf")), axis=1)
    xmin = tl.min(tl.where(m, x, float("inf")), axis=1)
    scale, zero = _qparams(xmin, xmax, BITS, SYMMETRIC, SCALE_EPS)
    q = tl.where(m, _codes(x, scale, zero, BITS, FAST_DIV) - OFFSET, 0.0).to(tl.int32)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q.to(tl.int8), mask=m)
    tl.store(s_ptr + rows, scale, mask=rok)
    tl.store(z_ptr + rows, zero.to(tl.int32) - OFFSET, mask=rok)
    tl.store(cs_ptr + rows, tl.sum(q, axis=1), mask=rok)


@triton.jit
def _blockdiag_kernel(x_ptr, nw_ptr, t_ptr, z_ptr, st_ptr, M, K, NB, stride_xm,
                      NORM: tl.constexpr, H: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    """One (row block, diagonal block) per program: z = (x * w) @ T_b in float32, plus the block's norm statistics."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rok = rows < M
    rows64 = rows.to(tl.int64)
    hh = tl.arange(0, H)
    cols = b * H + hh
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=rok[:, None], other=0.0).to(tl.float32)
    if NORM == 1:
        tl.store(st_ptr + rows64 * NB + b, tl.sum(x * x, axis=1), mask=rok)
    elif NORM == 2:
        bs = tl.sum(x, axis=1)
        xc = x - (bs / H)[:, None]
        tl.store(st_ptr + rows64 * NB + b, bs, mask=rok)
        tl.store(st_ptr + M * NB + rows64 * NB + b, tl.sum(xc * xc, axis=1), mask=rok)
    if NORM != 0:
        x = x * tl.load(nw_ptr + cols).to(tl.float32)[None, :]
    t = tl.load(t_ptr + b.to(tl.int64) * H * H + hh[:, None] * H + hh[None, :]).to(tl.float32)
    z = tl.dot(x, t, input_precision=PREC)
    tl.store(z_ptr + rows64[:, None] * K + cols[None, :], z, mask=rok[:, None])


@triton.jit
def _chunk(x_ptr, nw_ptr, nb_ptr, t_ptr, rows64, rok, c0, K, stride_xm, mean, rstd,
           NORM: tl.constexpr, HAS_NB: tl.constexpr, TRANSFORM: tl.constexpr, BLOCK_C: tl.constexpr,
           PREC: tl.constexpr):
    """Columns [c0, c0 + BLOCK_C) of the normalized, transformed rows (float32) and their mask."""
    cols = c0 + tl.arange(0, BLOCK_C)
    cok = cols < K
    m = rok[:, None] & cok[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if NORM != 0:
        w = tl.load(nw_ptr + cols, mask=cok, other=0.0).to(tl.float32)
        x = ((x - mean[:, None]) * rstd[:, None]) * w[None, :]
        if HAS_NB:
            x = x + tl.load(nb_ptr + cols, mask=cok, other=0.0).to(tl.float32)[None, :]
    if TRANSFORM == 1:
        x = x * tl.load(t_ptr + cols, mask=cok, other=0.0).to(tl.float32)[None, :]
    if TRANSFORM == 2:
        # one block of the block-diagonal matrix per chunk (BLOCK_C == h, K % h == 0)
        ti = tl.arange(0, BLOCK_C)
        t = tl.load(t_ptr + c0 * BLOCK_C + ti[:, None] * BLOCK_C + ti[None, :]).to(tl.float32)
        x = tl.dot(tl.where(m, x, 0.0), t, input_precision=PREC)
    return x, m


@triton.jit
def _act_quant_chunked_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, cs_ptr, nw_ptr, nb_ptr, t_ptr,
    M, K, stride_xm, stride_qm, eps,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, NORM: tl.constexpr, HAS_NB: tl.constexpr, TRANSFORM: tl.constexpr,
    FAST_DIV: tl.constexpr, SCALE_EPS: tl.constexpr, OFFSET: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr, PREC: tl.constexpr,
):
    """Rows longer than _MAX_ROW_BLOCK, in chunks: norm statistics, then the range, then the codes (recomputing)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rok = rows < M
    rows64 = rows.to(tl.int64)
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
    xmax = tl.full([BLOCK_M], float("-inf"), tl.float32)
    xmin = tl.full([BLOCK_M], float("inf"), tl.float32)
    for c0 in range(0, K, BLOCK_C):
        y, m = _chunk(x_ptr, nw_ptr, nb_ptr, t_ptr, rows64, rok, c0, K, stride_xm, mean, rstd,
                      NORM, HAS_NB, TRANSFORM, BLOCK_C, PREC)
        xmax = tl.maximum(xmax, tl.max(tl.where(m, y, float("-inf")), axis=1))
        xmin = tl.minimum(xmin, tl.min(tl.where(m, y, float("inf")), axis=1))
    scale, zero = _qparams(xmin, xmax, BITS, SYMMETRIC, SCALE_EPS)
    csum = tl.zeros([BLOCK_M], tl.int32)
    for c0 in range(0, K, BLOCK_C):
        y, m = _chunk(x_ptr, nw_ptr, nb_ptr, t_ptr, rows64, rok, c0, K, stride_xm, mean, rstd,
                      NORM, HAS_NB, TRANSFORM, BLOCK_C, PREC)
        q = tl.where(m, _codes(y, scale, zero, BITS, FAST_DIV) - OFFSET, 0.0).to(tl.int32)
        tl.store(q_ptr + rows64[:, None] * stride_qm + (c0 + cc)[None, :], q.to(tl.int8), mask=m)
        csum += tl.sum(q, axis=1)
    tl.store(s_ptr + rows, scale, mask=rok)
    tl.store(z_ptr + rows, zero.to(tl.int32) - OFFSET, mask=rok)
    tl.store(cs_ptr + rows, csum, mask=rok)


def _as_param(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if t is None:
        return like  # never read (its constexpr flag is off)
    return t if t.is_contiguous() else t.contiguous()


def _fast_div() -> bool:
    return not backend.interpreting() and os.environ.get("AQ_W4A4_IEEE_DIV", "0") != "1"


def _row_launch(M, K):
    block_k = triton.next_power_of_2(K)
    block_m = max(1, min(triton.next_power_of_2(M), 2048 // block_k))
    warps = max(4, min(16, block_m * block_k // 1024))
    return block_m, block_k, warps


def quantize_activation_triton(x, bits=4, symmetric=False, norm=None, norm_weight=None, norm_bias=None,
                               norm_eps=1e-6, transform=None, signed=False) -> QuantizedActivation:
    _check_act_args(x, bits, norm, norm_weight, norm_bias, transform, signed)
    K = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    dev = x.device
    q = torch.empty(M, K, dtype=torch.int8, device=dev)
    scale = torch.empty(M, dtype=torch.float32, device=dev)
    zero = torch.empty(M, dtype=torch.int32, device=dev)
    csum = torch.empty(M, dtype=torch.int32, device=dev)
    out = QuantizedActivation(q.reshape(*lead, K), scale.reshape(lead), zero.reshape(lead), csum.reshape(lead))
    if M == 0:
        return out
    nw, nb = _as_param(norm_weight, x2), _as_param(norm_bias, x2)
    tr = _as_param(transform, x2)
    blockdiag = transform is not None and transform.dim() == 3
    common = dict(BITS=bits, SYMMETRIC=bool(symmetric), NORM=_NORMS[norm], HAS_NB=norm_bias is not None,
                  FAST_DIV=_fast_div(), SCALE_EPS=primitives.SCALE_EPS, OFFSET=_offset(bits, signed))
    eps = float(norm_eps) if norm is not None else 0.0
    if K > _MAX_ROW_BLOCK:
        if blockdiag:
            block_c, block_m, code, warps = transform.shape[1], 16, 2, 4
            tr = tr.float()
        else:
            block_c, block_m, code, warps = 4096, 1, int(transform is not None), 8
        _act_quant_chunked_kernel[(triton.cdiv(M, block_m),)](
            x2, q, scale, zero, csum, nw, nb, tr, M, K, x2.stride(0), q.stride(0), eps,
            TRANSFORM=code, BLOCK_M=block_m, BLOCK_C=block_c, PREC="tf32x3", num_warps=warps, **common)
        return out
    block_m, block_k, warps = _row_launch(M, K)
    if not blockdiag:
        _act_quant_rows_kernel[(triton.cdiv(M, block_m),)](
            x2, q, scale, zero, csum, nw, nb, tr, x2, x2, x2, M, K, 1, x2.stride(0), q.stride(0), eps,
            DIAG=transform is not None, POST=False, H=1, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_NB=1,
            num_warps=warps, **common)
        return out
    # block-diagonal: z = (x * w) @ T in parallel over (rows, blocks), then the row kernel finishes the norm
    h = transform.shape[1]
    nbk = K // h
    tf = tr.float()
    z = torch.empty(M, K, dtype=torch.float32, device=dev)
    st = torch.empty((2 if norm == "layer" else 1) * M * nbk if norm else 1, dtype=torch.float32, device=dev)
    bm = 16 if M <= 16 else 64
    _blockdiag_kernel[(triton.cdiv(M, bm), nbk)](x2, nw, tf, z, st, M, K, nbk, x2.stride(0), NORM=_NORMS[norm],
                                                 H=h, BLOCK_M=bm, PREC="tf32x3", num_warps=4)
    u = v = z
    if norm == "layer":
        u = torch.bmm(nw.float().reshape(nbk, 1, h), tf).reshape(K)
        if norm_bias is not None:
            v = torch.bmm(nb.float().reshape(nbk, 1, h), tf).reshape(K)
    _act_quant_rows_kernel[(triton.cdiv(M, block_m),)](
        z, q, scale, zero, csum, nw, nb, tr, st, u, v, M, K, nbk, z.stride(0), q.stride(0), eps,
        DIAG=False, POST=True, H=h, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_NB=triton.next_power_of_2(nbk),
        num_warps=warps, **common)
    return out


def quantize_activation(x, bits=4, symmetric=False, norm=None, norm_weight=None, norm_bias=None, norm_eps=1e-6,
                        transform=None, signed=False) -> QuantizedActivation:
    """Per-token quantization of x [..., K], fused with the norm and transform before it (see the module doc)."""
    _check_act_args(x, bits, norm, norm_weight, norm_bias, transform, signed)
    tensors = [t for t in (x, norm_weight, norm_bias, transform) if isinstance(t, torch.Tensor)]
    args = (x, bits, symmetric, norm, norm_weight, norm_bias, norm_eps, transform, signed)
    if backend.choose(*tensors) == backend.TRITON:
        return quantize_activation_triton(*args)
    return quantize_activation_reference(*args)


# ----------------------------------------------------------------------------------------------------------------------
# GEMM: references
# ----------------------------------------------------------------------------------------------------------------------
def _check_mm_args(a: QuantizedActivation, weight: W4A4Weight, bias, out_dtype):
    if not isinstance(weight, W4A4Weight):
        raise TypeError(f"weight must be a W4A4Weight (see pack_w4a4_weight), got {type(weight).__name__}")
    check_gemm_args(a, weight.K, weight.N, bias, out_dtype)


def check_gemm_args(a: QuantizedActivation, K: int, N: int, bias, out_dtype):
    """The activation, bias and output dtype of an integer GEMM with a weight [N, K] (also aq.kernels.w8a8's)."""
    if not isinstance(a, QuantizedActivation):
        raise TypeError(f"activation must be a QuantizedActivation (see quantize_activation), got {type(a).__name__}")
    if a.q.dtype != torch.int8:
        raise TypeError(f"activation codes must be int8, got {a.q.dtype}")
    if a.q.dim() < 1 or a.q.shape[-1] != K:
        raise ValueError(f"activation has K={a.q.shape[-1] if a.q.dim() else None} but the weight has K={K}")
    lead = tuple(a.q.shape[:-1])
    for name, t, dt in (("scale", a.scale, torch.float32), ("zero", a.zero, torch.int32),
                        ("code_sum", a.code_sum, torch.int32)):
        if tuple(t.shape) != lead or t.dtype != dt:
            raise ValueError(f"activation {name} must be {dt} of shape {lead}, got {t.dtype} {tuple(t.shape)}")
    if bias is not None:
        _check_float(bias, "bias")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias must have shape [{N}], got {tuple(bias.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")


def w4a4_matmul_reference(a: QuantizedActivation, weight: W4A4Weight, bias=None, out_dtype=torch.float16):
    """Plain torch: the exact integer sum_k (qa - za)(qw - zw) (float64 holds it exactly), then scales and bias."""
    _check_mm_args(a, weight, bias, out_dtype)
    K = weight.K
    qa = a.q.reshape(-1, K).double() - a.zero.reshape(-1, 1).double()
    qw = weight.codes().double() - weight.zero.double()[:, None]
    s = qa @ qw.T
    lead = tuple(a.q.shape[:-1])
    if out_dtype == torch.int32:
        return s.round().to(torch.int32).reshape(*lead, weight.N)
    y = s * a.scale.reshape(-1, 1).double() * weight.scale.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype).reshape(*lead, weight.N)


# ----------------------------------------------------------------------------------------------------------------------
# GEMM: Triton
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _unpack(p, USE_ASM: tl.constexpr):
    """uint8 bytes -> (low nibbles, high nibbles) as int8, 4 bytes per 32-bit op when USE_ASM."""
    if USE_ASM:
        lo = tl.inline_asm_elementwise("and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [p], dtype=tl.int8, is_pure=True,
                                       pack=4)
        hi = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }", "=r,r",
                                       [p], dtype=tl.int8, is_pure=True, pack=4)
    else:
        lo = (p & 15).to(tl.int8)
        hi = (p >> 4).to(tl.int8)
    return lo, hi


@triton.jit
def _epilogue(acc, rm, rn, M, N, K, y_ptr, stride_ym, as_ptr, az_ptr, acs_ptr, ws_ptr, wz_ptr, wcs_ptr, b_ptr,
              HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr):
    """acc [BM, BN] = sum_k qa qw -> y = sa sw (acc - za Rw - zw Ra + K za zw) + bias, stored in y's dtype."""
    mok = rm < M
    nok = rn < N
    za = tl.load(az_ptr + rm, mask=mok, other=0)
    ra = tl.load(acs_ptr + rm, mask=mok, other=0)
    zw = tl.load(wz_ptr + rn, mask=nok, other=0)
    rw = tl.load(wcs_ptr + rn, mask=nok, other=0)
    s = acc - za[:, None] * rw[None, :] - (ra[:, None] - K * za[:, None]) * zw[None, :]
    ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    if INT_OUT:
        tl.store(ptrs, s, mask=mok[:, None] & nok[None, :])
    else:
        sa = tl.load(as_ptr + rm, mask=mok, other=0.0)
        sw = tl.load(ws_ptr + rn, mask=nok, other=0.0)
        y = s.to(tl.float32) * (sa[:, None] * sw[None, :])
        if HAS_BIAS:
            y = y + tl.load(b_ptr + rn, mask=nok, other=0.0).to(tl.float32)[None, :]
        tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=mok[:, None] & nok[None, :])


@triton.jit
def _w4a4_mm_kernel(
    a_ptr, w_ptr, y_ptr, as_ptr, az_ptr, acs_ptr, ws_ptr, wz_ptr, wcs_ptr, b_ptr, part_ptr, cnt_ptr,
    M, N, K, Kh, stride_am, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr,
    SWAP: tl.constexpr, TMA: tl.constexpr, W8: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, GROUP_M: tl.constexpr,
):
    """acc = sum_k qa qw over this program's K range, then the epilogue.

    Per step of BLOCK_KH packed columns j: acc += A[:, j] W_lo[:, j]^T + A[:, Kh + j] W_hi[:, j]^T.
    SWAP (small M): the product is computed transposed, W on the wide (M) side of the dot and the few tokens on the
    narrow side. TMA: operands come through tensor descriptors (a_ptr / w_ptr are descriptors; needs EVEN_K).
    W8: w is the weight already unpacked to int8 [N, 2 Kh] (low nibbles, then high nibbles), for large M.
    SPLIT_K > 1: program axis 1 splits K; partial int32 tiles go to part_ptr and the last program of a tile (per an
    atomic counter in cnt_ptr, reset after use) sums them and runs the epilogue.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    if SWAP:
        pid_n = pid % num_n
        pid_m = pid // num_n
    else:
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        gsize = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % gsize
        pid_n = (pid % in_group) // gsize
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BLOCK_KH)
    chunk = tl.cdiv(tl.cdiv(Kh, SPLIT_K), BLOCK_KH) * BLOCK_KH
    j_start = pid_k * chunk
    j_end = min(Kh, j_start + chunk)
    if not TMA:
        # rows past M / N read a valid row (results are masked at the store), so only K needs masks
        a_lo_ptrs = a_ptr + (rm % M).to(tl.int64)[:, None] * stride_am + (j_start + rj)[None, :]
        w_ptrs = w_ptr + (rn % N).to(tl.int64)[:, None] * stride_wn + (j_start + rj)[None, :]
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for j0 in range(j_start, j_end, BLOCK_KH):
        if TMA:
            a_lo = a_ptr.load([pid_m * BLOCK_M, j0])
            a_hi = a_ptr.load([pid_m * BLOCK_M, Kh + j0])
            if W8:
                w_lo = w_ptr.load([pid_n * BLOCK_N, j0])
                w_hi = w_ptr.load([pid_n * BLOCK_N, Kh + j0])
            else:
                w_lo, w_hi = _unpack(w_ptr.load([pid_n * BLOCK_N, j0]), USE_ASM)
        else:
            if EVEN_K:
                a_lo = tl.load(a_lo_ptrs)
                a_hi = tl.load(a_lo_ptrs + Kh)
                if W8:
                    w_lo = tl.load(w_ptrs)
                    w_hi = tl.load(w_ptrs + Kh)
                else:
                    w_lo, w_hi = _unpack(tl.load(w_ptrs), USE_ASM)
            else:
                jok = (j0 + rj) < j_end
                a_lo = tl.load(a_lo_ptrs, mask=jok[None, :], other=0)
                a_hi = tl.load(a_lo_ptrs + Kh, mask=(jok & ((Kh + j0 + rj) < K))[None, :], other=0)
                if W8:
                    w_lo = tl.load(w_ptrs, mask=jok[None, :], other=0)
                    w_hi = tl.load(w_ptrs + Kh, mask=jok[None, :], other=0)
                else:
                    w_lo, w_hi = _unpack(tl.load(w_ptrs, mask=jok[None, :], other=0), USE_ASM)
            a_lo_ptrs += BLOCK_KH
            w_ptrs += BLOCK_KH
        if SWAP:
            acc = tl.dot(w_lo, tl.trans(a_lo), acc, out_dtype=tl.int32)
            acc = tl.dot(w_hi, tl.trans(a_hi), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a_lo, tl.trans(w_lo), acc, out_dtype=tl.int32)
            acc = tl.dot(a_hi, tl.trans(w_hi), acc, out_dtype=tl.int32)
    if SPLIT_K > 1:
        if SWAP:
            offs = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        else:
            offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_base = pid.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
        tl.store(part_ptr + tile_base + pid_k * (BLOCK_M * BLOCK_N) + offs, acc)
        tl.debug_barrier()  # every thread's partial is written before the counter says so (release below)
        done = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            # (no outer variable changes type inside this run-time branch: a new name for the transposed sum)
            total = tl.zeros_like(acc)
            for s in range(SPLIT_K):
                total += tl.load(part_ptr + tile_base + s * (BLOCK_M * BLOCK_N) + offs, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + pid, 0)  # ready for the next call
            if SWAP:
                _epilogue(tl.trans(total), rm, rn, M, N, K, y_ptr, stride_ym, as_ptr, az_ptr, acs_ptr, ws_ptr,
                          wz_ptr, wcs_ptr, b_ptr, HAS_BIAS, INT_OUT)
            else:
                _epilogue(total, rm, rn, M, N, K, y_ptr, stride_ym, as_ptr, az_ptr, acs_ptr, ws_ptr, wz_ptr,
                          wcs_ptr, b_ptr, HAS_BIAS, INT_OUT)
    elif SWAP:
        _epilogue(tl.trans(acc), rm, rn, M, N, K, y_ptr, stride_ym, as_ptr, az_ptr, acs_ptr, ws_ptr, wz_ptr, wcs_ptr,
                  b_ptr, HAS_BIAS, INT_OUT)
    else:
        _epilogue(acc, rm, rn, M, N, K, y_ptr, stride_ym, as_ptr, az_ptr, acs_ptr, ws_ptr, wz_ptr, wcs_ptr, b_ptr,
                  HAS_BIAS, INT_OUT)


@triton.jit
def _unpack_weight_kernel(p_ptr, w_ptr, N, Kh, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
                          USE_ASM: tl.constexpr):
    """Packed codes [N, Kh] -> int8 [N, 2 Kh]: low nibbles in columns [0, Kh), high nibbles in [Kh, 2 Kh)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    m = (rn < N)[:, None] & (rj < Kh)[None, :]
    p = tl.load(p_ptr + rn.to(tl.int64)[:, None] * Kh + rj[None, :], mask=m, other=0)
    lo, hi = _unpack(p, USE_ASM)
    base = w_ptr + rn.to(tl.int64)[:, None] * (2 * Kh) + rj[None, :]
    tl.store(base, lo, mask=m)
    tl.store(base + Kh, hi, mask=m)


def unpack_weight_int8(weight: W4A4Weight) -> torch.Tensor:
    """The weight codes as int8 [N, 2 * ceil(K/2)] in the GEMM's order (Triton; one pass)."""
    N, Kh = weight.N, weight.packed.shape[1]
    out = torch.empty(N, 2 * Kh, dtype=torch.int8, device=weight.device)
    grid = (triton.cdiv(N, 32), triton.cdiv(Kh, 512))
    _unpack_weight_kernel[grid](weight.packed, out, N, Kh, BLOCK_N=32, BLOCK_J=512,
                                USE_ASM=not backend.interpreting(), num_warps=4)
    return out


# Per M bucket (first whose max_m >= M): kernel ("swap" or "tile"), blocks, warps, stages, and
#   SPLIT: target number of programs for split-K (0: none; K is split in powers of two until the grid reaches it),
#   TMA: tensor-descriptor loads (used when the shapes allow: K % 32 == 0, Kh % BLOCK_KH == 0),
#   W8: unpack the weight to int8 in a separate pass first (large M).
# BLOCK_KH counts packed bytes, i.e. 2 * BLOCK_KH codes of K per step. Overridden by the tuned configs (aq.kernels.tuned).
DEFAULT_CONFIGS = [  # the H100 winners of bench/w4a4.py sweep (2026-11, see bench/NOTES-w4a4.md)
    dict(max_m=16, kernel="swap", BLOCK_M=16, BLOCK_N=64, BLOCK_KH=256, GROUP_M=1, num_warps=4, num_stages=5),
    dict(max_m=32, kernel="swap", BLOCK_M=32, BLOCK_N=64, BLOCK_KH=256, GROUP_M=1, num_warps=4, num_stages=4, TMA=True),
    dict(max_m=64, kernel="swap", BLOCK_M=64, BLOCK_N=64, BLOCK_KH=128, GROUP_M=1, num_warps=4, num_stages=4),
    dict(max_m=128, kernel="tile", BLOCK_M=128, BLOCK_N=64, BLOCK_KH=128, GROUP_M=8, num_warps=4, num_stages=4,
         TMA=True),
    dict(max_m=512, kernel="tile", BLOCK_M=128, BLOCK_N=128, BLOCK_KH=128, GROUP_M=8, num_warps=8, num_stages=3,
         TMA=True),
    dict(max_m=None, kernel="tile", BLOCK_M=128, BLOCK_N=256, BLOCK_KH=64, GROUP_M=8, num_warps=8, num_stages=4,
         TMA=True, W8=True),
]
# The interpreter's cost is programs x steps: few, large blocks there.
_INTERPRET_CONFIGS = [
    dict(max_m=16, kernel="swap", BLOCK_M=16, BLOCK_N=128, BLOCK_KH=128, GROUP_M=1, num_warps=4, num_stages=1),
    dict(max_m=None, kernel="tile", BLOCK_M=64, BLOCK_N=128, BLOCK_KH=128, GROUP_M=4, num_warps=4, num_stages=1),
]
FAMILY = "w4a4"  # key of this kernel family in the per-GPU config files
_COUNTERS: dict = {}


def _configs_for(device_name: str) -> tuple:
    """The tuned per-M-bucket configs of this GPU (bench/w4a4.py sweep --write), else DEFAULT_CONFIGS."""
    return tuple(tuned.tuned(FAMILY, device_name) or DEFAULT_CONFIGS)


def pick_config(M: int, N: int, K: int, device: torch.device | str = "cpu") -> dict:
    """The one place that dispatches the GEMM by M: returns the kernel and launch parameters for this problem."""
    device = torch.device(device)
    if device.type == "cuda":
        table = _configs_for(torch.cuda.get_device_name(device))
    else:
        table = _INTERPRET_CONFIGS
    for cfg in table:
        if cfg["max_m"] is None or M <= cfg["max_m"]:
            return dict(cfg)
    return dict(table[-1])


def _counters(device, n: int) -> torch.Tensor:
    """Self-resetting split-K tile counters (zero between calls). Shared per device: one GEMM at a time per device."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _split_k(target: int, tiles: int, Kh: int, block_kh: int) -> int:
    split = 1
    while target and tiles * split < target and Kh >= 4 * split * block_kh:
        split *= 2
    return split


def w4a4_matmul_triton(a: QuantizedActivation, weight: W4A4Weight, bias=None, out_dtype=torch.float16,
                       config: dict | None = None):
    _check_mm_args(a, weight, bias, out_dtype)
    K, N = weight.K, weight.N
    lead = tuple(a.q.shape[:-1])
    q = a.q.reshape(-1, K)
    if q.stride(-1) != 1:
        q = q.contiguous()
    M = q.shape[0]
    y = torch.empty(M, N, dtype=out_dtype, device=q.device)
    if M == 0:
        return y.reshape(*lead, N)
    cfg = dict(config) if config is not None else pick_config(M, N, K, q.device)
    kind = cfg.pop("kernel")
    if kind not in ("swap", "tile"):
        raise ValueError(f"unknown W4A4 kernel {kind!r}")
    cfg.pop("max_m", None)
    interp = backend.interpreting()
    use_asm = bool(cfg.pop("USE_ASM", True)) and not interp
    w8 = bool(cfg.pop("W8", False))
    split_target = int(cfg.pop("SPLIT", 0))
    Kh = (K + 1) // 2
    bkh = cfg["BLOCK_KH"]
    even_k = K % 2 == 0 and Kh % bkh == 0
    tma = bool(cfg.pop("TMA", False)) and even_k and K % 32 == 0 and q.stride(0) % 16 == 0 \
        and q.data_ptr() % 16 == 0 and weight.packed.data_ptr() % 16 == 0
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = _split_k(split_target, tiles, Kh, bkh)
    w = unpack_weight_int8(weight) if w8 else weight.packed
    a_arg, w_arg = q, w
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        a_arg = TensorDescriptor.from_tensor(q, [bm, bkh])
        w_arg = TensorDescriptor.from_tensor(w, [bn, bkh])
    if split > 1:
        part = torch.empty(tiles * split * bm * bn, dtype=torch.int32, device=q.device)
        cnt = _counters(q.device, tiles)
    else:
        part = cnt = y
    _w4a4_mm_kernel[(tiles, split)](
        a_arg, w_arg, y, a.scale.reshape(-1), a.zero.reshape(-1), a.code_sum.reshape(-1), weight.scale,
        weight.zero, weight.code_sum, bias if bias is not None else weight.scale, part, cnt,
        M, N, K, Kh, q.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, INT_OUT=out_dtype == torch.int32, EVEN_K=even_k, USE_ASM=use_asm,
        SWAP=kind == "swap", TMA=tma, W8=w8, SPLIT_K=split, **cfg)
    return y.reshape(*lead, N)


def w4a4_matmul(a: QuantizedActivation, weight: W4A4Weight, bias=None, out_dtype=torch.float16):
    """y = ((qa - za) sa) ((qw - zw) sw)^T + bias for quantized activations a [..., K] and a packed weight [N, K]."""
    _check_mm_args(a, weight, bias, out_dtype)
    tensors = [a.q, weight.packed] + ([bias] if bias is not None else [])
    if backend.choose(*tensors) == backend.TRITON:
        return w4a4_matmul_triton(a, weight, bias, out_dtype)
    return w4a4_matmul_reference(a, weight, bias, out_dtype)


def w4a4_linear(x, weight: W4A4Weight, bias=None, *, abits=4, a_symmetric=False, norm=None, norm_weight=None,
                norm_bias=None, norm_eps=1e-6, transform=None, out_dtype=None):
    """Quantize x [..., K] per token (fused with the norm/transform before it) and multiply by the packed weight."""
    _check_float(x, "activation x")
    if out_dtype is None:
        out_dtype = x.dtype
    a = quantize_activation(x, abits, a_symmetric, norm, norm_weight, norm_bias, norm_eps, transform)
    return w4a4_matmul(a, weight, bias, out_dtype)
