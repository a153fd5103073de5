"""patch_model: run a quantized model on aq's Triton kernels (real low-bit execution, not simulation).

    model = aq.patch_model(model)                    # a model calibrated by aq (FakeQuantLinear modules)
    model = aq.patch_model(model, QuantConfig(4, 16, 128))   # a plain FP model: round-to-nearest, packed directly

What is replaced
----------------
- Every ``FakeQuantLinear`` (what calibration hands on, see aq.calib.rtn) becomes
  - ``W4A16Linear`` when its abits >= 16: the codes are packed once (aq.kernels.w4a16 layout, scales and zeros in the
    compute dtype) and every call runs the fused dequantize-matmul ``w4a16_linear``;
  - ``W4A4Linear`` when abits < 16 (per-channel weights, wbits <= 4, abits <= 7): the weight codes are packed two per
    byte and every call runs per-token activation quantization then the int8 tensor-core GEMM ``w4a4_matmul``;
  - ``W8A8Linear`` for every other weight-activation setting (W8A8, W6A6, W4A8, groups along K, ...): codes of up to
    8 bits in int8 containers (aq.kernels.w8a8), the same activation quantization with signed codes, an int8 GEMM.
  ``kernel_for`` is the one place that makes this choice (KERNELS says what each serves).
  With a QuantConfig, plain ``nn.Linear`` modules (all but lm_head) are quantized round-to-nearest with exactly the
  qparams ``quantize_rtn`` would choose, so ``patch_model(m, cfg)`` equals ``patch_model(quantize_rtn(m, cfg))``.
- lm_head and the token embedding stay as they are unless ``lm_head=True`` / ``embeddings=True`` (then they are
  quantized round-to-nearest to W{wbits}A16 with the config's group size: W4A16Linear / ``QuantEmbedding``).
- Norms (the architecture mapping of aq.models says which norm feeds which linears):
  - a weight-only model whose norm carries a transform that cannot be folded (``TransformedNorm``, or calibration's
    norm-side transform module, see ``split_norm``) gets a ``FusedNorm``: the norm and the diagonal or block-diagonal
    transform in one Triton kernel (aq.kernels.norm), no dense d x d matmul; a full matrix stays a dense matmul
    (TRANSFORM_FORMS states each form's cost);
  - a weight-activation model (with ``fuse_norm=True``, the default) gets a ``DeferredNorm`` that returns its input
    untouched: the consuming W4A4Linear / W8A8Linear modules quantize the raw residual stream with the norm (and its
    diagonal or block-diagonal transform) fused into the quantization kernel, once per input (q, k and v share the
    codes).
Runs on CPU (torch reference path, or interpreted Triton under TRITON_INTERPRET=1) and on CUDA (compiled Triton), and
works with ``model.generate``. The patched modules keep their tensors as buffers, so ``model.to(device)`` moves them.
"""
from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from aq import models, primitives
from aq.calib.rtn import FakeQuantLinear
from aq.config import QuantConfig
from aq.kernels import w4a4 as k4a4
from aq.kernels import w4a16 as k4a16
from aq.kernels import w8a8 as k8a8
from aq.kernels.norm import apply_transform, norm_transform

HALF = (torch.float16, torch.bfloat16)

# What each form of a norm-side transform (A^-1 after a norm, left when it cannot be folded) costs at inference.
TRANSFORM_FORMS = {
    "diagonal": "a diagonal A: folded into the norm (inside the norm kernel), no inference cost",
    "blockdiag": "block-diagonal A (blocks of h): applied inside the norm kernel, h MACs per channel per token "
                 "(h/d of a dense matmul; e.g. h=128, d=4096: 3%), no extra pass over memory",
    "full": "a full d x d A: a dense d x d matmul after each norm at inference in weight-only runs (for d=4096 about as "
            "much work as the q projection, in 16 bits; it cannot be folded or fused)",
}


def transform_form(t: torch.Tensor | None) -> str | None:
    """'diagonal' ([K]), 'blockdiag' ([K // h, h, h]) or 'full' ([K, K]) for a right-multiplied transform tensor."""
    if t is None:
        return None
    if t.dim() == 1:
        return "diagonal"
    if t.dim() == 3 and t.shape[1] == t.shape[2]:
        return "blockdiag"
    if t.dim() == 2 and t.shape[0] == t.shape[1]:
        return "full"
    raise ValueError(f"a norm transform must be [K], [K // h, h, h] or [K, K], got shape {tuple(t.shape)}")


