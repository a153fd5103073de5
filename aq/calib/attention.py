"""Per-token, per-head activation quantization of the attention inputs Q, K, V (weight-activation settings).

HF attention modules call `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` with Q and K already rotated (RoPE) and
K, V before their GQA repetition. aq registers a wrapper of the model's implementation under QKV_QUANT_PREFIX + name
(and the matching mask function), and an attention module quantizes when it carries `aq_qkv_abits` < 16. The softmax
output stays in floating point. Enabling it on a model sets its config's implementation; modules without the attribute
(and models that never enable it) are untouched.
"""
from __future__ import annotations

import torch
from torch import nn

from aq.kernels.fake_quant import fake_quant_ste

QKV_QUANT_PREFIX = "aq_qkv_"
ABITS_ATTR = "aq_qkv_abits"


def _register(base: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = QKV_QUANT_PREFIX + base
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
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
    """Route the model's attention through the quantizing wrapper (a no-op for modules without aq_qkv_abits)."""
    base = model.config._attn_implementation or "sdpa"
    if base.startswith(QKV_QUANT_PREFIX):
        return
    if base == "eager":  # eager attention is model-specific code, not in the registry: wrap sdpa instead
        base = "sdpa"
    model.config._attn_implementation = _register(base)


def set_qkv_abits(attn: nn.Module, abits: int) -> None:
    setattr(attn, ABITS_ATTR, abits)
