"""The form a quantized model takes between stages: what calibration (every mode) hands on, what a checkpoint stores
and loads back, and what aq.patch turns into kernel-backed modules.

- Every quantized linear is a ``FakeQuantLinear``: its integer codes (the stored truth), fp32 scales and integer zero
  points per group, the settings that produced them (wbits, group size, symmetric, abits), and the dequantized weight
  those define, kept (not stored) for the forward.
- A norm whose transform could not be folded into its weight is a ``TransformedNorm``: the norm, then y @ T with T
  diagonal [K], block-diagonal [K // h, h, h] or full [K, K] (``TRANSFORM_FORMS``).
- An attention module whose Q, K, V are quantized per token and head carries the marker ``set_qkv_abits`` puts on
  it; ``enable_qkv_quant`` routes the model's attention through the wrapper that reads it.

``QModelSpec`` describes all three for a module tree (one decoder layer, or a whole model) as plain JSON: the
per-layer resume files of calibration and the checkpoint manifest both write it, and ``install`` rebuilds the
skeleton that ``load_state_dict`` then fills.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from aq.kernels.fake_quant import fake_quant, fake_quant_ste
from aq.kernels.norm import apply_transform
from aq.primitives import check_group_size, choose_qparams, dequantize, quantize


# ---------------------------------------------------------------------------------------------------- quantized linear
class FakeQuantLinear(nn.Module):
    """A linear layer with integer weight codes; inputs are fake-quantized per token when abits < 16.

    State (what a checkpoint or a resume file stores): ``qcodes`` (uint8 [N, K], in [0, 2^wbits - 1]), ``scale`` and
    ``zero`` (float32 [N, K // g]; the zero points are integers) and ``bias``. ``weight`` = (qcodes - zero) * scale in
    the layer's dtype is derived from them (recomputed whenever the state is loaded), never stored.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None, *,
                 wbits: int, group_size: int | None, abits: int = 16, symmetric: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.wbits, self.group_size, self.abits, self.symmetric = wbits, group_size, abits, bool(symmetric)
        self.register_buffer("qcodes", codes.to(torch.uint8))
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero", zero.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.register_buffer("weight", self._dequantized(dtype), persistent=False)
        self.register_load_state_dict_post_hook(lambda m, _keys: m.refresh_weight())

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor, *,
                    wbits: int, group_size: int | None, abits: int = 16, symmetric: bool = False,
                    dtype: torch.dtype | None = None) -> "FakeQuantLinear":
        """Round w [N, K] to nearest with the given qparams (dtype: of the dequantized weight, default w's)."""
        codes = quantize(w, scale, zero, wbits, group_size)
        return cls(codes, scale, zero, bias, wbits=wbits, group_size=group_size, abits=abits, symmetric=symmetric,
                   dtype=dtype or w.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, wbits: int, group_size: int | None, abits: int = 16,
                    symmetric: bool = False) -> "FakeQuantLinear":
        """Round-to-nearest: quantize linear's weight with min/max qparams."""
        w = linear.weight.detach()
        scale, zero = choose_qparams(w, wbits, group_size, symmetric)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_weight(w, bias, scale, zero, wbits=wbits, group_size=group_size, abits=abits,
                               symmetric=symmetric)

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.qcodes, self.scale, self.zero, self.group_size, dtype)

    def refresh_weight(self) -> None:
        """Recompute the dequantized weight from the codes (after their state was loaded)."""
        self.weight = self._dequantized(self.weight.dtype)

    def codes(self) -> torch.Tensor:
        """Integer codes [N, K] (uint8) of the weight."""
        return self.qcodes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.abits < 16:
            x = fake_quant(x, self.abits, None)
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        g = self.group_size or "channel"
        sym = ", symmetric" if self.symmetric else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, wbits={self.wbits}, group={g}, "
                f"abits={self.abits}{sym}")


# ------------------------------------------------------------------------------------------------------ norm transform
# The forms of a norm-side transform (A^-1 after a norm, left when it cannot be folded) and what each costs at
# inference.
TRANSFORM_FORMS = {
    "diagonal": "a diagonal A: folded into the norm (inside the norm kernel), no inference cost",
    "block": "block-diagonal A (blocks of h): applied inside the norm kernel, h MACs per channel per token "
             "(h/d of a dense matmul; e.g. h=128, d=4096: 3%), no extra pass over memory",
    "full": "a full d x d A: a dense d x d matmul after each norm at inference in weight-only runs (for d=4096 "
            "about as much work as the q projection, in 16 bits; it cannot be folded or fused)",
}
LEGACY_FORMS = {"blockdiag": "block"}  # the block form's name in checkpoints written before aq.qmodel


