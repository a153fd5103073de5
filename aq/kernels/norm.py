"""Norm + transform in one kernel: y = norm(x) * w (+ b), then times a diagonal or a block-diagonal matrix.

This is how a weight-only (W4A16) model pays for an AffineQuant transform whose inverse cannot be folded into the
weights: the activation after the norm is X A^-1, and with A^-1 diagonal ([K]) or block-diagonal ([K // h, h, h],
``y[:, b*h:(b+1)*h] @ T[b]``) the product happens in registers inside the norm kernel (no extra pass over memory, no
dense K x K matmul). Same conventions as aq.kernels.w4a4.quantize_activation's ``transform`` (right multiplication).

Public API
----------
- ``norm_transform(x, norm="rms", weight, bias=None, eps=1e-6, transform=None) -> y`` (x's dtype, shape of x),
  dispatched by aq.backend (compiled Triton on CUDA, interpreted on CPU under TRITON_INTERPRET=1, torch otherwise).
- ``norm_transform_reference(...)``: plain torch, float32 arithmetic, one rounding to x's dtype at the end.

Kernel: one program per block of rows; pass 1 accumulates the row statistics over K in chunks (a second pass for the
variance of a LayerNorm, so no cancellation), pass 2 normalizes a chunk (or a transform block) and multiplies it by the
diagonal or by the h x h block with tl.dot (fp32, tf32x3 on the GPU). The row is read two or three times, from L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from aq import backend
from aq.kernels.common import norm_stats_chunked

_NORMS = {"rms": 1, "layer": 2}


def _check(x, norm, weight, bias, transform):
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError("x must be a float16, bfloat16 or float32 tensor")
    if norm not in _NORMS:
        raise ValueError(f"norm must be 'rms' or 'layer', got {norm!r}")
    K = x.shape[-1]
    if weight is None or tuple(weight.shape) != (K,):
        raise ValueError(f"norm weight must have shape [{K}], got {None if weight is None else tuple(weight.shape)}")
    if bias is not None and (norm != "layer" or tuple(bias.shape) != (K,)):
        raise ValueError(f"a norm bias needs norm='layer' and shape [{K}]")
    if transform is not None:
        check_transform(transform, K)


def check_transform(transform: torch.Tensor, K: int) -> None:
    """A norm-side transform the kernels apply: diagonal [K] or block-diagonal [K // h, h, h], h a power of two
    >= 16."""
    if transform.dim() == 1:
        if transform.shape[0] != K:
            raise ValueError(f"a diagonal transform must have shape [{K}], got {tuple(transform.shape)}")
    elif transform.dim() == 3:
        nb, h, h2 = transform.shape
        if h != h2 or nb * h != K:
            raise ValueError(f"a block-diagonal transform must have shape [K // h, h, h] with K={K}, "
                             f"got {tuple(transform.shape)}")
        if h < 16 or h & (h - 1):
            raise ValueError(f"block-diagonal transform blocks must be a power of two >= 16, got h={h}")
    else:
        raise ValueError(f"transform must be [K] (diagonal) or [K // h, h, h] (block-diagonal), "
                         f"got shape {tuple(transform.shape)}")


def norm_transform_reference(x, norm="rms", weight=None, bias=None, eps=1e-6, transform=None):
    _check(x, norm, weight, bias, transform)
    y = x.float()
    if norm == "layer":
        y = y - y.mean(-1, keepdim=True)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    if transform is not None:
        y = apply_transform(y, transform)
    return y.to(x.dtype)


def apply_transform(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """y @ T for T diagonal [K], block-diagonal [K // h, h, h] or full [K, K]; float32 arithmetic, y's dtype out."""
    yf, tf = y.float(), t.float()
    if tf.dim() == 1:
        out = yf * tf
    elif tf.dim() == 3:
        nb, h, _ = tf.shape
        out = torch.einsum("...bi,bij->...bj", yf.reshape(*yf.shape[:-1], nb, h), tf).reshape(yf.shape)
    else:
        out = yf @ tf
    return out.to(y.dtype)


@triton.jit
def _norm_transform_kernel(x_ptr, w_ptr, b_ptr, t_ptr, y_ptr, M, K, stride_xm, stride_ym, eps,
                           NORM: tl.constexpr, HAS_B: tl.constexpr, TRANSFORM: tl.constexpr, H: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rok = rows < M
    rows64 = rows.to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    # pass 1: mean (LayerNorm) and the mean square of the (centred) row
    mean, rstd = norm_stats_chunked(x_ptr, rows64, rok, K, stride_xm, eps, NORM, BLOCK_M, BLOCK_C)
    # pass 2: normalize, scale, transform, store
    if TRANSFORM == 2:
        hh = tl.arange(0, H)
        for b in range(0, K // H):
            cols = b * H + hh
            m = rok[:, None] & (cols < K)[None, :]
            xv = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=m, other=0.0).to(tl.float32)
            y = (xv - mean[:, None]) * rstd[:, None] * tl.load(w_ptr + cols).to(tl.float32)[None, :]
            if HAS_B:
                y += tl.load(b_ptr + cols).to(tl.float32)[None, :]
            t = tl.load(t_ptr + b * H * H + hh[:, None] * H + hh[None, :]).to(tl.float32)
            out = tl.dot(y, t, input_precision=PREC)
            tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :], out.to(y_ptr.dtype.element_ty), mask=m)
    else:
        for c0 in range(0, K, BLOCK_C):
            cols = c0 + cc
            cok = cols < K
            m = rok[:, None] & cok[None, :]
            xv = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=m, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + cols, mask=cok, other=0.0).to(tl.float32)
            y = (xv - mean[:, None]) * rstd[:, None] * wv[None, :]
            if HAS_B:
                y += tl.load(b_ptr + cols, mask=cok, other=0.0).to(tl.float32)[None, :]
            if TRANSFORM == 1:
                y = y * tl.load(t_ptr + cols, mask=cok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


def norm_transform_triton(x, norm="rms", weight=None, bias=None, eps=1e-6, transform=None):
    _check(x, norm, weight, bias, transform)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, K, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(x.shape)
    code = 0 if transform is None else (1 if transform.dim() == 1 else 2)
    h = transform.shape[1] if code == 2 else 16
    interp = backend.interpreting()
    if code == 2:
        block_m = 16 if M <= 16 or interp else 32
    else:
        block_m = 1 if M <= 64 and not interp else 16
    block_c = min(triton.next_power_of_2(K), 4096 if interp else 1024)
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w
    t = transform.float().contiguous() if transform is not None else w
    _norm_transform_kernel[(triton.cdiv(M, block_m),)](
        x2, w, b, t, y, M, K, x2.stride(0), y.stride(0), float(eps),
        NORM=_NORMS[norm], HAS_B=bias is not None, TRANSFORM=code, H=h, BLOCK_M=block_m, BLOCK_C=block_c,
        PREC="ieee" if interp else "tf32x3", num_warps=4)
    return y.reshape(x.shape)


def norm_transform(x, norm="rms", weight=None, bias=None, eps=1e-6, transform=None):
    """norm(x) * weight (+ bias), times the diagonal / block-diagonal transform, in x's dtype."""
    tensors = [t for t in (x, weight, bias, transform) if isinstance(t, torch.Tensor)]
    if backend.choose(*tensors) == backend.TRITON:
        return norm_transform_triton(x, norm, weight, bias, eps, transform)
    return norm_transform_reference(x, norm, weight, bias, eps, transform)
