"""Round-to-nearest quantization of a model, simulated in floating point (the RTN baseline).

Every nn.Linear but lm_head gets its weight fake-quantized once (per group or per output channel) and, in
weight-activation settings, its input fake-quantized per token at every call. Attention internals stay untouched.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from aq.config import QuantConfig
from aq.kernels.fake_quant import fake_quant
from aq.primitives import check_group_size


class FakeQuantLinear(nn.Module):
    """A linear layer whose weight is already fake-quantized; inputs are fake-quantized per token when abits < 16."""

    def __init__(self, linear: nn.Linear, abits: int = 16):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.abits = abits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.abits < 16:
            x = fake_quant(x, self.abits, None)
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, abits={self.abits}"


def quantizable_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[-1] not in skip]


def check_model(model: nn.Module, cfg: QuantConfig) -> None:
    """Fail before any work when the group size does not divide some linear's input dimension."""
    for name, lin in quantizable_linears(model):
        try:
            check_group_size(lin.in_features, cfg.group_size)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


@torch.no_grad()
def quantize_rtn(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Replace every quantizable nn.Linear by a FakeQuantLinear with round-to-nearest weights (in place)."""
    check_model(model, cfg)
    for name, lin in tqdm(quantizable_linears(model), desc=f"RTN {cfg.label}", leave=False):
        lin.weight.data = fake_quant(lin.weight.data, cfg.wbits, cfg.group_size, cfg.symmetric)
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, FakeQuantLinear(lin, cfg.abits))
    return model
