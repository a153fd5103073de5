"""The kernel-backed modules of a patched model (what aq.patch.patch_model installs), each a thin module over one
aq.kernels entry point; their tensors are buffers, so ``model.to(device)`` moves them.

- ``W4A16Linear``: packed low-bit weights (any wbits 2..8, groups or per channel), the fused dequantize-matmul.
- ``W4A4Linear``: per-channel weights two codes per byte; per-token activation quantization (fused with the norm
  before it through a ``DeferredNorm``) and the int8 tensor-core GEMM.
- ``W8A8Linear``: every other weight-activation setting (codes of up to 8 bits in int8 containers, per channel or
  per group; signed activation codes) on aq.kernels.w8a8's int8 GEMM. It shares the activation side with W4A4Linear
  (``ActQuantLinear``).
- ``FusedNorm``: a norm and its diagonal or block-diagonal transform in one kernel; ``DeferredNorm``: stands where a
  norm was when the norm is fused into the activation quantization of the W4A4 / W8A8 linears it feeds.
- ``QuantEmbedding``: packed low-bit embedding rows.
- ``FusedProjections`` / ``ProjectionSlice``: sibling projections of one input (q/k/v, gate/up) as one kernel call.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from aq.kernels import w4a4 as k4a4
from aq.kernels import w4a16 as k4a16
from aq.kernels import w8a8 as k8a8
from aq.kernels.norm import apply_transform, norm_transform
from aq.packing import pack_w4a4_nibbles, w4a16_word_codes
from aq.qmodel import transform_form

HALF = (torch.float16, torch.bfloat16)

def norm_params(norm: nn.Module, offset: float = 0.0) -> tuple[str, torch.Tensor, torch.Tensor | None, float]:
    """(kind 'rms' | 'layer', weight, bias, eps) of an RMSNorm (LLaMA family) or nn.LayerNorm; offset: the norm
    scales by (offset + weight) (aq.models.Arch.norm_offset, Gemma's 1 + w), returned as the weight."""
    if isinstance(norm, nn.LayerNorm):
        if norm.weight is None:
            raise ValueError("LayerNorm without an affine weight is not supported")
        return "layer", norm.weight, norm.bias, float(norm.eps)
    w = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if isinstance(w, torch.Tensor) and eps is not None and "rmsnorm" in type(norm).__name__.lower():
        return "rms", (w + offset) if offset else w, None, float(eps)
    raise ValueError(f"unsupported norm module {type(norm).__name__}: aq fuses RMSNorm and LayerNorm")


class _NormCopy(nn.Module):
    """A frozen copy of a norm's parameters (kind, weight, bias, eps) and of the transform that follows it (None,
    diagonal [d] or block-diagonal [nb, b, b]): what the fused norm kernels read."""

    def __init__(self, norm: nn.Module, transform: torch.Tensor | None = None, offset: float = 0.0):
        super().__init__()
        kind, w, b, eps = norm_params(norm, offset)
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        self.bias = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False)
        self.register_buffer("transform", None if transform is None else transform.detach().float().clone())


# ------------------------------------------------------------------------------------------------------------ modules
class W4A16Linear(nn.Module):
    """y = x · dequant(Wq)ᵀ + b on the fused W4A16 kernel (any wbits 2..8, groups or per channel)."""

    def __init__(self, packed: k4a16.PackedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = packed.K, packed.N
        self.bits, self.group_size = packed.bits, packed.group_size
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().to(packed.dtype).clone())

    @classmethod
    def from_codes(cls, codes, scale, zero, bits, group_size, bias=None, dtype=torch.bfloat16) -> "W4A16Linear":
        return cls(k4a16.pack_w4a16_codes(codes, scale, zero, bits, group_size, dtype), bias)

    @property
    def packed(self) -> k4a16.PackedWeight:
        return k4a16.PackedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                  self.out_features, self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        return k4a16.dequantize_weight(self.packed, dtype or self.dtype)

    def forward(self, x):
        y = k4a16.w4a16_linear(x.to(self.dtype), self.packed, self.bias)
        return y.to(x.dtype)

    def extra_repr(self):
        g = "channel" if self.group_size == self.in_features else self.group_size
        return f"in_features={self.in_features}, out_features={self.out_features}, wbits={self.bits}, group={g}"


