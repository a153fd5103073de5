"""W4A16: packed low-bit weights and the fused dequantize-matmul y = x · dequant(Wq)ᵀ (+ bias), in Triton.

Quantization (done once, at pack time) is aq.primitives' asymmetric scheme per group of g consecutive input columns
(g = 32, 64, 128, ... or the whole row: per output channel), codes q in [0, 2^bits - 1], w_hat = (q - z) * s.

Packed layout (PackedWeight; the word packing itself is aq.packing's W4A16 words)
----------------------------------------------------------------------------------
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
- ``gemv`` (aq.kernels.w4a16_gemv): CUDA-core split-K kernel for tiny M (one program row per token): per code one LOP3
  (mask + fp32 magic, in place), one FADD, one FFMA; zero point and scale applied once per word column; fp32 partial
  sums.
- ``mma`` (aq.kernels.w4a16_mma): tensor-core tile kernel (tl.dot, bf16/fp16 operands, fp32 accumulator), optionally
  split-K, optionally "swapped" (computes yᵀ = W xᵀ so the dequantized weight is the left operand, which Hopper's wgmma
  can take from registers), with the dequantized K-tile either fed as E dots over the E code positions of a word (x
  gathered with a stride of E) or joined back to natural K order by a tree of tl.join (one dot, contiguous x). With
  "fold" the dot takes the raw codes and the group's zero point and scale are applied to its fp32 result.
- ``dequant`` (aq.kernels.w4a16_dequant, beside the jit dequantization helpers all three share): for large M, a
  memory-bound kernel writes the dequantized weight once and cuBLAS does the GEMM.
Split-K partials go to an fp32 buffer reduced (+ bias, cast) by a second small kernel, so results are deterministic.
Host time: after a call shape's first call, its compiled kernels, grids and constants are kept (a launch plan) and
later calls go straight to Triton's C launchers (aq.kernels.common.launch; ~35 us of host time per call on the H100
machine instead of ~150). Configs are tuned per GPU by bench/autotune.py into aq/kernels/configs/<gpu-name>.json and
read by aq.kernels.w4a16_configs (re-exported here); an untuned GPU or shape falls back to the nearest tuned neighbour
(``fallback_config``), else ``heuristic_config``.

The torch reference is ``w4a16_linear_reference`` (built on aq.primitives.dequantize); ``w4a16_linear`` dispatches
through aq.backend (compiled Triton on CUDA, interpreted Triton on CPU under TRITON_INTERPRET=1, else the reference).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from aq import backend, primitives
from aq.kernels.common import arg_spec, cdiv, launch, launch_hooks, run_compiled
from aq.kernels.w4a16_configs import (FAMILY, adapt_config, fallback_config, heuristic_config, m_bucket,  # noqa: F401
                                      select_config, shape_key)
from aq.kernels.w4a16_dequant import dequantize_weight_triton
from aq.kernels.w4a16_gemv import gemv_call
from aq.kernels.w4a16_mma import mma_call
from aq.packing import W4A16_ROW_BLOCK, container_bits, pack_w4a16_words, unpack_w4a16_words

HALF_DTYPES = (torch.float16, torch.bfloat16)
ROW_BLOCK = W4A16_ROW_BLOCK  # output channels whose words are interleaved in qweight
_STRATEGIES = {"gemv": gemv_call, "mma": mma_call}  # kernel name in a config -> its launch descriptor


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


def pack_w4a16_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None,
               dtype: torch.dtype = torch.bfloat16) -> PackedWeight:
    """Pack integer codes [N, K] with their scale and zero point [N, K // g] (as aq.primitives returns them)."""
    if dtype not in HALF_DTYPES:
        raise ValueError(f"scales and zeros are stored in fp16 or bf16, got {dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K], got shape {tuple(codes.shape)}")
    N, K = codes.shape
    g = _check_group(K, group_size, bits)
    qmax = 2**bits - 1
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
    return PackedWeight(qweight=pack_w4a16_words(c, bits), scales=scale.t().to(dtype).contiguous(),
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
    return pack_w4a16_codes(codes, scale, zero, bits, g, dtype)


def unpack_weight(p: PackedWeight) -> torch.Tensor:
    """The codes [N, K] as uint8 (exact inverse of pack_w4a16_codes)."""
    return unpack_w4a16_words(p.qweight, p.bits, p.N, p.K)


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



_PLANS: dict = {}  # call key -> _Plan: everything about a small-M call but its tensors, decided once


def _splits(KW: int, block_kw: int, split_k: int) -> tuple[int, int]:
    """Words per split (a multiple of block_kw) and the number of non-empty splits."""
    k_split = triton.cdiv(triton.cdiv(KW, max(1, split_k)), block_kw) * block_kw
    return k_split, triton.cdiv(KW, k_split)


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
                None if bias is None else arg_spec(bias),
                tuple(t.data_ptr() % 16 == 0 for t in (x2, p.qweight, p.scales, p.zeros)))
        plan = _PLANS.get(pkey)
        if plan is not None and launch_hooks()[0] is None:
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
    KW, G = p.qweight.shape[1], p.group_size
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    b = bias if bias is not None else y  # a valid pointer when HAS_BIAS is off
    bkw = cfg["block_kw"]
    k_split, split = _splits(KW, bkw, cfg.get("split_k", 1))
    part = torch.empty(split, M, N, device=x.device, dtype=torch.float32) if split > 1 else y
    args = [x2, p.qweight, p.scales, p.zeros, b, y, part, M, N, K, KW, G, k_split, x2.stride(0)]
    nw, ns = cfg.get("num_warps", 4), cfg.get("num_stages", 3)
    if kind not in _STRATEGIES:
        raise ValueError(f"unknown w4a16 kernel {kind!r}")
    fn, grid, extra, consts = _STRATEGIES[kind](cfg, x2, p, M, split, k_split, bias is not None)
    main = launch(fn, grid, args + extra, consts, nw, ns)
    red = None
    if split > 1:
        MN = M * N
        red = launch(_splitk_reduce_kernel, (cdiv(MN, 1024),), [part, b, y, MN, N, split],
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
        run_compiled(self.main, self.grid, [x2, p.qweight, p.scales, p.zeros, b, y, part, M, N, K,
                                            p.qweight.shape[1], p.group_size, self.k_split, x2.stride(0)]
                     + self.tail, dev)
        if self.split > 1:
            MN = M * N
            run_compiled(self.red, (cdiv(MN, 1024),), [part, b, y, MN, N, self.split, bias is not None, 1024], dev)
        return y


def w4a16_linear(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """y = x · dequant(p)ᵀ (+ bias) for x [..., K] in fp16/bf16, on whichever path aq.backend picks."""
    tensors = [x, p.qweight, p.scales, p.zeros] + ([bias] if bias is not None else [])
    if backend.choose(*tensors) == backend.TRITON:
        return w4a16_linear_triton(x, p, bias, config)
    return w4a16_linear_reference(x, p, bias)