def transform_form(t: torch.Tensor | None) -> str | None:
    """'diagonal' ([K]), 'block' ([K // h, h, h]) or 'full' ([K, K]) for a right-multiplied transform tensor."""
    if t is None:
        return None
    if t.dim() == 1:
        return "diagonal"
    if t.dim() == 3 and t.shape[1] == t.shape[2]:
        return "block"
    if t.dim() == 2 and t.shape[0] == t.shape[1]:
        return "full"
    raise ValueError(f"a norm transform must be [K], [K // h, h, h] or [K, K], got shape {tuple(t.shape)}")


class TransformedNorm(nn.Module):
    """A norm followed by a right-multiplied transform T (= A^-1): y = norm(x) @ T, in float32 arithmetic.

    What a calibrated model holds where a norm-side transform could not be folded into the norm weight (a shift, if
    any, is already in the norm's bias). ``transform`` is [K] (diagonal), [K // h, h, h] (block: output block j =
    input block j @ T[j]) or [K, K] (full); ``form``, when given, must be the one the shape says.
    """

    def __init__(self, norm: nn.Module, transform: torch.Tensor, form: str | None = None):
        super().__init__()
        actual = transform_form(transform)
        if form is not None and form != actual:
            raise ValueError(f"TransformedNorm {form}: a transform of shape {tuple(transform.shape)} is {actual}")
        self.norm = norm
        self.register_buffer("transform", transform.detach().float().contiguous().clone())

    @property
    def form(self) -> str:
        return transform_form(self.transform)

    def forward(self, x):
        return apply_transform(self.norm(x), self.transform)

    def extra_repr(self):
        return f"form={self.form}, shape={tuple(self.transform.shape)}"


def split_norm(module: nn.Module) -> tuple[nn.Module, torch.Tensor | None]:
    """(the norm, its right-multiplied transform tensor or None) of a norm site."""
    if isinstance(module, TransformedNorm):
        return module.norm, module.transform
    return module, None


# ---------------------------------------------------------------------------------------------------- Q/K/V quantized
# HF attention modules call `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` with Q and K already rotated (RoPE)
# and K, V before their GQA repetition. enable_qkv_quant registers a wrapper of the model's implementation under
# QKV_QUANT_PREFIX + name (and the matching mask function); an attention module quantizes when it carries
# ABITS_ATTR < 16. The softmax output stays in floating point. Modules without the attribute are untouched.
QKV_QUANT_PREFIX = "aq_qkv_"
ABITS_ATTR = "aq_qkv_abits"