class _SharedResult:
    """One result computed from an input tensor and handed to each of `n` consumers once (q, k and v reading one
    fused output, or one set of activation codes). The entry is dropped once every consumer has read it, and a
    consumer that comes back for the same input starts a new round, so nothing computed in an earlier call (e.g. the
    warm-up before a CUDA-graph capture, with the same static input) is ever reused."""

    def __init__(self):
        self.entry = None  # (weakref to the input, its version, key, result, readers so far)

    def get(self, x, key, reader, n: int, compute):
        e = self.entry
        if (e is not None and e[0]() is x and e[1] == x._version and e[2] == key and reader not in e[4]):
            e[4].add(reader)
            if len(e[4]) >= n:
                self.entry = None
            return e[3]
        out = compute()
        self.entry = (weakref.ref(x), x._version, key, out, {reader}) if n > 1 else None
        return out


class DeferredNorm(_NormCopy):
    """Stands where a norm was, in a weight-activation model whose norm is fused into the activation quantization of
    the linears it feeds: returns its input unchanged; ``quantized(x, bits)`` (called by those linears) quantizes
    norm(x) (and the transform) per token in one kernel, once per input tensor."""

    def __init__(self, norm: nn.Module, transform: torch.Tensor | None = None, offset: float = 0.0):
        super().__init__(norm, transform, offset)
        self._share = _SharedResult()  # the codes of one input, handed to each consumer once
        self.consumers = 0  # set by the consumers' attach_norm

    def forward(self, x):
        return x

    def normalized(self, x):
        """What the replaced norm (and transform) would output, in x's dtype (for checks and non-fused consumers)."""
        y = norm_transform(x, self.kind, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                           self.eps, None)
        return y if self.transform is None else apply_transform(y, self.transform)

    def quantized(self, x, bits: int, symmetric: bool = False, reader: object = None,
                  signed: bool = False) -> k4a4.QuantizedActivation:
        return self._share.get(x, (bits, symmetric, signed), reader, self.consumers, lambda: k4a4.quantize_activation(
            x, bits, symmetric, norm=self.kind, norm_weight=self.weight, norm_bias=self.bias, norm_eps=self.eps,
            transform=self.transform, signed=signed))

    def extra_repr(self):
        t = "" if self.transform is None else f", transform={transform_form(self.transform)}"
        return f"{self.kind}, K={self.weight.shape[0]}, eps={self.eps}{t} (fused into the next activation quantization)"


class ActQuantLinear(nn.Module):
    """What the integer-GEMM linears share: per-token activation quantization of their input, fused with the norm
    before it once a DeferredNorm is attached. SIGNED: codes shifted to signed int8 containers (aq.kernels.w8a8)."""
    SIGNED = False

    def __init__(self, bias: torch.Tensor | None, abits: int, a_symmetric: bool):
        super().__init__()
        self.abits, self.a_symmetric = abits, a_symmetric
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._norm_site: list[DeferredNorm] = []  # a plain list: the site is registered where the norm was

    def _hold(self, weight, stored: str, codes: torch.Tensor) -> None:
        """The packed weight's shape and bits, and its tensors as buffers (`stored`: the codes in the kernel's
        layout; w_scale, w_zero, w_code_sum: the epilogue's per-channel or per-group terms)."""
        self.in_features, self.out_features, self.wbits = weight.K, weight.N, weight.bits
        self.register_buffer(stored, codes)
        for name in ("scale", "zero", "code_sum"):
            self.register_buffer(f"w_{name}", getattr(weight, name))

    def attach_norm(self, site: DeferredNorm) -> None:
        if self._norm_site:
            self._norm_site[0].consumers -= 1
        self._norm_site[:] = [site]
        site.consumers += 1

    def quantized_input(self, x) -> k4a4.QuantizedActivation:
        if self._norm_site:
            return self._norm_site[0].quantized(x, self.abits, self.a_symmetric, reader=id(self), signed=self.SIGNED)
        return k4a4.quantize_activation(x, self.abits, self.a_symmetric, signed=self.SIGNED)

    def bias_for(self, x):
        return None if self.bias is None else self.bias.to(x.dtype if x.dtype in HALF else torch.float32)

    def extra_repr(self):
        fused = ", norm fused" if self._norm_site else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, wbits={self.wbits}, " \
               f"abits={self.abits}{fused}"


