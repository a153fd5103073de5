"""W8A8 (and every weight-activation setting up to 8 bits) on int8 tensor cores: weight codes of 2..8 bits in int8
containers, per output channel or per group along K, times per-token activation codes of 2..8 bits, as an
int8 x int8 -> int32 GEMM whose epilogue applies the zero points and scales. W6A6 is the same path with 6-bit codes.

Public API
----------
- ``pack_w8a8_codes(codes, scale, zero, bits, group_size) -> W8A8Weight``: integer codes [N, K] in [0, 2^bits - 1]
  with their scale / zero point [N, K // g] (as aq.primitives or a calibration returns them) in the int8 layout.
- ``pack_w8a8_weight(w, bits=8, group_size=None, symmetric=False) -> W8A8Weight``: round-to-nearest of w [N, K] with
  aq.primitives' qparams, then the packing above.
- ``w8a8_matmul(a, weight, bias=None, out_dtype=torch.float16) -> y [..., N]``: a is the per-token
  ``aq.kernels.act_quant.QuantizedActivation`` of ``quantize_activation(x, abits, signed=True)`` (the one activation
  quantization kernel of aq, norm and transform fusion included). y = sum over groups of
  ((qa - za) sa) ((qw - zw) sw)^T + bias. ``out_dtype=torch.int32`` (one group only) returns the exact integer sum.
- ``w8a8_linear(x, weight, bias=None, *, abits=8, a_symmetric=False, out_dtype=None)``: both steps.
- ``w8a8_matmul_reference`` (plain torch, float64 integer sums) and ``pick_config`` (the one dispatch by M).
All calls go through ``aq.backend``: compiled Triton on CUDA, interpreted Triton on CPU under TRITON_INTERPRET=1, the
torch reference otherwise.

Formats
-------
- Codes are stored signed: c = q - 2^(bits-1) as int8 [N, K] (natural K order), so 8-bit codes fit a signed int8
  operand; the zero point is stored the same way (zw - 2^(bits-1), int32 [K // g, N]; 0 for symmetric weights) and
  q - z is unchanged. Scales are float32 [K // g, N] (row = group, contiguous along N), the per-group code sums of
  c int32 [K // g, N]. Activations come with the same shift (``signed=True``).
- Epilogue, per group of g columns: with acc = sum_k ca cw (int32 tensor-core accumulation) and Ra, Rw the group's
  code sums, sum_k (ca - za)(cw - zw) = acc - za Rw - zw Ra + g za zw, exact in int32 (|c| <= 128: every term is below
  2^31 for K < 32768). The group's integer times its weight scale is added to an fp32 accumulator; after the last
  group, one multiply by the token's scale and the bias. Per channel, Ra is the quantization kernel's code sum; with
  groups the kernel sums the activation codes of each K tile itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from aq import primitives
from aq.kernels.act_quant import QuantizedActivation, quantize_activation
from aq.kernels.common import cdiv, grouped_tile, launch, next_pow2
from aq.kernels.w4a4 import check_gemm_args, dispatch_gemm, gemm_rows

__all__ = ["W8A8Weight", "pack_w8a8_codes", "pack_w8a8_weight", "w8a8_matmul", "w8a8_matmul_reference",
           "w8a8_linear", "pick_config"]

MAX_K = 32767  # the int32 epilogue is exact below this (module doc)


@dataclass
class W8A8Weight:
    """A linear weight [N, K]: signed codes in int8 containers, per-group (or per-channel) qparams."""
    codes: torch.Tensor     # int8 [N, K], q - 2^(bits-1)
    scale: torch.Tensor     # float32 [K // g, N]
    zero: torch.Tensor      # int32 [K // g, N], z - 2^(bits-1)
    code_sum: torch.Tensor  # int32 [K // g, N], sum of the stored codes of each group
    N: int
    K: int
    bits: int = 8
    group_size: int | None = None  # effective group size (K: per output channel)

    def __post_init__(self):
        if self.group_size is None:
            self.group_size = self.K

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def per_channel(self) -> bool:
        return self.group_size == self.K

    def to(self, device) -> "W8A8Weight":
        return W8A8Weight(self.codes.to(device), self.scale.to(device), self.zero.to(device),
                          self.code_sum.to(device), self.N, self.K, self.bits, self.group_size)

    def unsigned_codes(self) -> torch.Tensor:
        """The codes q in [0, 2^bits - 1] as uint8 [N, K]."""
        return (self.codes.to(torch.int32) + 2 ** (self.bits - 1)).to(torch.uint8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        off = 2 ** (self.bits - 1)
        return primitives.dequantize(self.unsigned_codes(), self.scale.t(), self.zero.t().float() + off,
                                     self.group_size, dtype)


def _check_kbits(K: int, bits: int, what: str = "wbits") -> None:
    primitives.check_bits(bits, what)
    if K > MAX_K:
        raise ValueError(f"the W8A8 epilogue is exact in int32 for K <= {MAX_K}, got K={K}")


def pack_w8a8_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    group_size: int | None) -> W8A8Weight:
    """Integer codes [N, K] in [0, 2^bits - 1] with scale and zero point [N, K // g] -> the int8 layout."""
    if codes.dim() != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"codes must be a non-empty [N, K] tensor, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    N, K = codes.shape
    _check_kbits(K, bits)
    g = primitives.check_group_size(K, group_size)
    qmax = 2**bits - 1
    c = codes.to(torch.int32)
    if c.min() < 0 or c.max() > qmax:
        raise ValueError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}] not in [0, {qmax}]")
    if tuple(scale.shape) != (N, K // g) or tuple(zero.shape) != (N, K // g):
        raise ValueError(f"scale and zero must be [N, K // g] = {(N, K // g)}, got {tuple(scale.shape)} and "
                         f"{tuple(zero.shape)}")
    z = zero.float()
    if not torch.equal(z, z.round()) or z.min() < 0 or z.max() > qmax:
        raise ValueError(f"zero points must be integers in [0, {qmax}]")
    if not (scale > 0).all():
        raise ValueError("scales must be positive")
    off = 2 ** (bits - 1)
    cs = c - off
    sums = cs.reshape(N, K // g, g).sum(-1, dtype=torch.int32)
    return W8A8Weight(cs.to(torch.int8).contiguous(), scale.float().t().contiguous(),
                      (z.to(torch.int32) - off).t().contiguous(), sums.t().contiguous(), N, K, bits, g)


def pack_w8a8_weight(w: torch.Tensor, bits: int = 8, group_size: int | None = None,
                     symmetric: bool = False) -> W8A8Weight:
    """Quantize w [N, K] round-to-nearest (aq.primitives' qparams) per output channel or group, and pack it."""
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point or w.dim() != 2:
        raise ValueError("weight must be a floating-point [N, K] tensor")
    scale, zero = primitives.choose_qparams(w, bits, group_size, symmetric)
    return pack_w8a8_codes(primitives.quantize(w, scale, zero, bits, group_size), scale, zero, bits, group_size)


def _check_mm_args(a: QuantizedActivation, weight: W8A8Weight, bias, out_dtype):
    if not isinstance(weight, W8A8Weight):
        raise TypeError(f"weight must be a W8A8Weight (see pack_w8a8_weight), got {type(weight).__name__}")
    check_gemm_args(a, weight.K, weight.N, bias, out_dtype)
    if out_dtype == torch.int32 and not weight.per_channel:
        raise ValueError("out_dtype=torch.int32 (the exact integer sum) needs a per-channel weight: with groups the "
                         "sum is weighted by each group's scale")


# ----------------------------------------------------------------------------------------------------------- reference
def w8a8_matmul_reference(a: QuantizedActivation, weight: W8A8Weight, bias=None, out_dtype=torch.float16):
    """Plain torch: per group the exact integer sum_k (ca - za)(cw - zw) (float64 holds it), times the weight scale,
    summed over groups, times the token scale, plus bias."""
    _check_mm_args(a, weight, bias, out_dtype)
    K, N, g = weight.K, weight.N, weight.group_size
    lead = tuple(a.q.shape[:-1])
    qa = a.q.reshape(-1, K).double() - a.zero.reshape(-1, 1).double()
    qw = weight.codes.double() - weight.zero.t().double().repeat_interleave(g, 1)
    y = torch.zeros(qa.shape[0], N, dtype=torch.float64, device=qa.device)
    for i in range(K // g):  # one group at a time: memory M x N whatever the number of groups
        s = qa[:, i * g:(i + 1) * g] @ qw[:, i * g:(i + 1) * g].T  # integers
        if out_dtype == torch.int32:
            return s.round().to(torch.int32).reshape(*lead, N)
        y += s * weight.scale[i].double()
    y = y * a.scale.reshape(-1, 1).double()
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype).reshape(*lead, N)


# ----------------------------------------------------------------------------------------------------------- Triton
@triton.jit
def _group_dot(a_rows, w_rows, g0, G, rk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               EVEN_K: tl.constexpr, SUM_A: tl.constexpr):
    """sum over k in [g0, g0 + G) of ca cw as int32 [BLOCK_M, BLOCK_N] (and, with SUM_A, the activation code sums)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    ra = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in range(g0, g0 + G, BLOCK_K):
        ks = k0 + rk
        if EVEN_K:
            a = tl.load(a_rows + ks[None, :])
            w = tl.load(w_rows + ks[None, :])
        else:
            kok = ks < g0 + G
            a = tl.load(a_rows + ks[None, :], mask=kok[None, :], other=0)
            w = tl.load(w_rows + ks[None, :], mask=kok[None, :], other=0)
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        if SUM_A:
            ra += tl.sum(a.to(tl.int32), axis=1)
    return acc, ra


@triton.jit
def _correct(acc, ra, za, g, grp, wz_ptr, wcs_ptr, rn, nok):
    """sum_k (ca - za)(cw - zw) over a group of g columns from acc = sum_k ca cw and the code sums (module doc)."""
    zw = tl.load(wz_ptr + grp + rn, mask=nok, other=0)
    rw = tl.load(wcs_ptr + grp + rn, mask=nok, other=0)
    return acc - za[:, None] * rw[None, :] - (ra[:, None] - g * za[:, None]) * zw[None, :]


@triton.jit
def _w8a8_mm_kernel(
    a_ptr, w_ptr, y_ptr, as_ptr, az_ptr, acs_ptr, ws_ptr, wz_ptr, wcs_ptr, b_ptr,
    M, N, K, G, stride_am, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr, FORM: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile: int32 tl.dot accumulation per group of G columns, the zero-point correction
    (module doc), weighted by the group's weight scales into an fp32 accumulator; then the token scale and the bias.

    FORM 0: per channel (G = K): one int32 accumulator, the activation code sums of the quantization kernel.
    FORM 1: groups that BLOCK_K divides: one pipelined loop over K, the correction after a group's last step (every
    step when BLOCK_K == G); the activation code sums of each group are summed from the loaded tiles.
    FORM 2: any other group size: a loop per group with masked steps (correct, not fast)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mok = rm < M
    nok = rn < N
    # rows past M / N read a valid row (results are masked at the store), so only K needs masks
    a_rows = a_ptr + (rm % M).to(tl.int64)[:, None] * stride_am
    w_rows = w_ptr + (rn % N).to(tl.int64)[:, None] * stride_wn
    za = tl.load(az_ptr + rm, mask=mok, other=0)
    sa = tl.load(as_ptr + rm, mask=mok, other=0.0)
    ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    omask = mok[:, None] & nok[None, :]
    if FORM == 0:
        acc, _ = _group_dot(a_rows, w_rows, 0, K, rk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, False)
        s = _correct(acc, tl.load(acs_ptr + rm, mask=mok, other=0), za, K, 0, wz_ptr, wcs_ptr, rn, nok)
        if INT_OUT:
            y = s
        else:
            sw = tl.load(ws_ptr + rn, mask=nok, other=0.0)
            y = s.to(tl.float32) * (sa[:, None] * sw[None, :])
    elif FORM == 1:
        y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        ra = tl.zeros([BLOCK_M], dtype=tl.int32)
        a_ptrs = a_rows + rk[None, :]
        w_ptrs = w_rows + rk[None, :]
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs)
            acc = tl.dot(a, tl.trans(tl.load(w_ptrs)), acc, out_dtype=tl.int32)
            ra += tl.sum(a.to(tl.int32), axis=1)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            if (k0 + BLOCK_K) % G == 0:  # the group's last step
                grp = (k0 // G) * N
                s = _correct(acc, ra, za, G, grp, wz_ptr, wcs_ptr, rn, nok)
                y += s.to(tl.float32) * tl.load(ws_ptr + grp + rn, mask=nok, other=0.0)[None, :]
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
                ra = tl.zeros([BLOCK_M], dtype=tl.int32)
        y = y * sa[:, None]
    else:
        y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g0 in range(0, K, G):
            acc, ra = _group_dot(a_rows, w_rows, g0, G, rk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, True)
            grp = (g0 // G) * N
            s = _correct(acc, ra, za, G, grp, wz_ptr, wcs_ptr, rn, nok)
            y += s.to(tl.float32) * tl.load(ws_ptr + grp + rn, mask=nok, other=0.0)[None, :]
        y = y * sa[:, None]
    if not INT_OUT:
        if HAS_BIAS:
            y = y + tl.load(b_ptr + rn, mask=nok, other=0.0).to(tl.float32)[None, :]
    tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=omask)


# Per M bucket (first whose max_m >= M); untuned starting points (not measured yet). BLOCK_K is capped to the group
# (see _block_k).
_GPU_CONFIGS = [
    dict(max_m=16, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
    dict(max_m=64, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=4),
    dict(max_m=256, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(max_m=None, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
]
# The interpreter's cost is programs x steps: few, large blocks there.
_INTERPRET_CONFIGS = [
    dict(max_m=16, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1),
    dict(max_m=None, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=1),
]


def _block_k(cap: int, g: int) -> int:
    """The K step: the largest power of two <= cap dividing the group (no masks), else the smallest power of two
    >= 32 covering it (masked), 32 at least (the int8 tensor-core K)."""
    b = cap
    while b >= 32:
        if g % b == 0:
            return b
        b //= 2
    return max(32, min(cap, next_pow2(g)))


def _form(weight: W8A8Weight, block_k: int) -> int:
    """The kernel's FORM: 0 per channel, 1 groups that the K step divides, 2 other groups (masked steps)."""
    return 0 if weight.per_channel else 1 if weight.group_size % block_k == 0 else 2


def pick_config(M: int, N: int, K: int, group_size: int, device: torch.device | str = "cpu") -> dict:
    """The one place that dispatches the GEMM by M: block shapes and launch options for this problem."""
    table = _GPU_CONFIGS if torch.device(device).type == "cuda" else _INTERPRET_CONFIGS
    cfg = next((c for c in table if c["max_m"] is None or M <= c["max_m"]), table[-1])
    cfg = dict(cfg)
    cfg["BLOCK_K"] = _block_k(cfg["BLOCK_K"], group_size)
    if group_size < K and cfg["BLOCK_M"] * cfg["BLOCK_N"] > 128 * 64:
        cfg["BLOCK_N"] = 64  # grouped: an fp32 and an int32 accumulator; 128 x 128 of both spilled registers on sm_90
    return cfg


def w8a8_matmul_triton(a: QuantizedActivation, weight: W8A8Weight, bias=None, out_dtype=torch.float16,
                       config: dict | None = None):
    _check_mm_args(a, weight, bias, out_dtype)
    K, N, g = weight.K, weight.N, weight.group_size
    q, y, lead = gemm_rows(a, K, N, out_dtype)
    M = q.shape[0]
    if M == 0:
        return y.reshape(*lead, N)
    cfg = dict(config) if config is not None else pick_config(M, N, K, g, q.device)
    bk = cfg["BLOCK_K"]
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    args = [q, weight.codes, y, a.scale.reshape(-1), a.zero.reshape(-1), a.code_sum.reshape(-1), weight.scale,
            weight.zero, weight.code_sum, bias if bias is not None else weight.scale,
            M, N, K, g, q.stride(0), weight.codes.stride(0), y.stride(0)]
    consts = dict(HAS_BIAS=bias is not None, INT_OUT=out_dtype == torch.int32, FORM=_form(weight, bk),
                  EVEN_K=g % bk == 0, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk,
                  GROUP_M=cfg["GROUP_M"])  # in the kernel's parameter order (aq.kernels.common.launch)
    launch(_w8a8_mm_kernel, grid, args, consts, cfg["num_warps"], cfg["num_stages"])
    return y.reshape(*lead, N)


def w8a8_matmul(a: QuantizedActivation, weight: W8A8Weight, bias=None, out_dtype=torch.float16):
    """y = sum over groups ((qa - za) sa) ((qw - zw) sw)^T + bias, on whichever path aq.backend picks."""
    _check_mm_args(a, weight, bias, out_dtype)
    return dispatch_gemm(w8a8_matmul_triton, w8a8_matmul_reference, a, weight, weight.codes, bias, out_dtype)


def w8a8_linear(x, weight: W8A8Weight, bias=None, *, abits=8, a_symmetric=False, out_dtype=None, **norm_kw):
    """Quantize x [..., K] per token to signed abits-bit codes (norm_kw: the fused norm / transform of
    aq.kernels.act_quant.quantize_activation) and multiply by the int8 weight."""
    a = quantize_activation(x, abits, a_symmetric, signed=True, **norm_kw)
    return w8a8_matmul(a, weight, bias, x.dtype if out_dtype is None else out_dtype)
