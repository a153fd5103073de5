"""Round-to-nearest quantization of a model, simulated in floating point (the RTN baseline).

Every nn.Linear but lm_head gets its weight fake-quantized once (per group or per output channel) and, in
weight-activation settings, its input fake-quantized per token at every call. Attention internals stay untouched.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from aq.calib.rotation import rotate_residual
from aq.config import QuantConfig
from aq.kernels.fake_quant import fake_quant
from aq.primitives import check_group_size, choose_qparams, dequantize, quantize


class FakeQuantLinear(nn.Module):
    """A linear layer whose weight is already fake-quantized; inputs are fake-quantized per token when abits < 16.

    This is what every calibration mode hands on (to evaluation, checkpointing and patching): `weight` holds the
    dequantized values (q - zero) * scale exactly, and `scale` / `zero` (float32, [N, K // g]) with `wbits` and
    `group_size` let the integer codes be recovered as round(weight / scale) + zero.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor,
                 wbits: int, group_size: int | None, abits: int = 16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.wbits, self.group_size, self.abits = wbits, group_size, abits

    @classmethod
    def from_linear(cls, linear: nn.Linear, wbits: int, group_size: int | None, abits: int = 16,
                    symmetric: bool = False) -> "FakeQuantLinear":
        """Round-to-nearest: quantize linear's weight with min/max qparams."""
        w = linear.weight.detach()
        scale, zero = choose_qparams(w, wbits, group_size, symmetric)
        # dequantize from the very scale/zero kept here, so codes() recovers exactly these codes on any device
        w_fq = dequantize(quantize(w, scale, zero, wbits, group_size), scale, zero, group_size, w.dtype)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(w_fq, bias, scale, zero, wbits, group_size, abits)

    def codes(self) -> torch.Tensor:
        """Integer codes [N, K] (uint8) of the weight."""
        return quantize(self.weight, self.scale, self.zero, self.wbits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.abits < 16:
            x = fake_quant(x, self.abits, None)
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        g = self.group_size or "channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, wbits={self.wbits}, group={g}, "
                f"abits={self.abits}")


def quantizable_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[-1] not in skip]


def check_model(model: nn.Module, cfg: QuantConfig) -> None:
    """Fail before any work when the group size does not divide some linear's input dimension."""
    cfg = cfg.resolve()
    for name, lin in quantizable_linears(model):
        try:
            check_group_size(lin.in_features, cfg.group_size)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


@torch.no_grad()
def quantize_rtn(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Replace every quantizable nn.Linear by a FakeQuantLinear with round-to-nearest weights (in place)."""
    cfg = cfg.resolve()
    check_model(model, cfg)
    if cfg.rotate != "none":
        rotate_residual(model, cfg.rotate, cfg.seed)
    for name, lin in tqdm(quantizable_linears(model), desc=f"RTN {cfg.label}", leave=False):
        parent_name, _, child = name.rpartition(".")
        fq = FakeQuantLinear.from_linear(lin, cfg.wbits, cfg.group_size, cfg.abits, cfg.symmetric)
        model.get_submodule(parent_name).register_module(child, fq)
    return model
