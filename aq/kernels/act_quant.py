"""Per-token activation quantization, fused with the norm and transform before it, in Triton (the activation side
of W4A4; any GEMM on int8 codes with per-token scales can take its output).

``quantize_activation(x, bits=4, symmetric=False, norm=None, norm_weight=None, norm_bias=None, norm_eps=1e-6,
transform=None, signed=False) -> QuantizedActivation(q, scale, zero, code_sum)``: per-token quantization of x [..., K]:
q int8 codes in [0, 2^bits - 1] (exactly those of ``primitives.quantize(y, *primitives.choose_qparams(y, bits, None,
symmetric), bits)``), scale float32 [...], zero int32 [...], code_sum int32 [...] (sum of each token's codes, for a
GEMM's zero-point correction). y is x itself (``norm=None``), or ``norm(x) * norm_weight (+ norm_bias)`` with
``norm="rms"`` or ``"layer"``; then optionally times a diagonal (``transform`` of shape [K]) or right-multiplied block
by block by a block-diagonal matrix (``transform`` of shape [K // h, h, h]: ``y[:, b*h:(b+1)*h] @ transform[b]``; h a
power of two >= 16). Without a block-diagonal transform it is one kernel and the normalized row never goes to memory; a
block-diagonal transform takes two kernels (the products, block-parallel, through a float32 buffer, then the norm and
quantization). Rows longer than 16384 go through a chunked kernel. bits 2..7 (codes must fit an int8 operand); with
``signed=True`` bits 2..8 and the codes, zero point and code sum are stored shifted by -2^(bits-1) (the int8 containers
of aq.kernels.w8a8: q - z and the dequantized values are unchanged).
The plain-torch reference is ``quantize_activation_reference``; ``quantize_activation`` dispatches through aq.backend.

Codes are exact: min/max, scale and zero point follow aq.primitives operation by operation (aq.kernels.common); the
division y / scale is correctly rounded (an IEEE reciprocal per row, then one FMA refinement step per element in
compiled code, tl.div_rn in the interpreter), so codes equal those of aq.primitives on the CPU. (torch on CUDA divides
a tensor by a Python scalar through its reciprocal, so primitives run on a GPU can differ from the CPU by an ulp in the
scale: compare kernels with the CPU reference.) Fused norms/transforms round differently from the float32 reference
and may move a code by one at a near-tie.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from aq import backend, primitives
from aq.kernels.common import norm_stats_chunked, norm_stats_rows, qparams, quant_codes
from aq.kernels.norm import apply_transform, check_transform

__all__ = ["QuantizedActivation", "quantize_activation", "quantize_activation_reference", "check_float"]

_NORMS = {None: 0, "rms": 1, "layer": 2}
_MAX_ROW_BLOCK = 16384  # rows up to this many columns are quantized with the whole row in registers


class QuantizedActivation(NamedTuple):
    """Per-token codes of an activation [..., K]."""
    q: torch.Tensor         # int8 [..., K], codes in [0, 2^bits - 1] (signed: shifted by -2^(bits-1))
    scale: torch.Tensor     # float32 [...]
    zero: torch.Tensor      # int32 [...]
    code_sum: torch.Tensor  # int32 [...], sum over k of the codes



def check_float(t: torch.Tensor, what: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{what} must be float16, bfloat16 or float32, got {t.dtype}")



def _check_abits(bits, signed=False):
    primitives.check_bits(bits, "abits")
    if bits > 7 and not signed:
        raise ValueError(f"activation codes must fit a signed int8 operand (<= 7 bits), got bits={bits}")
    return bits



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
    check_float(x, "activation x")
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
        check_float(norm_weight, "norm_weight")
        if tuple(norm_weight.shape) != (K,):
            raise ValueError(f"norm_weight must have shape [{K}], got {tuple(norm_weight.shape)}")
    if norm_bias is not None:
        if norm != "layer":
            raise ValueError("norm_bias is only used with norm='layer'")
        check_float(norm_bias, "norm_bias")
        if tuple(norm_bias.shape) != (K,):
            raise ValueError(f"norm_bias must have shape [{K}], got {tuple(norm_bias.shape)}")
    if transform is not None:
        check_float(transform, "transform")
        check_transform(transform, K)


# ----------------------------------------------------------------------------------------------------------------------
# Activation quantization: Triton
# ----------------------------------------------------------------------------------------------------------------------
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
        if NORM != 0:
            xc, rstd = norm_stats_rows(x, m, K, eps, NORM)
            w = tl.load(nw_ptr + cols, mask=cok, other=0.0).to(tl.float32)
            x = (xc * rstd[:, None]) * w[None, :]
            if HAS_NB:
                x = x + tl.load(nb_ptr + cols, mask=cok, other=0.0).to(tl.float32)[None, :]
        if DIAG:
            x = x * tl.load(d_ptr + cols, mask=cok, other=0.0).to(tl.float32)[None, :]
    xmax = tl.max(tl.where(m, x, float("-inf")), axis=1)
    xmin = tl.min(tl.where(m, x, float("inf")), axis=1)
    scale, zero = qparams(xmin, xmax, BITS, SYMMETRIC, SCALE_EPS)
    q = tl.where(m, quant_codes(x, scale[:, None], zero[:, None], BITS, FAST_DIV) - OFFSET, 0.0).to(tl.int32)
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
    mean, rstd = norm_stats_chunked(x_ptr, rows64, rok, K, stride_xm, eps, NORM, BLOCK_M, BLOCK_C)
    xmax = tl.full([BLOCK_M], float("-inf"), tl.float32)
    xmin = tl.full([BLOCK_M], float("inf"), tl.float32)
    for c0 in range(0, K, BLOCK_C):
        y, m = _chunk(x_ptr, nw_ptr, nb_ptr, t_ptr, rows64, rok, c0, K, stride_xm, mean, rstd,
                      NORM, HAS_NB, TRANSFORM, BLOCK_C, PREC)
        xmax = tl.maximum(xmax, tl.max(tl.where(m, y, float("-inf")), axis=1))
        xmin = tl.minimum(xmin, tl.min(tl.where(m, y, float("inf")), axis=1))
    scale, zero = qparams(xmin, xmax, BITS, SYMMETRIC, SCALE_EPS)
    csum = tl.zeros([BLOCK_M], tl.int32)
    for c0 in range(0, K, BLOCK_C):
        y, m = _chunk(x_ptr, nw_ptr, nb_ptr, t_ptr, rows64, rok, c0, K, stride_xm, mean, rstd,
                      NORM, HAS_NB, TRANSFORM, BLOCK_C, PREC)
        q = tl.where(m, quant_codes(y, scale[:, None], zero[:, None], BITS, FAST_DIV) - OFFSET, 0.0).to(tl.int32)
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