class TransformedNorm(nn.Module):
    """A norm followed by a right-multiplied transform T (= A^-1): what a fake-quantized (calibrated) model holds where
    a norm-side transform could not be folded. ``transform`` is [K] (diagonal), [K // h, h, h] or [K, K]."""

    def __init__(self, norm: nn.Module, transform: torch.Tensor):
        super().__init__()
        self.norm = norm
        transform_form(transform)
        self.register_buffer("transform", transform.detach().float().clone())

    @property
    def form(self) -> str:
        return transform_form(self.transform)

    def forward(self, x):
        return apply_transform(self.norm(x), self.transform)

    def extra_repr(self):
        return f"form={self.form}, shape={tuple(self.transform.shape)}"


def split_norm(module: nn.Module) -> tuple[nn.Module, torch.Tensor | None]:
    """(the norm, its right-multiplied transform tensor or None) of a norm site.

    Recognized: a plain norm; TransformedNorm; calibration's aq.calib.transforms.NormTransform (``norm`` + ``inverse``);
    and any module with a ``norm`` submodule and either a ``transform_matrix()`` method or an ``inverse`` /
    ``transform`` tensor (or submodule with a ``matrix()`` method or ``weight``), the tensor being T with
    output = norm(x) @ T (shapes as TransformedNorm).
    """
    if isinstance(module, TransformedNorm):
        return module.norm, module.transform
    norm = getattr(module, "norm", None)
    if isinstance(norm, nn.Module):
        t = None
        if callable(getattr(module, "transform_matrix", None)):
            t = module.transform_matrix()
        else:
            for attr in ("inverse", "transform"):  # aq.calib.transforms.NormTransform keeps T in `inverse`
                tr = getattr(module, attr, None)
                if isinstance(tr, torch.Tensor):
                    t = tr
                elif isinstance(tr, nn.Module):
                    t = tr.matrix() if callable(getattr(tr, "matrix", None)) else getattr(tr, "weight", None)
                if t is not None:
                    break
        if t is None:
            raise ValueError(f"cannot read the transform of {type(module).__name__} (see aq.patch.split_norm)")
        return norm, t.detach()
    return module, None


def norm_params(norm: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor | None, float]:
    """(kind 'rms' | 'layer', weight, bias, eps) of an RMSNorm (LLaMA family) or nn.LayerNorm."""
    if isinstance(norm, nn.LayerNorm):
        if norm.weight is None:
            raise ValueError("LayerNorm without an affine weight is not supported")
        return "layer", norm.weight, norm.bias, float(norm.eps)
    w = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if isinstance(w, torch.Tensor) and eps is not None and "rmsnorm" in type(norm).__name__.lower():
        return "rms", w, None, float(eps)
    raise ValueError(f"unsupported norm module {type(norm).__name__}: aq fuses RMSNorm and LayerNorm")


class _NormCopy(nn.Module):
    """A frozen copy of a norm's parameters (kind, weight, bias, eps) and of the transform that follows it (None,
    diagonal [d] or block-diagonal [nb, b, b]): what the fused norm kernels read."""

    def __init__(self, norm: nn.Module, transform: torch.Tensor | None = None):
        super().__init__()
        kind, w, b, eps = norm_params(norm)
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
        return cls(k4a16.pack_codes(codes, scale, zero, bits, group_size, dtype), bias)

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

    def __init__(self, norm: nn.Module, transform: torch.Tensor | None = None):
        super().__init__(norm, transform)
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


class _ActQuantLinear(nn.Module):
    """What the integer-GEMM linears share: per-token activation quantization of their input, fused with the norm
    before it once a DeferredNorm is attached. SIGNED: codes shifted to signed int8 containers (aq.kernels.w8a8)."""
    SIGNED = False

    def __init__(self, bias: torch.Tensor | None, abits: int, a_symmetric: bool):
        super().__init__()
        self.abits, self.a_symmetric = abits, a_symmetric
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._norm_site: list[DeferredNorm] = []  # a plain list: the site is registered where the norm was

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


