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

# 1.5 * 2^23: adding and subtracting it rounds an fp32 |v| < 2^22 to the nearest integer, ties to even (as torch.round),
# in compiled and interpreted Triton alike.
_RNE = tl.constexpr(12582912.0)  # a global read inside @triton.jit must be constexpr


@triton.jit
def round_half_even(v):
    return (v + _RNE) - _RNE


@triton.jit
def _fake_quant_fwd_kernel(
    x_ptr, out_ptr, R, K, G,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, EPS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_r = tl.program_id(0)
    gid = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_G)
    row_ok = rows < R
    base = rows[:, None].to(tl.int64) * K + gid * G
    QMAX: tl.constexpr = 2**BITS - 1

    # pass 1: the group's min and max
    xmax = tl.full([BLOCK_R], float("-inf"), tl.float32)
    xmin = tl.full([BLOCK_R], float("inf"), tl.float32)
    for c0 in range(0, G, BLOCK_G):
        m = row_ok[:, None] & ((c0 + cols)[None, :] < G)
        x = tl.load(x_ptr + base + c0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
        xmax = tl.maximum(xmax, tl.max(tl.where(m, x, float("-inf")), axis=1))
        xmin = tl.minimum(xmin, tl.min(tl.where(m, x, float("inf")), axis=1))

    if SYMMETRIC:
        amax = tl.maximum(tl.abs(xmax), tl.abs(xmin))
        scale = tl.maximum(amax / (2 ** (BITS - 1) - 1), EPS)
        zero = tl.full([BLOCK_R], 2 ** (BITS - 1), tl.float32)
    else:
        xmin = tl.minimum(xmin, 0.0)
        xmax = tl.maximum(xmax, 0.0)
        scale = tl.maximum((xmax - xmin) / QMAX, EPS)
        zero = round_half_even(-xmin / scale)

    # pass 2: quantize-dequantize (a group that fits one block is still in registers)
    for c0 in range(0, G, BLOCK_G):
        m = row_ok[:, None] & ((c0 + cols)[None, :] < G)
        x = tl.load(x_ptr + base + c0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
        q = round_half_even(x / scale[:, None]) + zero[:, None]
        q = tl.minimum(tl.maximum(q, 0.0), QMAX)
        y = (q - zero[:, None]) * scale[:, None]
        tl.store(out_ptr + base + c0 + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=m)


def _block_shape(R: int, g: int) -> tuple[int, int]:
    block_g = min(triton.next_power_of_2(g), 2048)
    block_r = max(1, min(triton.next_power_of_2(R), 4096 // block_g))
    return block_r, block_g


def fake_quant_triton(x: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False) -> torch.Tensor:
    """Triton fake quantization of x (..., K) per row or per group of group_size columns."""
    primitives.check_bits(bits)
    K = x.shape[-1]
    g = primitives.check_group_size(K, group_size)
    x2 = x.reshape(-1, K).contiguous()
    R = x2.shape[0]
    out = torch.empty_like(x2)
    if R == 0:
        return out.reshape(x.shape)
    block_r, block_g = _block_shape(R, g)
    grid = (triton.cdiv(R, block_r), K // g)
    _fake_quant_fwd_kernel[grid](
        x2, out, R, K, g, BITS=bits, SYMMETRIC=symmetric, EPS=primitives.SCALE_EPS,
        BLOCK_R=block_r, BLOCK_G=block_g, num_warps=4,
    )
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

    For |v| < 2^22 the value is exactly torch.round(v): round(v) - v is exact (Sterbenz) and so is the sum."""
    return v + (torch.round(v) - v).detach()


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
        scale = (amax / (2 ** (bits - 1) - 1)).clamp(min=primitives.SCALE_EPS)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        xmin = xmin.clamp(max=0)
        xmax = xmax.clamp(min=0)
        scale = ((xmax - xmin) / qmax).clamp(min=primitives.SCALE_EPS)
        zero = round_ste(-xmin / scale)
    s = scale.unsqueeze(-1)
    z = zero.unsqueeze(-1)
    q = torch.clamp(round_ste(xg / s) + z, 0, qmax)
    return ((q - z) * s).reshape(x.shape).to(x.dtype)


def _check_lwc(x: torch.Tensor, group_size: int | None, t: torch.Tensor | None, what: str) -> None:
    if t is None:
        return
    K = x.shape[-1]
    g = primitives.check_group_size(K, group_size)
    want = tuple(x.shape[:-1]) + (K // g,)
    if tuple(t.shape) != want:
        raise ValueError(f"LWC logits {what} have shape {tuple(t.shape)}, expected {want} (x.shape[:-1] + (K // g,))")


def fake_quant_ste(x: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False,
                   u: torch.Tensor | None = None, l: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable fake quantization of x (..., K), per row (group_size None: per output channel of a weight,
    per token of an activation) or per group of group_size columns; u, l: LWC logits of shape x.shape[:-1] + (K // g,)
    (or None). Gradients flow to x, u and l (straight-through rounding). Runs on the path aq.backend picks."""
    primitives.check_bits(bits)
    primitives.check_group_size(x.shape[-1], group_size)
    _check_lwc(x, group_size, u, "u")
    _check_lwc(x, group_size, l, "l")
    return fake_quant_ste_reference(x, bits, group_size, symmetric, u, l)
