"""patch_model: run a quantized model on aq's Triton kernels (real low-bit execution, not simulation).

    model = aq.patch_model(model)                    # a model calibrated by aq (FakeQuantLinear modules)
    model = aq.patch_model(model, QuantConfig(4, 16, 128))   # a plain FP model: round-to-nearest, packed directly

What is replaced
----------------
- Every ``FakeQuantLinear`` (what calibration hands on, see aq.qmodel) becomes
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
  - a weight-only model whose norm carries a transform that cannot be folded (``aq.qmodel.TransformedNorm``) gets a
    ``FusedNorm``: the norm and the diagonal or block-diagonal
    transform in one Triton kernel (aq.kernels.norm), no dense d x d matmul; a full matrix stays a dense matmul
    (TRANSFORM_FORMS states each form's cost);
  - a weight-activation model (with ``fuse_norm=True``, the default) gets a ``DeferredNorm`` that returns its input
    untouched: the consuming W4A4Linear / W8A8Linear modules quantize the raw residual stream with the norm (and its
    diagonal or block-diagonal transform) fused into the quantization kernel, once per input (q, k and v share the
    codes).
Runs on CPU (torch reference path, or interpreted Triton under TRITON_INTERPRET=1) and on CUDA (compiled Triton), and
works with ``model.generate``. The modules themselves are in aq.deploy; this module is the walk over the model.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from aq import models, primitives
from aq.config import QuantConfig
from aq.deploy import (HALF, ActQuantLinear, DeferredNorm, FusedNorm, FusedProjections, ProjectionSlice, QuantEmbedding,
                       W4A4Linear, W4A16Linear, W8A8Linear, concat_projections, norm_params)
from aq.kernels import w4a16 as k4a16
from aq.qmodel import TRANSFORM_FORMS, FakeQuantLinear, TransformedNorm, set_submodule, split_norm, transform_form


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
        wbits, group, abits, symmetric = src.wbits, src.group_size, src.abits, src.symmetric
    else:
        wbits, group, abits, symmetric = cfg.wbits, cfg.group_size, cfg.abits, cfg.symmetric
        codes, scale, zero = _rtn_codes(src.weight.detach(), wbits, group, symmetric)
    bias = None if src.bias is None else src.bias.detach()
    kind = kernel_for(wbits, abits, group, codes.shape[1])
    try:
        if kind == "w4a16":
            return W4A16Linear.from_codes(codes, scale, zero, wbits, group, bias, dtype)
        if kind == "w8a8":
            return W8A8Linear.from_codes(codes, scale, zero, wbits, group, bias, abits)
        return W4A4Linear.from_codes(codes, scale, zero, wbits, symmetric, bias, abits)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


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
        for s in arch.norm_sites:
            sites.append((p + s.producer, [p + n for n in arch.consumer_modules(s)]))
    return sites


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
    mdt = models.model_dtype(model)
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
        set_submodule(model, name, new[name])
        m.to("meta")  # free the dense / fake-quantized weight now (the module is gone from the model)
    # norms: fuse or keep; a norm-side transform is handled here whatever the linears are
    off = arch.norm_offset
    for site, consumers in _norm_sites(model):
        mod = model.get_submodule(site)
        norm, t = split_norm(mod)
        cons = [new.get(c) for c in consumers]
        form = transform_form(t)
        h = t.shape[-1] if form == "block" else 16
        if form == "block" and (h < 16 or h & (h - 1)):
            warnings.warn(f"{site}: block-diagonal blocks of {h} (not a power of two >= 16) have no fused kernel; "
                          "the transform stays a separate einsum after the norm")
        elif all(isinstance(c, ActQuantLinear) for c in cons) and fuse_norm and form != "full":
            d = DeferredNorm(norm, t, off).to(norm.weight.device)
            set_submodule(model, site, d)
            for c in cons:
                c.attach_norm(d)
        elif form in ("diagonal", "block"):
            set_submodule(model, site, FusedNorm(norm, t, off).to(norm.weight.device))
        elif form == "full":
            warnings.warn(f"{site}: a full transform stays a dense matmul after the norm ({TRANSFORM_FORMS['full']})")
        elif norm_kernel and t is None and new and _fusable_norm(mod):
            set_submodule(model, site, FusedNorm(mod, offset=off).to(mod.weight.device))
    if norm_kernel and new:
        fn = model.get_submodule(arch.final_norm)
        if _fusable_norm(fn):
            set_submodule(model, arch.final_norm, FusedNorm(fn, offset=off).to(fn.weight.device))
    if fuse_projections:
        for _, consumers in _norm_sites(model):
            mods = [new.get(c) for c in consumers]
            if len(mods) < 2 or any(m is None for m in mods):
                continue
            cat = concat_projections(mods)
            if cat is None:
                continue
            fused = FusedProjections(cat, [c.rsplit(".", 1)[-1] for c in consumers], [m.out_features for m in mods])
            parent = consumers[0].rpartition(".")[0]
            model.get_submodule(parent).register_module("aq_fused_" + "_".join(fused.names), fused)
            start = 0
            for c, m in zip(consumers, mods):
                set_submodule(model, c, ProjectionSlice(fused, start, start + m.out_features))
                start += m.out_features
    if lm_head:
        head = model.get_output_embeddings()
        if isinstance(head, nn.Linear):
            set_submodule(model, _name_of(model, head), _rtn_linear(head, cfg, dtype))
    if embeddings:
        emb = model.get_submodule(arch.embed)
        g = cfg.group_size
        codes, scale, zero = _rtn_codes(emb.weight.detach(), cfg.wbits, g, cfg.symmetric)
        set_submodule(model, arch.embed, QuantEmbedding(k4a16.pack_w4a16_codes(codes, scale, zero, cfg.wbits, g, dtype),
                                                        getattr(emb, "padding_idx", None),
                                                        getattr(emb, "scalar_embed_scale", None)))
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
