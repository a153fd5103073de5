"""Masked affine transforms for AffineQuant calibration, forward and backward.

A learnable d x d matrix A (float32) is used through a mask M (affine_mask): M is 1 on the diagonal, alpha (the stability
factor) on the kept off-diagonal entries, 0 elsewhere. Kept: |i - j| < band, and, with per-head blocks of size `block`,
i and j in the same block. Weights become W (A*M)^T, activations X (A*M)^-1.

Dominance: dominance_margin(A_masked) = min_i (|a_ii| - sum_{j != i} |a_ij|) / |a_ii|  (RELATIVE margin, float64).
It is 1 for a diagonal matrix, > 0 exactly when the matrix is strictly diagonally dominant (invertible by the
Levy-Desplanques theorem), <= 0 otherwise (-inf for a zero on the diagonal).
"""
from __future__ import annotations

import torch

from aq import primitives
from aq.kernels import fake_quant as FQ


# ---------------------------------------------------------------------------------------------------------------------
# mask
# ---------------------------------------------------------------------------------------------------------------------

def _norm_structure(d: int, band: int | None, block: int | None) -> tuple[int, int]:
    """(band, block) as integers: band >= 1 (d means full), block dividing d (d means one block)."""
    if band is None:
        band = d
    if isinstance(band, bool) or not isinstance(band, int) or band < 1:
        raise ValueError(f"band must be a positive integer (1 = diagonal) or None (full), got {band!r}")
    if block is None:
        block = d
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or d % block != 0:
        raise ValueError(f"block must be a positive integer dividing d={d} (one block per head), got {block!r}")
    return min(band, block), block


def affine_mask(d: int, band: int | None = None, block: int | None = None, alpha: float = 1.0,
                device=None) -> torch.Tensor:
    """The d x d float32 mask: 1 on the diagonal, alpha where |i - j| < band (inside one block of size `block`), 0 else.

    band None or >= d: full; band 1: diagonal. block None: one block."""
    band, block = _norm_structure(d, band, block)
    i = torch.arange(d, device=device)
    keep = (i[:, None] - i[None, :]).abs() < band
    if block < d:
        keep &= (i[:, None] // block) == (i[None, :] // block)
    m = torch.where(keep, torch.tensor(float(alpha), device=device), torch.tensor(0.0, device=device))
    m.fill_diagonal_(1.0)
    return m


def _check_square(A: torch.Tensor, d: int, what: str) -> None:
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] != d:
        raise ValueError(f"{what}: A must be {d} x {d} (the last dim of the input), got {tuple(A.shape)}")


# ---------------------------------------------------------------------------------------------------------------------
# dominance and inverse
# ---------------------------------------------------------------------------------------------------------------------

def dominance_margin(A_masked: torch.Tensor) -> float:
    """min over rows of (|a_ii| - sum_{j != i} |a_ij|) / |a_ii|, in float64: > 0 iff strictly diagonally dominant."""
    a = A_masked.detach().double().abs()
    diag = a.diagonal()
    off = a.sum(1) - diag
    rel = (diag - off) / diag  # diag 0 -> -inf (or nan for an all-zero row, treated below)
    rel = torch.where(diag > 0, rel, torch.full_like(rel, float("-inf")))
    return float(rel.min()) if rel.numel() else 1.0


