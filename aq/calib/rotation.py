"""An orthogonal rotation of the residual stream, folded into the weights before calibration (QuaRot / SpinQuant's
offline rotation, here as a pre-step of aq's own calibration).

Why: from layer 12 of SmolLM2 on, one channel of the residual stream carries most of its energy (ALGORITHM.md and
bench/NOTES-accuracy.md). Every norm-side consumer then sees that channel's outlier in its input, and every writer
(o_proj, down_proj) must produce it in one output row. Rotating the stream by an orthogonal Q (h -> h Q) spreads each
channel over all of them: the activations after a norm have no outlier channel left (per-token quantization of W4A4
works), and the weights become more Gaussian per group (better low-bit rounding). It is exact in full precision for
RMSNorm models, because rms(h Q) = rms(h):

  norm scales w are folded into the linears that read the norm, which then scales by 1 (Gemma's (1 + w) norms: the
  scale 1 + w folded, w set to 0; Arch.norm_offset);
  readers (q, k, v, gate, up, lm_head):  W  <- (W * w) Q          (input columns rotated)
  writers (o, down) and the embedding:   W  <- Q^T W,  b <- b Q,  E <- E Q   (outputs into the stream rotated)

A tied lm_head is untied (it now differs from the embedding by the final norm's weight). Readers and writers come from
the architecture's data (the consumers of its norm sites; o and down), so fused linears (Phi-3) and norms after q / k
(Qwen3: they act on q / k's outputs, which the rotation leaves alone) need nothing more. Where it is not exact,
Arch.no_rotation says why and the run is refused: LayerNorm (OPT) subtracts the mean, which a rotation does not
commute with; Gemma 2 / 3 scale o / down's outputs per channel by their post-attention / post-MLP norms before the
residual add.

Q is a Hadamard matrix with random row signs, scaled by 1/sqrt(d) ("hadamard", the default: flat, so every output
mixes every channel equally) or a Haar-random orthogonal matrix ("random"); both come from the run's seed, so a run is
reproducible and a checkpoint needs no record of Q (it stores the rotated weights).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from aq import models
from aq.config import ROTATIONS



# ---------------------------------------------------------------------------------------------------------------------
# Hadamard matrices: Sylvester (2^k), Paley I (q + 1 for a prime q = 3 mod 4) and Kronecker products of the two
# ---------------------------------------------------------------------------------------------------------------------

def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, int(math.isqrt(n)) + 1))


def _paley(q: int) -> torch.Tensor:
    """Hadamard matrix of order q + 1 (Paley's first construction; q prime, q = 3 mod 4)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if x in residues else -1 for x in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]  # Jacobsthal matrix Q[i, j] = chi(j - i), antisymmetric
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, jac
    return S + torch.eye(q + 1, dtype=torch.float64)


def hadamard(d: int) -> torch.Tensor:
    """A d x d matrix H of +-1 with H H^T = d I (float64), or ValueError when d is not 2^k * (q + 1) as above."""
    for m in range(1, d + 1):
        if d % m:
            continue
        rest = d // m
        if rest & (rest - 1):  # d / m must be a power of two
            continue
        if m == 1 or m == 2:
            base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else torch.tensor([[1., 1.], [1., -1.]],
                                                                                   dtype=torch.float64)
        elif (m - 1) % 4 == 3 and _is_prime(m - 1):
            base = _paley(m - 1)
        else:
            continue
        H = base
        h2 = torch.tensor([[1., 1.], [1., -1.]], dtype=torch.float64)
        while H.shape[0] < d:
            H = torch.kron(H, h2)
        return H
    raise ValueError(f"no Hadamard construction of order {d} here (2^k times q + 1, q a prime = 3 mod 4): "
                     "use --rotate random")


def rotation_matrix(d: int, kind: str = "hadamard", seed: int = 0) -> torch.Tensor:
    """The orthogonal d x d rotation Q (float64) of `kind` for `seed` (the same on every machine: CPU generator)."""
    gen = torch.Generator().manual_seed(1_000_003 * seed + d)
    if kind == "hadamard":
        signs = torch.randint(0, 2, (d,), generator=gen, dtype=torch.float64) * 2 - 1
        return signs.unsqueeze(1) * hadamard(d) / math.sqrt(d)
    if kind == "random":
        q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar measure: fix the signs QR leaves free
    raise ValueError(f"unknown rotation {kind!r}: choose from {', '.join(ROTATIONS)}")


# ---------------------------------------------------------------------------------------------------------------------
# folding into a model
# ---------------------------------------------------------------------------------------------------------------------

def rotatable() -> tuple[str, ...]:
    """The model types whose residual rotation is exact (Arch.no_rotation empty)."""
    return tuple(mt for mt, a in models.ARCHS.items() if not a.no_rotation)


def check_rotatable(model: nn.Module) -> None:
    arch = models.arch_of(model)
    if arch.no_rotation:
        mt = getattr(model.config, "model_type", None)
        raise ValueError(f"--rotate is exact only for {', '.join(rotatable())}; on {mt!r} it is not: "
                         f"{arch.no_rotation}. Use --rotate none")


def _rmsnorm_weight(norm: nn.Module, offset: float) -> torch.Tensor:
    """The norm's per-channel scale (offset + weight, Arch.norm_offset); the norm is left scaling by 1."""
    if getattr(norm, "bias", None) is not None:
        raise ValueError(f"{type(norm).__name__} has a bias: a rotation cannot be folded through it")
    w = norm.weight.detach().double() + offset
    norm.weight.fill_(1.0 - offset)
    return w


@torch.no_grad()
def _read(lin: nn.Linear, w: torch.Tensor, Q: torch.Tensor) -> None:
    lin.weight.copy_(((lin.weight.double() * w) @ Q).to(lin.weight.dtype))


@torch.no_grad()
def _write(lin: nn.Linear, Q: torch.Tensor) -> None:
    lin.weight.copy_((Q.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ Q).to(lin.bias.dtype))


@torch.no_grad()
def rotate_residual(model: nn.Module, kind: str = "hadamard", seed: int = 0) -> torch.Tensor:
    """Rotate `model`'s residual stream in place (module docstring); returns Q. The model computes the same function
    (up to float rounding)."""
    check_rotatable(model)
    arch = models.arch_of(model)
    d = model.config.hidden_size
    Q = rotation_matrix(d, kind, seed).to(next(model.parameters()).device)
    emb = model.get_submodule(arch.embed)
    head = model.get_output_embeddings()
    if head.weight is emb.weight:  # tied: give lm_head its own copy before the two diverge
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = None
    emb.weight.copy_((emb.weight.double() @ Q).to(emb.weight.dtype))
    for layer in models.decoder_layers(model):
        for site in arch.norm_sites:
            norm, readers = layer.get_submodule(site.producer), arch.consumer_modules(site)
            w = _rmsnorm_weight(norm, arch.norm_offset)
            for r in readers:
                _read(layer.get_submodule(r), w, Q)
        _write(layer.get_submodule(arch.module("o")), Q)
        _write(layer.get_submodule(arch.module("down")), Q)
    final = model.get_submodule(arch.final_norm)
    _read(head, _rmsnorm_weight(final, arch.norm_offset), Q)
    return Q
