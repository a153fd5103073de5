"""Quantization primitives in plain torch: the reference every kernel is tested against.

One scheme covers weights and activations. A tensor x of shape (..., K) is quantized row by row over its last dim,
either over the whole row (per output channel for a weight [N, K], per token for an activation [T, K]) or in groups of
`group_size` consecutive columns. Codes are unsigned: q = clamp(round(x / s) + z, 0, 2^b - 1), x_hat = (q - z) * s.

- asymmetric: the range [min, max] is first extended to include 0 (so 0 is exactly representable),
  s = (max - min) / (2^b - 1), z = round(-min / s).
- symmetric: s = max|x| / (2^(b-1) - 1), z = 2^(b-1).
The scale is clamped to at least SCALE_EPS so that a constant group never divides by zero. Rounding is torch.round
(half to even). All arithmetic is float32 whatever the input dtype; outputs of fake_quant come back in the input dtype.
"""
from __future__ import annotations

import torch

SCALE_EPS = 1e-5
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"unsupported {what}={bits!r}: aq quantizes with {MIN_BITS}..{MAX_BITS} bits")
    return bits


def check_group_size(K: int, group_size: int | None) -> int:
    """Return the effective group size (K for per-row) after checking that it divides K."""
    if group_size is None:
        return K
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        # one spelling of "per row" (None): a 0 or -1 here is a caller's mistake, not a synonym
        raise ValueError(f"group size must be a positive integer or None (per row), got {group_size!r}")
    if K % group_size != 0:
        raise ValueError(f"group size {group_size} does not divide the input dimension K={K}")
    return group_size


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    K = x.shape[-1]
    g = check_group_size(K, group_size)
    return x.float().reshape(*x.shape[:-1], K // g, g)


def choose_qparams(
    x: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    clip_max: torch.Tensor | None = None,
    clip_min: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point, float32, shape (..., K // g).

    clip_max / clip_min (learned weight clipping) multiply the group's max and min (shape (..., K // g) or
    broadcastable).
    """
    check_bits(bits)
    xg = _grouped(x, group_size)
    xmax = xg.amax(-1)
    xmin = xg.amin(-1)
    if clip_max is not None:
        xmax = xmax * clip_max
    if clip_min is not None:
        xmin = xmin * clip_min
    if symmetric:
        amax = torch.maximum(xmax.abs(), xmin.abs())
        scale = (amax / torch.full_like(amax, 2 ** (bits - 1) - 1)).clamp(min=SCALE_EPS)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        xmin = xmin.clamp(max=0)
        xmax = xmax.clamp(min=0)
        # a tensor divisor: torch on CUDA turns division by a Python scalar into a multiply by its reciprocal,
        # which is 1 ulp off IEEE division (what the CPU and the kernels compute) for many values
        scale = ((xmax - xmin) / torch.full_like(xmax, 2**bits - 1)).clamp(min=SCALE_EPS)
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
             group_size: int | None = None) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1] as uint8, shape of x."""
    check_bits(bits)
    xg = _grouped(x, group_size)
    q = torch.clamp(torch.round(xg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**bits - 1)
    return q.reshape(x.shape).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    qg = _grouped(q, group_size)
    return ((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(q.shape).to(dtype)


def fake_quant(x: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False,
               clip_max: torch.Tensor | None = None, clip_min: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize, returned in x's dtype (reference for the fake-quant kernels)."""
    scale, zero = choose_qparams(x, bits, group_size, symmetric, clip_max, clip_min)
    return dequantize(quantize(x, scale, zero, bits, group_size), scale, zero, group_size, x.dtype)
