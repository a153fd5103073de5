"""Fake quantization (quantize + dequantize) in Triton. Reference: aq.primitives.fake_quant.

The input is viewed as rows [R, K] (weight rows = output channels, activation rows = tokens); each program takes a block
of rows and one group of g columns, finds the group's range in a first pass and writes (q - z) * s in a second.
Arithmetic follows aq.primitives operation by operation in float32 so results match it exactly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from aq import backend, primitives
from aq.kernels.common import cdiv, div_rn, fake_quant_values, next_pow2, qparams, round_half_even

@triton.jit
def _fq_load_params(cmax_ptr, cmin_ptr, pidx, row_ok, BLOCK_R: tl.constexpr, HAS_CMAX: tl.constexpr,
                    HAS_CMIN: tl.constexpr):
    cmax = tl.full([BLOCK_R], 1.0, tl.float32)
    cmin = tl.full([BLOCK_R], 1.0, tl.float32)
    if HAS_CMAX:
        cmax = tl.load(cmax_ptr + pidx, mask=row_ok, other=1.0).to(tl.float32)
    if HAS_CMIN:
        cmin = tl.load(cmin_ptr + pidx, mask=row_ok, other=1.0).to(tl.float32)
    return cmax, cmin


@triton.jit
def _group_tile(R, K, G, NG, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """This program's BLOCK_R rows x one group: (rows, column offsets, row mask, row-group base offsets, stat index)."""
    gid = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    base = rows[:, None].to(tl.int64) * K + gid * G
    return rows, tl.arange(0, BLOCK_G), rows < R, base, rows.to(tl.int64) * NG + gid