class W4A4Linear(_ActQuantLinear):
    """y = dequant(quant_a(x)) · dequant(Wq)ᵀ + b with integer math: per-token activation quantization (fused with the
    norm before it when ``norm_site`` is set) and the int8 tensor-core GEMM of aq.kernels.w4a4."""

    def __init__(self, weight: k4a4.W4A4Weight, bias: torch.Tensor | None, abits: int, a_symmetric: bool = False):
        super().__init__(bias, abits, a_symmetric)
        self.in_features, self.out_features = weight.K, weight.N
        self.wbits, self.w_symmetric = weight.bits, weight.symmetric
        self.register_buffer("packed", weight.packed)
        self.register_buffer("w_scale", weight.scale)
        self.register_buffer("w_zero", weight.zero)
        self.register_buffer("w_code_sum", weight.code_sum)

    @property
    def weight_packed(self) -> k4a4.W4A4Weight:
        return k4a4.W4A4Weight(self.packed, self.w_scale, self.w_zero, self.w_code_sum, self.out_features,
                               self.in_features, self.wbits, self.w_symmetric)

    def forward(self, x):
        return k4a4.w4a4_matmul(self.quantized_input(x), self.weight_packed, self.bias_for(x), out_dtype=x.dtype)


class W8A8Linear(_ActQuantLinear):
    """The int8-container form of W4A4Linear (aq.kernels.w8a8): weight codes of up to 8 bits per output channel or
    per group, signed per-token activation codes of up to 8 bits, an int8 x int8 -> int32 GEMM."""
    SIGNED = True

    def __init__(self, weight: k8a8.W8A8Weight, bias: torch.Tensor | None, abits: int, a_symmetric: bool = False):
        super().__init__(bias, abits, a_symmetric)
        self.in_features, self.out_features = weight.K, weight.N
        self.wbits, self.group_size = weight.bits, weight.group_size
        self.register_buffer("codes", weight.codes)
        self.register_buffer("w_scale", weight.scale)
        self.register_buffer("w_zero", weight.zero)
        self.register_buffer("w_code_sum", weight.code_sum)

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

    def __init__(self, norm: nn.Module, transform: torch.Tensor | None = None):
        if transform is not None and transform_form(transform) == "full":
            raise ValueError("FusedNorm takes a diagonal or block-diagonal transform, not a full matrix")
        super().__init__(norm, transform)

    def forward(self, x):
        return norm_transform(x, self.kind, self.weight, self.bias, self.eps, self.transform)

    def extra_repr(self):
        t = "" if self.transform is None else f", transform={transform_form(self.transform)}"
        return f"{self.kind}, K={self.weight.shape[0]}, eps={self.eps}{t}"