def checked_inverse(A_masked: torch.Tensor, name: str = "", block: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse of A_masked in A_masked's dtype, dominance margin). The inverse is computed in float64.

    Raises ValueError naming `name` when the matrix is not strictly diagonally dominant or not invertible.
    block: A_masked is block-diagonal with blocks of this size (inverted block by block)."""
    label = name or "affine transform"
    if A_masked.dim() != 2 or A_masked.shape[0] != A_masked.shape[1]:
        raise ValueError(f"{label}: transform must be a square matrix, got shape {tuple(A_masked.shape)}")
    margin = dominance_margin(A_masked)
    if not margin > 0:
        raise ValueError(f"{label}: transform is not strictly diagonally dominant (relative margin {margin:.3e}); "
                         "it may be singular: lower the learning rate or grow the mask band more slowly")
    d = A_masked.shape[0]
    a64 = A_masked.detach().double()
    if block is not None and block < d:
        if d % block:
            raise ValueError(f"{label}: block {block} does not divide d={d}")
        nb = d // block
        blocks = a64.reshape(nb, block, nb, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [nb, h, h]
        inv_b, info = torch.linalg.inv_ex(blocks)
        inv = torch.block_diag(*inv_b) if nb > 1 else inv_b[0]
        ok = bool((info == 0).all())
    else:
        inv, info = torch.linalg.inv_ex(a64)
        ok = bool((info == 0).all())
    if not ok or not bool(torch.isfinite(inv).all()):
        raise ValueError(f"{label}: transform is singular (dominance margin {margin:.3e})")
    return inv.to(A_masked.dtype), margin


# ---------------------------------------------------------------------------------------------------------------------
# torch references
# ---------------------------------------------------------------------------------------------------------------------

def masked_weight_reference(w, A, band=None, block=None, alpha=1.0):
    d = w.shape[-1]
    _check_square(A, d, "masked_weight")
    Am = A * affine_mask(d, band, block, alpha, device=A.device)
    return (w.float() @ Am.float().T).to(w.dtype)


def masked_inverse_act_reference(x, A, band=None, block=None, alpha=1.0, name=""):
    d = x.shape[-1]
    _check_square(A, d, "masked_inverse_act")
    M = affine_mask(d, band, block, alpha, device=A.device)
    Am = A * M
    checked_inverse(Am.detach(), name, block)  # the check (raises on a non-dominant transform)
    inv = torch.linalg.inv(Am.double()).float()  # differentiable; the kernels use (A*M)^-1 likewise
    return (x.float() @ inv).to(x.dtype)


def transform_fake_quant_reference(w, A, bits, group_size, band=None, block=None, alpha=1.0, u=None, l=None,
                                   symmetric=False):
    d = w.shape[-1]
    _check_square(A, d, "transform_fake_quant")
    Am = A * affine_mask(d, band, block, alpha, device=A.device)
    wt = w.float() @ Am.float().T
    return FQ.fake_quant_ste_reference(wt, bits, group_size, symmetric, u, l).to(w.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------------

def masked_weight(w: torch.Tensor, A: torch.Tensor, band: int | None = None, block: int | None = None,
                  alpha: float = 1.0) -> torch.Tensor:
    """w @ (A*M)^T for a weight w [N, d]; differentiable w.r.t. w and A. Output in w's dtype."""
    return masked_weight_reference(w, A, band, block, alpha)


def masked_inverse_act(x: torch.Tensor, A: torch.Tensor, band: int | None = None, block: int | None = None,
                       alpha: float = 1.0, name: str = "") -> torch.Tensor:
    """x @ (A*M)^-1 for an activation x [..., d]; the inverse in float64 after the dominance check (ValueError naming
    `name` otherwise). Differentiable w.r.t. x and A. Output in x's dtype."""
    return masked_inverse_act_reference(x, A, band, block, alpha, name)


def transform_fake_quant(w: torch.Tensor, A: torch.Tensor, bits: int, group_size: int | None, band: int | None = None,
                         block: int | None = None, alpha: float = 1.0, u: torch.Tensor | None = None,
                         l: torch.Tensor | None = None, symmetric: bool = False) -> torch.Tensor:
    """fake_quant(w @ (A*M)^T) with LWC logits u, l ([N, d // g] or None); differentiable w.r.t. w, A, u, l."""
    primitives.check_bits(bits)
    primitives.check_group_size(w.shape[-1], group_size)
    return transform_fake_quant_reference(w, A, bits, group_size, band, block, alpha, u, l, symmetric)
