"""Round-to-nearest quantization of a model, simulated in floating point (the RTN baseline).

Every nn.Linear but lm_head becomes an aq.qmodel.FakeQuantLinear: its weight quantized once (per group or per output
channel) and, in weight-activation settings, its input fake-quantized per token at every call. Attention internals
stay untouched.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from aq.calib.rotation import rotate_residual
from aq.config import QuantConfig
from aq.primitives import check_group_size
from aq.qmodel import FakeQuantLinear, set_submodule


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
        fq = FakeQuantLinear.from_linear(lin, cfg.wbits, cfg.group_size, cfg.abits, cfg.symmetric)
        set_submodule(model, name, fq)
    return model
