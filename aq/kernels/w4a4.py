"""W4A4 on int8 tensor cores: per-token activation quantization (fused with the norm and transform before it), int4
weight packing, and an int8 x int8 -> int32 GEMM with a fused dequantizing epilogue. Hopper has no int4 tensor cores, so
int4 is the storage format and int8 the arithmetic.

Public API
----------
- ``pack_w4a4_weight(w, wbits=4, symmetric=False, scale=None, zero=None) -> W4A4Weight``
  Per-output-channel quantization of w [N, K] (codes of ``aq.primitives.quantize``), packed two codes per byte, plus the
  per-channel scale, zero point and row sum of the codes (for the zero-point correction in the GEMM epilogue).
  Pass ``scale``/``zero`` ([N]) to pack with calibrated qparams (e.g. learned clipping) instead of min/max ones.
- ``quantize_activation(x, bits=4, ...) -> QuantizedActivation(q, scale, zero, code_sum)``: per-token activation
  codes, fused with the norm and transform before them; in aq.kernels.act_quant (re-exported here).
- ``w4a4_matmul(a: QuantizedActivation, weight: W4A4Weight, bias=None, out_dtype=torch.float16) -> y [..., N]``
  y = ((qa - za) sa) ((qw - zw) sw)^T + bias. ``out_dtype=torch.int32`` returns the exact integer sum_k (qa-za)(qw-zw).
- ``w4a4_linear(x, weight, bias=None, *, abits=4, a_symmetric=False, norm=..., transform=..., out_dtype=None)``:
  both steps; out_dtype defaults to x's dtype (float32 for float32 inputs).
- References in plain torch beside them: ``w4a4_matmul_reference`` (and act_quant's
  ``quantize_activation_reference``). Also ``pick_config(M, N, K, device)`` (the dispatch), ``unpack_weight_int8`` and
  ``check_gemm_args`` / ``gemm_rows`` / ``dispatch_gemm`` (the checks, operands and backend choice of an integer
  GEMM, shared with aq.kernels.w8a8).
All calls go through ``aq.backend``: compiled Triton on CUDA, interpreted Triton on CPU under TRITON_INTERPRET=1, the
torch references otherwise.

Formats
-------
- Weight codes, [N, Kh] uint8 with Kh = ceil(K / 2) (aq.packing.pack_w4a4_nibbles): byte j of row n holds code k = j
  in its low nibble and code k = Kh + j in its high nibble (0 past K). A K-step of the GEMM loads one
  [BLOCK_N, BLOCK_KH] byte tile and gets two int8 operand tiles (``p & 15`` and ``p >> 4``) whose activation partners
  are two contiguous column ranges of A, so no interleaving is needed in registers.
- Epilogue: with acc = sum_k qa qw (unsigned codes, int8 operands, int32 accumulator),
  sum_k (qa - za)(qw - zw) = acc - za * Rw[n] - zw[n] * Ra[m] + K za zw, Rw the weight code row sums (pack time) and
  Ra the activation code row sums (written by the quantization kernel). All of it is exact int32; one float multiply
  by sa * sw, plus bias, gives the output.
- Activation codes: see aq.kernels.act_quant (exactly those of aq.primitives on the CPU).

GEMM kernels and dispatch
-------------------------
Dispatch by M lives in ``pick_config`` alone: small M runs the "swap" form (the weight tile is the wide side of the dot,
the few tokens the narrow side), larger M the plain tiled form; per M bucket the block shapes and options come from the
"w4a4" entry of ``configs/<GPU_NAME>.json`` (aq.kernels.tuned) when present (written by ``bench/w4a4.py sweep``), else
from DEFAULT_CONFIGS (the H100 winners). Options: TMA (tensor-descriptor loads; used when K % 32 == 0 and the K tiles
divide), W8 (large M: the weight is unpacked to int8 in one extra pass, so both operands go straight from TMA to the
tensor cores), SPLIT (split-K with self-resetting per-device tile counters: one such GEMM at a time per device; allocate
them outside CUDA-graph capture by calling once first). Measured on the H100 (bench/results/w4a4.md): 1.9-3.0x cuBLAS
bf16 at M <= 16 for the GEMM alone, 1.10-1.34x at M >= 2048 (above cuBLAS int8).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from aq import backend, primitives
from aq.kernels import tuned
from aq.kernels.act_quant import QuantizedActivation, check_float, quantize_activation, quantize_activation_reference
from aq.kernels.common import grouped_tile
from aq.packing import pack_w4a4_nibbles, unpack_w4a4_nibbles

__all__ = [
    "W4A4Weight", "QuantizedActivation", "pack_w4a4_weight", "quantize_activation", "quantize_activation_reference",
    "w4a4_matmul", "w4a4_matmul_reference", "w4a4_linear", "pick_config", "unpack_weight_int8",
]

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
        return unpack_w4a4_nibbles(self.packed, self.K)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return primitives.dequantize(self.codes(), self.scale[:, None], self.zero.float()[:, None], None, dtype)



def _check_wbits(bits):
    primitives.check_bits(bits, "wbits")
    if bits > 4:
        raise ValueError(f"W4A4 weights hold at most 4 bits per code (two per byte), got wbits={bits}")
    return bits


# ----------------------------------------------------------------------------------------------------------------------
# Weight packing (torch, at load time)
# ----------------------------------------------------------------------------------------------------------------------
def pack_w4a4_weight(w: torch.Tensor, wbits: int = 4, symmetric: bool = False,
                     scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> W4A4Weight:
    """Quantize a linear weight w [N, K] per output channel (aq.primitives) and pack it for the W4A4 GEMM."""
    check_float(w, "weight")
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
    return W4A4Weight(pack_w4a4_nibbles(q), scale.float().contiguous(), zero.to(torch.int32).contiguous(),
                      q.sum(1, dtype=torch.int32).contiguous(), N, K, wbits, symmetric)


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
        check_float(bias, "bias")
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
        pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)
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
# BLOCK_KH counts packed bytes, i.e. 2 * BLOCK_KH codes of K per step. Overridden by the tuned configs
# (aq.kernels.tuned).
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


def configs_for(device_name: str) -> tuple:
    """The tuned per-M-bucket configs of this GPU (bench/w4a4.py sweep --write), else DEFAULT_CONFIGS."""
    return tuple(tuned.tuned(FAMILY, device_name) or DEFAULT_CONFIGS)


def pick_config(M: int, N: int, K: int, device: torch.device | str = "cpu") -> dict:
    """The one place that dispatches the GEMM by M: returns the kernel and launch parameters for this problem."""
    device = torch.device(device)
    if device.type == "cuda":
        table = configs_for(torch.cuda.get_device_name(device))
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
    q, y, lead = gemm_rows(a, K, N, out_dtype)
    M = q.shape[0]
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
    return dispatch_gemm(w4a4_matmul_triton, w4a4_matmul_reference, a, weight, weight.packed, bias, out_dtype)


def gemm_rows(a: QuantizedActivation, K: int, N: int, out_dtype) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """An integer GEMM's activation codes as rows [M, K] (unit stride along K), its output [M, N] to fill, and the
    activation's leading shape."""
    lead = tuple(a.q.shape[:-1])
    q = a.q.reshape(-1, K)
    if q.stride(-1) != 1:
        q = q.contiguous()
    return q, torch.empty(q.shape[0], N, dtype=out_dtype, device=q.device), lead


def dispatch_gemm(triton_fn, reference_fn, a: QuantizedActivation, weight, codes: torch.Tensor, bias, out_dtype):
    """A checked integer GEMM (this module's or aq.kernels.w8a8's) on whichever path aq.backend picks for its
    tensors (codes: the weight's code tensor)."""
    tensors = [a.q, codes] + ([bias] if bias is not None else [])
    fn = triton_fn if backend.choose(*tensors) == backend.TRITON else reference_fn
    return fn(a, weight, bias, out_dtype)


def w4a4_linear(x, weight: W4A4Weight, bias=None, *, abits=4, a_symmetric=False, norm=None, norm_weight=None,
                norm_bias=None, norm_eps=1e-6, transform=None, out_dtype=None):
    """Quantize x [..., K] per token (fused with the norm/transform before it) and multiply by the packed weight."""
    check_float(x, "activation x")
    if out_dtype is None:
        out_dtype = x.dtype
    a = quantize_activation(x, abits, a_symmetric, norm, norm_weight, norm_bias, norm_eps, transform)
    return w4a4_matmul(a, weight, bias, out_dtype)
