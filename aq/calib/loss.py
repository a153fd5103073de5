"""The block-wise reconstruction loss of a layer under calibration: quantized layer output vs FP target, [B, T, d].

"mse" (the paper's): mean squared error over all tokens and channels. On SmolLM2 the first token of every segment (the
attention sink) carries 96-98% of the residual stream's squared norm from layer 12 on, so this loss trains for one
token in a segment (bench/NOTES-accuracy.md).

"token": each token's squared error relative to its target's mean square, averaged over tokens. This is the error as
the next RMSNorm sees it (the norm divides each token by its rms), so every token counts by how much its error changes
what the following layers read. `sink_weight` multiplies position 0's term: the sink token's values steer every
other token's attention, so it may be kept closer than the rest.
"""
from __future__ import annotations

import torch

from aq.config import LOSSES

_EPS = 1e-6


def layer_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse", sink_weight: float = 1.0) -> torch.Tensor:
    """Scalar loss of `out` against `target` (both [B, T, d]; computed in float32)."""
    err = (out.float() - target.float()).pow(2)
    if kind == "mse":
        return err.mean()
    if kind != "token":
        raise ValueError(f"unknown loss {kind!r}: choose from {', '.join(LOSSES)}")
    per_token = err.mean(-1) / (target.float().pow(2).mean(-1) + _EPS)  # [B, T]
    if sink_weight != 1.0:
        w = torch.ones(per_token.shape[-1], device=per_token.device, dtype=per_token.dtype)
        w[0] = sink_weight
        return (per_token * w).sum(-1).mean() / w.sum()
    return per_token.mean()


@torch.no_grad()
def position0_share(out: torch.Tensor, target: torch.Tensor) -> float:
    """Share of the plain squared error that sits at position 0 (what the "mse" loss is dominated by)."""
    err = (out.float() - target.float()).pow(2).sum(-1)  # [B, T]
    return float(err[:, 0].sum() / err.sum().clamp(min=1e-30))