class QuantEmbedding(nn.Module):
    """A token embedding stored as packed low-bit rows (W4A16 layout); lookup dequantizes the gathered rows."""

    def __init__(self, packed: k4a16.PackedWeight, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = packed.N, packed.K
        self.bits, self.group_size, self.padding_idx = packed.bits, packed.group_size, padding_idx
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)

    def forward(self, ids):
        cb = k4a16.container_bits(self.bits)
        e = 32 // cb
        words = self.qweight[ids // k4a16.ROW_BLOCK, :, ids % k4a16.ROW_BLOCK].to(torch.int64) & 0xFFFFFFFF
        i = torch.arange(e, device=ids.device)
        shifts = (i % 2) * 16 + (i // 2) * cb
        q = ((words.unsqueeze(-1) >> shifts) & (2**cb - 1)).reshape(*ids.shape, self.embedding_dim).float()
        g = self.group_size
        s = self.scales.t()[ids].float().repeat_interleave(g, -1)
        z = self.zeros.t()[ids].float().repeat_interleave(g, -1)
        return ((q - z) * s).to(self.scales.dtype)

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


def _concat(mods: list[nn.Module]) -> nn.Module | None:
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


# ------------------------------------------------------------------------------------------------------------ patching
def _rtn_codes(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool):
    scale, zero = primitives.choose_qparams(w, bits, group_size, symmetric)
    return primitives.quantize(w, scale, zero, bits, group_size), scale, zero


# What serves each quantized linear (kernel_for decides; every setting aq calibrates has one)
KERNELS = {
    "w4a16": "weight-only (abits 16), 2..8-bit codes per group or per channel: W4A16Linear, fused dequantize-matmul "
             "(2-bit codes in 2-bit slots, 3..4 in 4-bit, 5..8 in bytes)",
    "w4a4": "per-channel weights of <= 4 bits with activations of <= 7 bits: W4A4Linear, two codes per byte, int8 GEMM",
    "w8a8": "every other weight-activation setting (W8A8, W6A6, W4A8, weight groups, ...): W8A8Linear, codes of up to "
            "8 bits in int8 containers, int8 GEMM",
}


def kernel_for(wbits: int, abits: int, group_size: int | None, K: int) -> str:
    """The one dispatch by setting: the KERNELS entry that serves a linear of these bits, group size and input width."""
    if abits >= 16:
        return "w4a16"
    if wbits <= 4 and abits <= 7 and primitives.check_group_size(K, group_size) == K:
        return "w4a4"
    return "w8a8"


def _quantized_linear(src: nn.Module, cfg: QuantConfig | None, dtype: torch.dtype, name: str) -> nn.Module:
    """The patched module for a FakeQuantLinear (its own codes) or a plain nn.Linear (RTN with cfg)."""
    if isinstance(src, FakeQuantLinear):
        codes, scale, zero = src.codes(), src.scale, src.zero
        wbits, group, abits = src.wbits, src.group_size, src.abits
        symmetric = bool(getattr(src, "symmetric", False))
    else:
        wbits, group, abits, symmetric = cfg.wbits, cfg.group_size, cfg.abits, cfg.symmetric
        codes, scale, zero = _rtn_codes(src.weight.detach(), wbits, group, symmetric)
    bias = None if src.bias is None else src.bias.detach()
    kind = kernel_for(wbits, abits, group, codes.shape[1])
    try:
        if kind == "w4a16":
            return W4A16Linear.from_codes(codes, scale, zero, wbits, group, bias, dtype)
        if kind == "w8a8":
            return W8A8Linear(k8a8.pack_w8a8_codes(codes, scale, zero, wbits, group), bias, abits)
        w = primitives.dequantize(codes, scale, zero, None, torch.float32)  # exact: the packer recovers the codes
        return W4A4Linear(k4a4.pack_w4a4_weight(w, wbits, symmetric, scale=scale[:, 0], zero=zero[:, 0]), bias, abits)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent).register_module(child, module)


def _rtn_linear(lin: nn.Linear, cfg: QuantConfig, dtype) -> W4A16Linear:
    group = cfg.group_size
    codes, scale, zero = _rtn_codes(lin.weight.detach(), cfg.wbits, group, cfg.symmetric)
    return W4A16Linear.from_codes(codes, scale, zero, cfg.wbits, group, lin.bias, dtype)


def _norm_sites(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(norm module name, names of the linears it feeds) for every decoder layer."""
    arch = models.arch_of(model)
    if arch is models.OPT and not getattr(model.config, "do_layer_norm_before", True):
        return []  # OPT-350m normalizes after the residual: its norm output is the residual stream
    sites = []
    for i in range(len(model.get_submodule(arch.layers))):
        p = f"{arch.layers}.{i}."
        sites.append((p + arch.attn_norm, [p + n for n in (arch.q, arch.k, arch.v)]))
        sites.append((p + arch.mlp_norm, [p + n for n in arch.mlp_in]))
    return sites


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@torch.no_grad()
def patch_model(model: nn.Module, cfg: QuantConfig | None = None, *, lm_head: bool = False, embeddings: bool = False,
                fuse_norm: bool = True, norm_kernel: bool = True, fuse_projections: bool = True,
                dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the quantized linears (and norms, see the module doc) of `model` in place by kernel-backed modules.

    cfg: needed only to quantize plain nn.Linear modules (round-to-nearest) and lm_head / embeddings; a calibrated
    model's FakeQuantLinear modules carry their own settings. fuse_norm: fold the norms feeding W4A4 / W8A8 linears into
    their activation quantization. norm_kernel: every other decoder norm (and the final norm) runs aq's one-kernel
    norm (aq.kernels.norm) instead of the framework's composite one. fuse_projections: q/k/v (and gate/up) run as one
    kernel call on concatenated weights. dtype: storage dtype of scales / compute dtype of the W4A16 kernel (fp16 or
    bf16; default the model's dtype when it is one of those, else bf16).
    """
    cfg = None if cfg is None else cfg.resolve()  # QuantConfig(wbits=4, abits=4): per-channel groups, as W4A4 needs
    arch = models.arch_of(model)
    mdt = _model_dtype(model)
    dtype = dtype or (mdt if mdt in HALF else torch.bfloat16)
    if dtype not in HALF:
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype}")
    skip = {"lm_head"}
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, FakeQuantLinear) or (cfg is not None and type(m) is nn.Linear
                                                     and n.split(".")[-1] not in skip)]
    if not targets and not (lm_head or embeddings):
        raise ValueError("nothing to patch: the model has no FakeQuantLinear modules; pass a QuantConfig to quantize "
                         "its nn.Linear modules round-to-nearest")
    if (lm_head or embeddings) and cfg is None:
        raise ValueError("quantizing lm_head / embeddings needs a QuantConfig (wbits, group size)")
    new: dict[str, nn.Module] = {}
    for name, m in targets:
        new[name] = _quantized_linear(m, cfg, dtype, name)
        _set(model, name, new[name])
        m.to("meta")  # free the dense / fake-quantized weight now (the module is gone from the model)
    # norms: fuse or keep; a norm-side transform is handled here whatever the linears are
    for site, consumers in _norm_sites(model):
        mod = model.get_submodule(site)
        norm, t = split_norm(mod)
        cons = [new.get(c) for c in consumers]
        form = transform_form(t)
        h = t.shape[-1] if form == "blockdiag" else 16
        if form == "blockdiag" and (h < 16 or h & (h - 1)):
            warnings.warn(f"{site}: block-diagonal blocks of {h} (not a power of two >= 16) have no fused kernel; "
                          "the transform stays a separate einsum after the norm")
        elif all(isinstance(c, _ActQuantLinear) for c in cons) and fuse_norm and form != "full":
            d = DeferredNorm(norm, t).to(norm.weight.device)
            _set(model, site, d)
            for c in cons:
                c.attach_norm(d)
        elif form in ("diagonal", "blockdiag"):
            _set(model, site, FusedNorm(norm, t).to(norm.weight.device))
        elif form == "full":
            warnings.warn(f"{site}: a full transform stays a dense matmul after the norm ({TRANSFORM_FORMS['full']})")
        elif norm_kernel and t is None and new and _fusable_norm(mod):
            _set(model, site, FusedNorm(mod).to(mod.weight.device))
    if norm_kernel and new:
        fn = model.get_submodule(arch.final_norm)
        if _fusable_norm(fn):
            _set(model, arch.final_norm, FusedNorm(fn).to(fn.weight.device))
    if fuse_projections:
        for _, consumers in _norm_sites(model):
            mods = [new.get(c) for c in consumers]
            if len(mods) < 2 or any(m is None for m in mods):
                continue
            cat = _concat(mods)
            if cat is None:
                continue
            fused = FusedProjections(cat, [c.rsplit(".", 1)[-1] for c in consumers], [m.out_features for m in mods])
            parent = consumers[0].rpartition(".")[0]
            model.get_submodule(parent).register_module("aq_fused_" + "_".join(fused.names), fused)
            start = 0
            for c, m in zip(consumers, mods):
                _set(model, c, ProjectionSlice(fused, start, start + m.out_features))
                start += m.out_features
    if lm_head:
        head = model.get_output_embeddings()
        if isinstance(head, nn.Linear):
            _set(model, _name_of(model, head), _rtn_linear(head, cfg, dtype))
    if embeddings:
        emb = model.get_submodule(arch.embed)
        g = cfg.group_size
        codes, scale, zero = _rtn_codes(emb.weight.detach(), cfg.wbits, g, cfg.symmetric)
        _set(model, arch.embed, QuantEmbedding(k4a16.pack_codes(codes, scale, zero, cfg.wbits, g, dtype),
                                               getattr(emb, "padding_idx", None)))
    return model


def _fusable_norm(m: nn.Module) -> bool:
    try:
        norm_params(m)
    except ValueError:
        return False
    return True


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n
    raise ValueError("module not found in the model")


def patched_summary(model: nn.Module) -> dict[str, int]:
    """Counts of the patched module types in a model (for logs and tests)."""
    kinds = (W4A16Linear, W4A4Linear, W8A8Linear, FusedNorm, DeferredNorm, QuantEmbedding, FakeQuantLinear,
             TransformedNorm, FusedProjections, ProjectionSlice)
    out = {k.__name__: 0 for k in kinds}
    for m in model.modules():
        for k in kinds:
            if type(m) is k:
                out[k.__name__] += 1
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