@triton.jit
def fake_quant_fwd_kernel(
    x_ptr, out_ptr, cmax_ptr, cmin_ptr, stats_ptr, R, K, G, NG,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, EPS: tl.constexpr,
    HAS_CMAX: tl.constexpr, HAS_CMIN: tl.constexpr, SAVE_STATS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, SINGLE: tl.constexpr,
):
    """One program: BLOCK_R rows x one group. stats (if saved): [4, R, NG] = raw max, raw min, scale, zero.
    SINGLE: the group fits one block (one pass, values kept in registers); else two passes over the group."""
    rows, cols, row_ok, base, pidx = _group_tile(R, K, G, NG, BLOCK_R, BLOCK_G)
    cmax, cmin = _fq_load_params(cmax_ptr, cmin_ptr, pidx, row_ok, BLOCK_R, HAS_CMAX, HAS_CMIN)

    if SINGLE:
        m = row_ok[:, None] & (cols[None, :] < G)
        x = tl.load(x_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        xmax = tl.max(tl.where(m, x, float("-inf")), axis=1)
        xmin = tl.min(tl.where(m, x, float("inf")), axis=1)
    else:
        xmax = tl.full([BLOCK_R], float("-inf"), tl.float32)
        xmin = tl.full([BLOCK_R], float("inf"), tl.float32)
        for c0 in range(0, G, BLOCK_G):
            m = row_ok[:, None] & ((c0 + cols)[None, :] < G)
            x = tl.load(x_ptr + base + c0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            xmax = tl.maximum(xmax, tl.max(tl.where(m, x, float("-inf")), axis=1))
            xmin = tl.minimum(xmin, tl.min(tl.where(m, x, float("inf")), axis=1))
    xmax = tl.where(row_ok, xmax, 0.0)  # rows past R: keep their (unstored) arithmetic finite
    xmin = tl.where(row_ok, xmin, 0.0)

    scale, zero = qparams(xmin * cmin, xmax * cmax, BITS, SYMMETRIC, EPS)
    if SAVE_STATS:
        RG = R * NG
        tl.store(stats_ptr + pidx, xmax, mask=row_ok)
        tl.store(stats_ptr + RG + pidx, xmin, mask=row_ok)
        tl.store(stats_ptr + 2 * RG + pidx, scale, mask=row_ok)
        tl.store(stats_ptr + 3 * RG + pidx, zero, mask=row_ok)

    if SINGLE:
        y = fake_quant_values(x, scale[:, None], zero[:, None], BITS)
        tl.store(out_ptr + base + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=m)
    else:
        for c0 in range(0, G, BLOCK_G):
            m = row_ok[:, None] & ((c0 + cols)[None, :] < G)
            x = tl.load(x_ptr + base + c0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            y = fake_quant_values(x, scale[:, None], zero[:, None], BITS)
            tl.store(out_ptr + base + c0 + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fq_bwd_terms(x, g, m, xmax, xmin, scale, zero, QMAX: tl.constexpr):
    """Per-element pieces of the backward pass for one chunk of a group: (inside, sum g((q-z) - inside x/s),
    sum of g over clipped elements, count of x == max, count of x == min)."""
    v = div_rn(x, scale[:, None])
    rq = round_half_even(v) + zero[:, None]
    inside = (rq >= 0.0) & (rq <= QMAX)
    q = tl.minimum(tl.maximum(rq, 0.0), QMAX)
    gs = tl.sum(g * ((q - zero[:, None]) - tl.where(inside, v, 0.0)), axis=1)
    gout = tl.sum(tl.where(inside, 0.0, g), axis=1)
    nmax = tl.sum(tl.where(m & (x == xmax[:, None]), 1.0, 0.0), axis=1)
    nmin = tl.sum(tl.where(m & (x == xmin[:, None]), 1.0, 0.0), axis=1)
    return inside, gs, gout, nmax, nmin


@triton.jit
def _fq_bwd_gx(x, g, inside, xmax, xmin, gxmax, gxmin):
    gx = tl.where(inside, g, 0.0)
    gx += tl.where(x == xmax[:, None], gxmax[:, None], 0.0)
    gx += tl.where(x == xmin[:, None], gxmin[:, None], 0.0)
    return gx


@triton.jit
def _fake_quant_bwd_kernel(
    x_ptr, gy_ptr, gx_ptr, stats_ptr, cmax_ptr, cmin_ptr, gcmax_ptr, gcmin_ptr, R, K, G, NG,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, EPS: tl.constexpr,
    HAS_CMAX: tl.constexpr, HAS_CMIN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, SINGLE: tl.constexpr,
):
    """Gradients of y = fake_quant(x) (STE, LWC) w.r.t. x and the clipping factors, per BLOCK_R rows x one group.

    y_i = (q_i - z) s, q_i = clamp(round(x_i / s) + z, 0, Q); with inside_i = 0 <= round(x_i / s) + z <= Q:
      dL/dx_i (direct) = g_i inside_i
      dL/ds (direct)   = sum_i g_i ((q_i - z) - inside_i x_i / s)
      dL/dz            = -s sum_i g_i (1 - inside_i)
    then back through z = round(-b'/s), s = max((a' - b') / Q, eps), a' = max(a, 0), b' = min(b, 0) (asymmetric)
    or s = max(max(|a|, |b|) / (2^(b-1) - 1), eps) (symmetric), a = max_i x_i * cmax, b = min_i x_i * cmin, and the
    max/min reductions (gradient split evenly among the tied extreme elements).
    """
    rows, cols, row_ok, base, pidx = _group_tile(R, K, G, NG, BLOCK_R, BLOCK_G)
    QMAX: tl.constexpr = 2**BITS - 1
    RG = R * NG
    xmax = tl.load(stats_ptr + pidx, mask=row_ok, other=1.0)
    xmin = tl.load(stats_ptr + RG + pidx, mask=row_ok, other=-1.0)
    scale = tl.load(stats_ptr + 2 * RG + pidx, mask=row_ok, other=1.0)
    zero = tl.load(stats_ptr + 3 * RG + pidx, mask=row_ok, other=0.0)
    cmax, cmin = _fq_load_params(cmax_ptr, cmin_ptr, pidx, row_ok, BLOCK_R, HAS_CMAX, HAS_CMIN)

    # pass 1: group sums
    if SINGLE:
        m = row_ok[:, None] & (cols[None, :] < G)
        offs = base + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(gy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        inside, gs, gout, nmax, nmin = _fq_bwd_terms(x, g, m, xmax, xmin, scale, zero, QMAX)
    else:
        gs = tl.zeros([BLOCK_R], tl.float32)
        gout = tl.zeros([BLOCK_R], tl.float32)  # sum of g over clipped elements
        nmax = tl.zeros([BLOCK_R], tl.float32)
        nmin = tl.zeros([BLOCK_R], tl.float32)
        for c0 in range(0, G, BLOCK_G):
            m = row_ok[:, None] & ((c0 + cols)[None, :] < G)
            offs = base + c0 + cols[None, :]
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            g = tl.load(gy_ptr + offs, mask=m, other=0.0).to(tl.float32)
            inside, gs1, gout1, nmax1, nmin1 = _fq_bwd_terms(x, g, m, xmax, xmin, scale, zero, QMAX)
            gs += gs1
            gout += gout1
            nmax += nmax1
            nmin += nmin1

    a = xmax * cmax
    b = xmin * cmin
    if SYMMETRIC:
        QS: tl.constexpr = 2 ** (BITS - 1) - 1
        aa = tl.abs(a)
        ab = tl.abs(b)
        r = tl.maximum(aa, ab) / QS
        gm = tl.where(r >= EPS, gs, 0.0) / QS
        ga_abs = tl.where(aa > ab, gm, tl.where(aa == ab, gm * 0.5, 0.0))
        gb_abs = tl.where(ab > aa, gm, tl.where(aa == ab, gm * 0.5, 0.0))
        ga = tl.where(a > 0, ga_abs, tl.where(a < 0, -ga_abs, 0.0))
        gb = tl.where(b > 0, gb_abs, tl.where(b < 0, -gb_abs, 0.0))
    else:
        a2 = tl.maximum(a, 0.0)
        b2 = tl.minimum(b, 0.0)
        r = (a2 - b2) / QMAX
        gz = -scale * gout
        gs_tot = gs + gz * b2 / (scale * scale)
        gr = tl.where(r >= EPS, gs_tot, 0.0)
        ga = tl.where(a >= 0, gr / QMAX, 0.0)
        gb = tl.where(b <= 0, -gz / scale - gr / QMAX, 0.0)
    gxmax = ga * cmax / tl.maximum(nmax, 1.0)
    gxmin = gb * cmin / tl.maximum(nmin, 1.0)
    if HAS_CMAX:
        tl.store(gcmax_ptr + pidx, ga * xmax, mask=row_ok)
    if HAS_CMIN:
        tl.store(gcmin_ptr + pidx, gb * xmin, mask=row_ok)

    # pass 2: gradient w.r.t. x
    if SINGLE:
        gx = _fq_bwd_gx(x, g, inside, xmax, xmin, gxmax, gxmin)
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)
    else:
        for c0 in range(0, G, BLOCK_G):
            m = row_ok[:, None] & ((c0 + cols)[None, :] < G)
            offs = base + c0 + cols[None, :]
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            g = tl.load(gy_ptr + offs, mask=m, other=0.0).to(tl.float32)
            rq = round_half_even(div_rn(x, scale[:, None])) + zero[:, None]
            inside = (rq >= 0.0) & (rq <= QMAX)
            gx = _fq_bwd_gx(x, g, inside, xmax, xmin, gxmax, gxmin)
            tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)


def _block_shape(R: int, g: int) -> tuple[int, int]:
    block_g = min(next_pow2(g), 2048)
    block_r = max(1, min(next_pow2(R), 4096 // block_g))
    return block_r, block_g


def as_group_rows(t: torch.Tensor | None, R: int, NG: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(R, NG).contiguous()


def fake_quant_fwd(x2: torch.Tensor, bits: int, g: int, symmetric: bool, cmax: torch.Tensor | None = None,
                   cmin: torch.Tensor | None = None, save_stats: bool = False, out_dtype: torch.dtype | None = None):
    """Launch the forward kernel on rows x2 [R, K] (contiguous). Returns (out, stats or None)."""
    R, K = x2.shape
    NG = K // g
    out = torch.empty((R, K), dtype=out_dtype or x2.dtype, device=x2.device)
    stats = torch.empty((4, R, NG), dtype=torch.float32, device=x2.device) if save_stats else None
    if R == 0 or K == 0:
        return out, stats
    block_r, block_g = _block_shape(R, g)
    grid = (cdiv(R, block_r), NG)
    dummy = x2
    fake_quant_fwd_kernel[grid](
        x2, out, cmax if cmax is not None else dummy, cmin if cmin is not None else dummy,
        stats if stats is not None else out, R, K, g, NG,
        BITS=bits, SYMMETRIC=symmetric, EPS=primitives.SCALE_EPS,
        HAS_CMAX=cmax is not None, HAS_CMIN=cmin is not None, SAVE_STATS=save_stats,
        BLOCK_R=block_r, BLOCK_G=block_g, SINGLE=g <= block_g, num_warps=4,
    )
    return out, stats


def fake_quant_bwd(x2: torch.Tensor, gy: torch.Tensor, stats: torch.Tensor, bits: int, g: int, symmetric: bool,
                   cmax: torch.Tensor | None = None, cmin: torch.Tensor | None = None,
                   gx_dtype: torch.dtype | None = None):
    """Launch the backward kernel. Returns (grad x [R, K], grad cmax [R, NG] or None, grad cmin or None)."""
    R, K = x2.shape
    NG = K // g
    gy = gy.reshape(R, K).contiguous()
    gx = torch.empty((R, K), dtype=gx_dtype or x2.dtype, device=x2.device)
    gcmax = torch.empty((R, NG), dtype=torch.float32, device=x2.device) if cmax is not None else None
    gcmin = torch.empty((R, NG), dtype=torch.float32, device=x2.device) if cmin is not None else None
    if R == 0 or K == 0:
        return gx, gcmax, gcmin
    block_r, block_g = _block_shape(R, g)
    grid = (cdiv(R, block_r), NG)
    _fake_quant_bwd_kernel[grid](
        x2, gy, gx, stats, cmax if cmax is not None else stats, cmin if cmin is not None else stats,
        gcmax if gcmax is not None else stats, gcmin if gcmin is not None else stats, R, K, g, NG,
        BITS=bits, SYMMETRIC=symmetric, EPS=primitives.SCALE_EPS,
        HAS_CMAX=cmax is not None, HAS_CMIN=cmin is not None,
        BLOCK_R=block_r, BLOCK_G=block_g, SINGLE=g <= block_g, num_warps=4,
    )
    return gx, gcmax, gcmin


def fake_quant_triton(x: torch.Tensor, bits: int, group_size: int | None = None,
                      symmetric: bool = False) -> torch.Tensor:
    """Triton fake quantization of x (..., K) per row or per group of group_size columns."""
    primitives.check_bits(bits)
    K = x.shape[-1]
    g = primitives.check_group_size(K, group_size)
    out, _ = fake_quant_fwd(x.reshape(-1, K).contiguous(), bits, g, symmetric)
    return out.reshape(x.shape)


def fake_quant(x: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False) -> torch.Tensor:
    """Fake quantization on whichever path aq.backend picks for x."""
    if backend.choose(x) == backend.TRITON:
        return fake_quant_triton(x, bits, group_size, symmetric)
    return primitives.fake_quant(x, bits, group_size, symmetric)


# ---------------------------------------------------------------------------------------------------------------------
# Differentiable fake quantization (straight-through rounding, learnable weight clipping): torch reference
# ---------------------------------------------------------------------------------------------------------------------

def round_ste(v: torch.Tensor) -> torch.Tensor:
    """torch.round in the forward pass, identity in the backward pass (straight-through estimator).
    Value: round(v) + (v - v) = round(v) exactly."""
    return torch.round(v).detach() + (v - v.detach())


def fake_quant_ste_reference(x: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False,
                             u: torch.Tensor | None = None, l: torch.Tensor | None = None) -> torch.Tensor:
    """What the fake-quant kernels differentiate, in plain torch (autograd on this is the ground truth).

    Same operations as aq.primitives.fake_quant (values are bit-identical), with:
      - learnable clipping: xmax' = sigmoid(u) * max, xmin' = sigmoid(l) * min per row (or group), before the
        range extension to 0 (asymmetric) or max(|xmax'|, |xmin'|) (symmetric);
      - round(x / s) and the zero point round(-xmin' / s) through round_ste;
      - max/min reductions give their gradient to the extreme elements (split evenly among ties), the clamps give zero
        gradient outside their range (torch's inclusive convention), the scale clamp at SCALE_EPS likewise.
    """
    primitives.check_bits(bits)
    K = x.shape[-1]
    g = primitives.check_group_size(K, group_size)
    xg = x.float().reshape(*x.shape[:-1], K // g, g)
    xmax = xg.amax(-1)
    xmin = xg.amin(-1)
    if u is not None:
        xmax = xmax * torch.sigmoid(u.float())
    if l is not None:
        xmin = xmin * torch.sigmoid(l.float())
    qmax = 2**bits - 1
    if symmetric:
        amax = torch.maximum(xmax.abs(), xmin.abs())
        # tensor divisors, as in aq.primitives: torch on CUDA turns division by a Python scalar into a multiply by
        # its reciprocal, 1 ulp off the IEEE division the kernels (and the CPU) compute
        scale = (amax / torch.full_like(amax, 2 ** (bits - 1) - 1)).clamp(min=primitives.SCALE_EPS)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        xmin = xmin.clamp(max=0)
        xmax = xmax.clamp(min=0)
        scale = ((xmax - xmin) / torch.full_like(xmax, qmax)).clamp(min=primitives.SCALE_EPS)
        zero = round_ste(-xmin / scale)
    s = scale.unsqueeze(-1)
    z = zero.unsqueeze(-1)
    q = torch.clamp(round_ste(xg / s) + z, 0, qmax)
    return ((q - z) * s).reshape(x.shape).to(x.dtype)


def check_lwc(x: torch.Tensor, group_size: int | None, t: torch.Tensor | None, what: str) -> None:
    if t is None:
        return
    K = x.shape[-1]
    g = primitives.check_group_size(K, group_size)
    want = tuple(x.shape[:-1]) + (K // g,)
    if tuple(t.shape) != want:
        raise ValueError(f"LWC logits {what} have shape {tuple(t.shape)}, expected {want} (x.shape[:-1] + (K // g,))")


class _FakeQuantSTE(torch.autograd.Function):
    """Triton fake quantization with straight-through gradients; clipping enters as factors cmax = sigmoid(u),
    cmin = sigmoid(l) (torch differentiates the sigmoid)."""

    @staticmethod
    def forward(ctx, x, cmax, cmin, bits, g, symmetric):
        K = x.shape[-1]
        x2 = x.reshape(-1, K).contiguous()
        R, NG = x2.shape[0], K // g
        cmax2 = as_group_rows(cmax, R, NG)
        cmin2 = as_group_rows(cmin, R, NG)
        out, stats = fake_quant_fwd(x2, bits, g, symmetric, cmax2, cmin2, save_stats=True)
        ctx.save_for_backward(x2, stats, cmax2, cmin2)
        ctx.cfg = (bits, g, symmetric, x.shape, None if cmax is None else cmax.shape,
                   None if cmin is None else cmin.shape)
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, gy):
        x2, stats, cmax2, cmin2 = ctx.saved_tensors
        bits, g, symmetric, xshape, cmax_shape, cmin_shape = ctx.cfg
        gx, gcmax, gcmin = fake_quant_bwd(x2, gy, stats, bits, g, symmetric,
                                          cmax2 if ctx.needs_input_grad[1] or cmax2 is not None else None,
                                          cmin2 if ctx.needs_input_grad[2] or cmin2 is not None else None)
        gx = gx.reshape(xshape) if ctx.needs_input_grad[0] else None
        gcmax = gcmax.reshape(cmax_shape) if gcmax is not None and ctx.needs_input_grad[1] else None
        gcmin = gcmin.reshape(cmin_shape) if gcmin is not None and ctx.needs_input_grad[2] else None
        return gx, gcmax, gcmin, None, None, None


def lwc_factors(u: torch.Tensor | None, l: torch.Tensor | None):
    """Clipping factors (sigmoid(u), sigmoid(l)) in float32, None where no logits are given."""
    return (None if u is None else torch.sigmoid(u.float()), None if l is None else torch.sigmoid(l.float()))


def fake_quant_ste(x: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False,
                   u: torch.Tensor | None = None, l: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable fake quantization of x (..., K), per row (group_size None: per output channel of a weight,
    per token of an activation) or per group of group_size columns; u, l: LWC logits of shape x.shape[:-1] + (K // g,)
    (or None). Gradients flow to x, u and l (straight-through rounding); output in x's dtype, gradient of x too.
    Runs the Triton autograd.Function where aq.backend picks Triton, fake_quant_ste_reference otherwise."""
    primitives.check_bits(bits)
    g = primitives.check_group_size(x.shape[-1], group_size)
    check_lwc(x, group_size, u, "u")
    check_lwc(x, group_size, l, "l")
    tensors = [t for t in (x, u, l) if t is not None]
    if backend.choose(*tensors) == backend.TRITON:
        cmax, cmin = lwc_factors(u, l)
        return _FakeQuantSTE.apply(x, cmax, cmin, bits, g, symmetric)
    return fake_quant_ste_reference(x, bits, group_size, symmetric, u, l)