class W4A4Linear(ActQuantLinear):
    """y = dequant(quant_a(x)) · dequant(Wq)ᵀ + b with integer math: per-token activation quantization (fused with the
    norm before it when ``norm_site`` is set) and the int8 tensor-core GEMM of aq.kernels.w4a4."""

    def __init__(self, weight: k4a4.W4A4Weight, bias: torch.Tensor | None, abits: int, a_symmetric: bool = False):
        super().__init__(bias, abits, a_symmetric)
        self._hold(weight, "packed", weight.packed)
        self.w_symmetric = weight.symmetric

    @classmethod
    def from_codes(cls, codes, scale, zero, wbits, symmetric, bias, abits) -> "W4A4Linear":
        """From per-channel integer codes [N, K] and their scale / zero [N, 1] (as aq.qmodel.FakeQuantLinear holds
        them): packed as they are, never re-rounded."""
        N, K = codes.shape
        w = k4a4.W4A4Weight(pack_w4a4_nibbles(codes), scale[:, 0].float().contiguous(),
                            zero[:, 0].to(torch.int32).contiguous(), codes.sum(1, dtype=torch.int32), N, K, wbits,
                            symmetric)
        return cls(w, bias, abits)

    @property
    def weight_packed(self) -> k4a4.W4A4Weight:
        return k4a4.W4A4Weight(self.packed, self.w_scale, self.w_zero, self.w_code_sum, self.out_features,
                               self.in_features, self.wbits, self.w_symmetric)

    def forward(self, x):
        return k4a4.w4a4_matmul(self.quantized_input(x), self.weight_packed, self.bias_for(x), out_dtype=x.dtype)


class W8A8Linear(ActQuantLinear):
    """The int8-container form of W4A4Linear (aq.kernels.w8a8): weight codes of up to 8 bits per output channel or
    per group, signed per-token activation codes of up to 8 bits, an int8 x int8 -> int32 GEMM."""
    SIGNED = True

    def __init__(self, weight: k8a8.W8A8Weight, bias: torch.Tensor | None, abits: int, a_symmetric: bool = False):
        super().__init__(bias, abits, a_symmetric)
        self._hold(weight, "codes", weight.codes)
        self.group_size = weight.group_size

    @classmethod
    def from_codes(cls, codes, scale, zero, wbits, group_size, bias, abits) -> "W8A8Linear":
        """From integer codes [N, K] and their scale / zero [N, K // g] (as aq.qmodel.FakeQuantLinear holds them):
        stored as they are (shifted into int8 containers), never re-rounded."""
        return cls(k8a8.pack_w8a8_codes(codes, scale, zero, wbits, group_size), bias, abits)

    @property
    def weight_packed(self) -> k8a8.W8A8Weight:
        return k8a8.W8A8Weight(self.codes, self.w_scale, self.w_zero, self.w_code_sum, self.out_features,
                               self.in_features, self.wbits, self.group_size)

    def forward(self, x):
        return k8a8.w8a8_matmul(self.quantized_input(x), self.weight_packed, self.bias_for(x), out_dtype=x.dtype)

    def extra_repr(self):
        g = "" if self.group_size == self.in_features else f", group={self.group_size}"
        return super().extra_repr() + g


class FusedNorm(_NormCopy):
    """Norm + diagonal or block-diagonal transform in one Triton kernel (weight-only models)."""

    def __init__(self, norm: nn.Module, transform: torch.Tensor | None = None, offset: float = 0.0):
        if transform is not None and transform_form(transform) == "full":
            raise ValueError("FusedNorm takes a diagonal or block-diagonal transform, not a full matrix")
        super().__init__(norm, transform, offset)

    def forward(self, x):
        return norm_transform(x, self.kind, self.weight, self.bias, self.eps, self.transform)

    def extra_repr(self):
        t = "" if self.transform is None else f", transform={transform_form(self.transform)}"
        return f"{self.kind}, K={self.weight.shape[0]}, eps={self.eps}{t}"


class QuantEmbedding(nn.Module):
    """A token embedding stored as packed low-bit rows (W4A16 layout); lookup dequantizes the gathered rows, times
    `embed_scale` when the replaced embedding scaled its output (Gemma's sqrt(hidden), rounded to the storage dtype
    as Gemma does)."""

    def __init__(self, packed: k4a16.PackedWeight, padding_idx: int | None = None, embed_scale: float | None = None):
        super().__init__()
        self.embed_scale = embed_scale
        self.num_embeddings, self.embedding_dim = packed.N, packed.K
        self.bits, self.group_size, self.padding_idx = packed.bits, packed.group_size, padding_idx
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)

    def forward(self, ids):
        words = self.qweight[ids // k4a16.ROW_BLOCK, :, ids % k4a16.ROW_BLOCK]  # [*ids, K / E]: each id's row
        q = w4a16_word_codes(words, self.bits).reshape(*ids.shape, self.embedding_dim).float()
        g = self.group_size
        s = self.scales.t()[ids].float().repeat_interleave(g, -1)
        z = self.zeros.t()[ids].float().repeat_interleave(g, -1)
        out = ((q - z) * s).to(self.scales.dtype)
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale, dtype=out.dtype, device=out.device)
        return out

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, wbits={self.bits}, group={self.group_size}"