def _register(base: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = QKV_QUANT_PREFIX + base
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    if base == "eager":  # model-specific code, not in the registry: the attention module's own (Gemma 2's soft-caps)
        def inner(module, *args, **kwargs):
            fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if fn is None:
                raise ValueError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__} "
                                 "to quantize Q/K/V around; load the model with attn_implementation='sdpa'")
            return fn(module, *args, **kwargs)
    else:
        inner = ALL_ATTENTION_FUNCTIONS[base]

    def quantized_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask, **kwargs):
        bits = getattr(module, ABITS_ATTR, 16)
        if bits < 16:  # [batch, heads, tokens, head_dim]: one range per token and head
            query, key, value = (fake_quant_ste(t, bits) for t in (query, key, value))
        return inner(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register(name, quantized_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def enable_qkv_quant(model: nn.Module) -> None:
    """Route the model's attention through the quantizing wrapper (a no-op for modules without the marker)."""
    base = model.config._attn_implementation or "sdpa"
    if base.startswith(QKV_QUANT_PREFIX):
        return
    model.config._attn_implementation = _register(base)


def set_qkv_abits(attn: nn.Module, abits: int) -> None:
    setattr(attn, ABITS_ATTR, abits)


# ---------------------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class LinearSpec:
    in_features: int
    out_features: int
    wbits: int
    group_size: int | None
    abits: int
    bias: bool
    symmetric: bool = False


@dataclass(frozen=True)
class NormSpec:
    form: str
    shape: tuple[int, ...]


@dataclass
class QModelSpec:
    """Which modules of a tree are in the quantized form, with what settings (names relative to the tree's root):
    FakeQuantLinear modules, TransformedNorm modules, and the Q/K/V activation bits of attention modules."""

    linears: dict[str, LinearSpec] = field(default_factory=dict)
    norm_transforms: dict[str, NormSpec] = field(default_factory=dict)
    qkv_abits: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, root: nn.Module) -> "QModelSpec":
        spec = cls()
        for n, m in root.named_modules():
            if isinstance(m, FakeQuantLinear):
                spec.linears[n] = LinearSpec(m.in_features, m.out_features, m.wbits, m.group_size, m.abits,
                                             m.bias is not None, m.symmetric)
            elif isinstance(m, TransformedNorm):
                spec.norm_transforms[n] = NormSpec(m.form, tuple(m.transform.shape))
            if hasattr(m, ABITS_ATTR):
                spec.qkv_abits[n] = int(getattr(m, ABITS_ATTR))
        return spec

    def to_json(self) -> dict:
        return {"linears": {n: asdict(s) for n, s in self.linears.items()},
                "norm_transforms": {n: {"form": s.form, "shape": list(s.shape)}
                                    for n, s in self.norm_transforms.items()},
                "qkv_abits": dict(self.qkv_abits)}

    @classmethod
    def from_json(cls, d: dict) -> "QModelSpec":
        """Inverse of to_json (missing sections are empty; the block form's old name is read as 'block'). Raises
        ValueError naming the entry that is not a valid description."""
        spec = cls()
        for n, s in (d.get("linears") or {}).items():
            try:
                spec.linears[n] = LinearSpec(**s)
            except TypeError as e:
                raise ValueError(f"linear {n}: {e}") from None
        for n, s in (d.get("norm_transforms") or {}).items():
            form = LEGACY_FORMS.get(s.get("form"), s.get("form"))
            if form not in TRANSFORM_FORMS:
                raise ValueError(f"norm transform {n}: unknown form {s.get('form')!r}")
            spec.norm_transforms[n] = NormSpec(form, tuple(s.get("shape", ())))
        spec.qkv_abits = {n: int(b) for n, b in (d.get("qkv_abits") or {}).items()}
        return spec

    def install(self, root: nn.Module, dtype: torch.dtype | None = None) -> None:
        """Put the described modules in place (in root, in place), with placeholder state for load_state_dict to
        fill: a FakeQuantLinear where each quantized linear is (dtype: of its weight, default the replaced module's),
        a TransformedNorm around each norm with a transform, the Q/K/V marker on each listed attention module."""
        for n, s in self.linears.items():
            old = root.get_submodule(n)
            p = next(old.parameters(), None) if not isinstance(old, FakeQuantLinear) else old.weight
            dev = p.device if p is not None else None
            ng = s.in_features // check_group_size(s.in_features, s.group_size)
            codes = torch.zeros((s.out_features, s.in_features), dtype=torch.uint8, device=dev)
            scale, zero = (torch.ones((s.out_features, ng), device=dev) for _ in range(2))
            bias = torch.zeros(s.out_features, device=dev) if s.bias else None
            set_submodule(root, n, FakeQuantLinear(
                codes, scale, zero, bias, wbits=s.wbits, group_size=s.group_size, abits=s.abits, symmetric=s.symmetric,
                dtype=dtype or (p.dtype if p is not None else torch.float32)))
        for n, s in self.norm_transforms.items():
            norm, _ = split_norm(root.get_submodule(n))
            p = next(norm.parameters(), None)
            t = torch.zeros(s.shape, device=None if p is None else p.device)
            set_submodule(root, n, TransformedNorm(norm, t, s.form))
        for n, bits in self.qkv_abits.items():
            set_qkv_abits(root.get_submodule(n), bits)

    def rebuild(self, fp: nn.Module, state: dict) -> nn.Module:
        """A copy of the full-precision tree fp in the described form, with the given state (strict)."""
        new = copy.deepcopy(fp)
        self.install(new)
        new.load_state_dict(state, strict=True)
        return new


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace (or add) the submodule at the dotted name."""
    parent, _, child = name.rpartition(".")
    (root.get_submodule(parent) if parent else root).register_module(child, module)
