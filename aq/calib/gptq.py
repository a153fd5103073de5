"""GPTQ (Frantar et al., 2022): weight rounding that spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse Hessian H = 2 X^T X / n of the layer's inputs. Plain torch.

The result is aq's FakeQuantLinear, so checkpointing, patching and evaluation take it unchanged.

Group qparams ("groups"):
- "dynamic" (default, as in the reference GPTQ code with groups): each group's scale/zero come from min/max of the
  group's columns as they are when the group starts, i.e. after the error of the earlier columns was spread into them.
  The range then covers the values actually rounded, so fewer of them are clipped.
- "static": from the weights before any update (needed with act-order, whose column order crosses groups, and when
  the qparams are given, e.g. learned clipping ranges).
Per output channel (group_size None) the qparams always come from the un-updated weights (one group spans all columns).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from aq import models
from aq.config import QuantConfig
from aq.kernels.fake_quant import fake_quant
from aq.primitives import check_group_size, choose_qparams
from aq.qmodel import FakeQuantLinear, set_submodule

BLOCK = 128    # columns per lazy batch update
DAMP = 0.01    # fraction of the mean Hessian diagonal added to the diagonal


class Hessian:
    """Running H = 2 X^T X / n over the rows of every input seen (a forward pre-hook feeds it).

    normalized: each row is scaled to unit L2 norm first (QuantConfig.gptq_hessian "normalized"), so every token
    weighs the same. Why: the raw H of a model with massive activations is the outer product of a few tokens (on
    SmolLM2, position 0 carries 96-98% of the residual stream's energy from layer 12 on); GPTQ then spends the
    correction on those tokens, lowers the in-sample error and raises held-out perplexity."""

    def __init__(self, k: int, device, dtype=torch.float32, normalized: bool = False):
        self.H = torch.zeros(k, k, device=device, dtype=dtype)
        self.n = 0
        self.normalized = normalized

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.dtype)
        if self.normalized:
            x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        m = x.shape[0]
        # a running mean keeps H at the scale of one token whatever the number of tokens (damp is relative anyway)
        self.H *= self.n / (self.n + m)
        self.n += m
        self.H.addmm_(x.T, x, alpha=2.0 / self.n)


def _quant_col(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (float) of one column w [N] with per-row scale/zero [N]; the rounding of
    aq.primitives.quantize."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def inverse_hessian_factor(H: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1: row i of U, divided by U[i, i], is how column i's
    error is spread over columns > i (the OBS update with columns < i already eliminated)."""
    K = H.shape[0]
    Hd = H + damp * torch.mean(torch.diag(H)) * torch.eye(K, device=H.device, dtype=H.dtype)
    try:
        L = torch.linalg.cholesky(Hd)
    except RuntimeError as e:  # torch raises _LinAlgError (a RuntimeError) on a matrix that is not positive definite
        raise ValueError(f"GPTQ: the damped Hessian is not positive definite (damp {damp}): {e}") from None
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = False, *,
                  groups: str = "dynamic", act_order: bool = False, damp: float = DAMP, block: int = BLOCK,
                  qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize W [N, K] with GPTQ on Hessian H [K, K]. Returns (codes [N, K] float, scale, zero [N, K // g]) in
    H's dtype; W ~ dequantize(codes, scale, zero).

    qparams: fixed (scale, zero) to round with (implies static groups). act_order: columns in order of decreasing
    H diagonal (implies static groups, so that the stored groups stay contiguous in the original order)."""
    if groups not in ("dynamic", "static"):
        raise ValueError(f"GPTQ groups must be 'dynamic' or 'static', got {groups!r}")
    N, K = W.shape
    g = check_group_size(K, group_size)
    W = W.to(H.dtype).clone()
    H = H.clone()
    dead = torch.diag(H) == 0  # inputs that are always zero: their weights never matter; quantize them as zero
    H[dead, dead] = 1
    W[:, dead] = 0
    maxq = 2**bits - 1
    static = qparams is not None or act_order or group_size is None or groups == "static"
    if qparams is not None:
        scale, zero = (t.to(H.dtype).clone() for t in qparams)
        if scale.shape != (N, K // g) or zero.shape != (N, K // g):
            raise ValueError(f"GPTQ qparams must be [{N}, {K // g}], got {tuple(scale.shape)} / {tuple(zero.shape)}")
    elif static:
        scale, zero = choose_qparams(W, bits, group_size, symmetric)
        scale, zero = scale.to(H.dtype), zero.to(H.dtype)
    else:
        scale = torch.empty(N, K // g, dtype=H.dtype, device=W.device)
        zero = torch.empty_like(scale)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U = inverse_hessian_factor(H, damp)
    Q = torch.zeros_like(W)
    # dynamic groups must not straddle a block (the group's updated values are read from the block's copy)
    B = g if g >= block else (block // g) * g
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if not static and col % g == 0:
                s, z = choose_qparams(W1[:, i:i + g], bits, None, symmetric)
                scale[:, col // g], zero[:, col // g] = s[:, 0], z[:, 0]
            s, z = scale[:, col // g], zero[:, col // g]
            w = W1[:, i]
            q = _quant_col(w, s, z, maxq)
            Q[:, i1 + i] = q
            err = (w - (q - z) * s) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # the lazy update of the columns after the block
    Q = Q[:, torch.argsort(perm)]
    return Q, scale, zero


def gptq_linear(linear: nn.Linear, H: torch.Tensor, cfg: QuantConfig, qparams=None, **kw) -> FakeQuantLinear:
    """A FakeQuantLinear whose weight GPTQ rounded (with cfg's bits, group size, symmetry and act order; qparams:
    fixed (scale, zero) instead of GPTQ's own, with the columns in their order)."""
    w = linear.weight.detach()
    Q, scale, zero = gptq_quantize(w, H, cfg.wbits, cfg.group_size, cfg.symmetric,
                                   act_order=cfg.act_order and qparams is None, qparams=qparams, **kw)
    bias = None if linear.bias is None else linear.bias.detach()
    return FakeQuantLinear(Q.to(torch.uint8), scale, zero, bias, wbits=cfg.wbits, group_size=cfg.group_size,
                           abits=cfg.abits, symmetric=cfg.symmetric, dtype=w.dtype)


def stages(arch: models.Arch) -> list[tuple[str, ...]]:
    """True-sequential order inside a layer: each stage's inputs come from the stages before it already quantized."""
    attn, mlp = arch.norm_sites[:2]
    return [arch.consumer_modules(attn), (arch.module("o"),), arch.consumer_modules(mlp), (arch.module("down"),)]


@torch.no_grad()
def layer_hessians(layer: nn.Module, names: tuple[str, ...], buf: torch.Tensor, kwargs: dict, batch: int,
                   abits: int = 16, normalized: bool = False) -> dict[str, torch.Tensor]:
    """Hessians of the inputs of the named linears of `layer` over the segments in buf (the layer runs; buf is
    left unchanged), quantized per token to abits first when < 16 (what those linears will see once quantized);
    normalized: every token's row at unit norm (Hessian)."""
    p = next(layer.parameters())
    acc = {n: Hessian(layer.get_submodule(n).in_features, p.device, normalized=normalized) for n in names}

    def hook(m, args, n):
        x = args[0]
        if abits < 16:
            x = fake_quant(x, abits, None)
        acc[n].add(x)

    hooks = [layer.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: hook(m, args, n)) for n in names]
    try:
        for s in range(0, buf.shape[0], batch):  # buf may be kept off the layer's device (streamed calibration)
            layer(buf[s:s + batch].to(p.device, p.dtype), **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {n: a.H for n, a in acc.items()}


@torch.no_grad()
def quantize_gptq(model: nn.Module, segments: torch.Tensor, cfg: QuantConfig, *, batch: int = 8,
                  progress: bool = True, say=print, damp: float = DAMP, groups: str = "dynamic",
                  device: torch.device | str | None = None) -> nn.Module:
    """GPTQ every decoder-layer linear of `model` in place, layer by layer: a layer's Hessians come from the outputs
    of the already-quantized layers before it, and inside a layer from the already-quantized stages before.
    device: where the work runs (default the model's); a model kept elsewhere (the CPU) is streamed one layer at a
    time, as in aq.calib.pipeline."""
    from aq.calib.pipeline import capture, device_of, move, propagate, resolve_device  # late: imports aq.calib.layer

    cfg = cfg.resolve(model)
    if not cfg.weight_only:
        raise ValueError(f"--mode gptq is weight-only: abits must be 16, got {cfg.abits} (use rtn, omniquant or "
                         "affinequant for weight-activation settings)")
    arch = models.arch_of(model)
    layers = models.decoder_layers(model)
    for layer in layers:
        for n in arch.linears:
            check_group_size(layer.get_submodule(n).in_features, cfg.group_size)
    if cfg.rotate != "none":  # QuaRot-style: GPTQ on the rotated model (same function in full precision)
        from aq.calib.rotation import rotate_residual
        rotate_residual(model, cfg.rotate, cfg.seed)
    home = device_of(model)
    dev = resolve_device(device) if device is not None else home
    buf, layer_kwargs = capture(model, segments, batch, dev)
    say(f"GPTQ {cfg.label}: {len(layers)} layers, {segments.shape[0]} x {segments.shape[1]} tokens, damp {damp}, "
        f"block {BLOCK}, {'act-order, ' if cfg.act_order else ''}"
        f"{'static' if cfg.act_order or cfg.group_size is None else groups} groups, {cfg.gptq_hessian} Hessian"
        + (f", {cfg.rotate} rotation" if cfg.rotate != "none" else ""))
    for i, layer in enumerate(tqdm(layers, desc=f"GPTQ {cfg.label}", leave=False, disable=not progress)):
        move(layer, dev)
        _sequential(layer, arch, buf, layer_kwargs[i], batch, cfg,
                    lambda _n, lin, H: gptq_linear(lin, H, cfg, damp=damp, groups=groups))
        propagate(layer, buf, layer_kwargs[i], batch)
        move(layer, home)
    return model


def _sequential(layer: nn.Module, arch: models.Arch, buf: torch.Tensor, kwargs: dict, batch: int, cfg: QuantConfig,
                make) -> None:
    """Replace the layer's linears stage by stage (true-sequential) by make(name, linear, its input Hessian); the
    Hessians as cfg says (its activation bits and gptq_hessian)."""
    for stage in stages(arch):
        hs = layer_hessians(layer, stage, buf, kwargs, batch, cfg.abits, cfg.gptq_hessian == "normalized")
        for n in stage:
            set_submodule(layer, n, make(n, layer.get_submodule(n), hs[n]))


@torch.no_grad()
def gptq_round_layer(qlayer: nn.Module, qparams: dict, arch: models.Arch, buf: torch.Tensor, kwargs: dict,
                     cfg: QuantConfig, batch: int) -> None:
    """Round a merged layer whose linears hold unrounded weights (LayerCalib.merged_unrounded) with GPTQ, in place:
    the Hessians come from the layer's quantized-stream inputs buf (unchanged), the group qparams are the learned
    clipping's, qparams[name] = (scale, zero) (static groups, so the learned ranges are the ones used)."""
    _sequential(qlayer, arch, buf, kwargs, batch, cfg, lambda n, lin, H: gptq_linear(lin, H, cfg, qparams[n]))