class FusedProjections(nn.Module):
    """Sibling projections of one input (q/k/v, gate/up) as one kernel call: their packed weights concatenated along
    N. Each sibling is replaced by a ``ProjectionSlice`` that returns its columns of the shared output, computed once
    per input tensor."""

    def __init__(self, linear: nn.Module, names: list[str], sizes: list[int]):
        super().__init__()
        self.linear, self.names, self.sizes = linear, names, sizes
        self._share = _SharedResult()

    def output(self, x, reader: object = None):
        return self._share.get(x, None, reader, len(self.sizes), lambda: self.linear(x))

    def extra_repr(self):
        return f"names={self.names}, sizes={self.sizes}"


class ProjectionSlice(nn.Module):
    """Columns [start, end) of a FusedProjections output: stands where one of the fused projections was."""

    def __init__(self, fused: FusedProjections, start: int, end: int):
        super().__init__()
        self._fused = [fused]  # a plain list: the fused module is registered once, beside the slices
        self.start, self.end = start, end
        self.in_features, self.out_features = fused.linear.in_features, end - start

    def forward(self, x):
        return self._fused[0].output(x, reader=self.start)[..., self.start:self.end]

    def extra_repr(self):
        return f"columns [{self.start}, {self.end}) of a fused projection"


def concat_projections(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing the concatenated outputs of `mods` (all W4A16Linear, all W4A4Linear or all W8A8Linear on
    the same input with the same settings), or None when they cannot be joined."""
    first = mods[0]
    if any(type(m) is not type(first) or m.in_features != first.in_features for m in mods):
        return None
    dev = next(first.buffers()).device
    biases = [m.bias if m.bias is not None else None for m in mods]
    bias = None
    if any(b is not None for b in biases):
        ref = next(b for b in biases if b is not None)
        bias = torch.cat([b if b is not None else ref.new_zeros(m.out_features) for b, m in zip(biases, mods)])
    if isinstance(first, W4A16Linear):
        if any((m.bits, m.group_size, m.dtype) != (first.bits, first.group_size, first.dtype)
               or m.out_features % k4a16.ROW_BLOCK for m in mods):
            return None
        N = sum(m.out_features for m in mods)
        p = k4a16.PackedWeight(torch.cat([m.qweight for m in mods]), torch.cat([m.scales for m in mods], 1),
                               torch.cat([m.zeros for m in mods], 1), first.bits, first.group_size, N,
                               first.in_features)
        return W4A16Linear(p, bias).to(dev)
    if isinstance(first, (W4A4Linear, W8A8Linear)):
        w4 = isinstance(first, W4A4Linear)
        same = ("wbits", "abits", "a_symmetric") + (("w_symmetric",) if w4 else ("group_size",))
        if any(any(getattr(m, a) != getattr(first, a) for a in same) for m in mods):
            return None
        sites = {id(m._norm_site[0]) if m._norm_site else None for m in mods}
        if len(sites) != 1:
            return None
        N = sum(m.out_features for m in mods)
        if w4:
            w = k4a4.W4A4Weight(torch.cat([m.packed for m in mods]), torch.cat([m.w_scale for m in mods]),
                                torch.cat([m.w_zero for m in mods]), torch.cat([m.w_code_sum for m in mods]),
                                N, first.in_features, first.wbits, first.w_symmetric)
            out = W4A4Linear(w, bias, first.abits, first.a_symmetric)
        else:  # qparams are [groups, N]: joined along N
            w = k8a8.W8A8Weight(torch.cat([m.codes for m in mods]), torch.cat([m.w_scale for m in mods], 1),
                                torch.cat([m.w_zero for m in mods], 1), torch.cat([m.w_code_sum for m in mods], 1),
                                N, first.in_features, first.wbits, first.group_size)
            out = W8A8Linear(w, bias, first.abits, first.a_symmetric)
        if first._norm_site:
            site = first._norm_site[0]
            for m in mods:  # the fused module replaces them as the site's consumer
                site.consumers -= 1
                m._norm_site.clear()
            out.attach_norm(site)
        return out
    return None
