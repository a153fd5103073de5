"""Masked affine transforms for AffineQuant calibration, forward and backward.

A learnable d x d matrix A (float32) is used through a mask M (affine_mask): M is 1 on the diagonal, alpha (the
stability factor) on the kept off-diagonal entries, 0 elsewhere. Kept: |i - j| < band, and, with per-head blocks of size
`block`, i and j in the same block. Weights become W (A*M)^T, activations X (A*M)^-1.

Dominance: dominance_margin(A_masked) = min_i (|a_ii| - sum_{j != i} |a_ij|) / |a_ii|  (RELATIVE margin, float64).
It is 1 for a diagonal matrix, > 0 exactly when the matrix is strictly diagonally dominant (invertible by the
Levy-Desplanques theorem), <= 0 otherwise (-inf for a zero on the diagonal).
"""
from __future__ import annotations

import functools
import os

import torch

from aq import backend, primitives
from aq.kernels import fake_quant as FQ
from aq.kernels.band import DOT_BF16, DOT_FP16, band_grad, band_mm, dot_mode_for


# ---------------------------------------------------------------------------------------------------------------------
# mask
# ---------------------------------------------------------------------------------------------------------------------

def norm_structure(d: int, band: int | None, block: int | None) -> tuple[int, int]:
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
    band, block = norm_structure(d, band, block)
    i = torch.arange(d, device=device)
    keep = (i[:, None] - i[None, :]).abs() < band
    if block < d:
        keep &= (i[:, None] // block) == (i[None, :] // block)
    m = keep.to(torch.float32) * float(alpha)  # no host scalar tensors: the mask may be built inside a graph capture
    m.fill_diagonal_(1.0)
    return m


def _check_square(A: torch.Tensor, d: int, what: str) -> None:
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] != d:
        raise ValueError(f"{what}: A must be {d} x {d} (the last dim of the input), got {tuple(A.shape)}")


# ---------------------------------------------------------------------------------------------------------------------
# dominance and inverse
# ---------------------------------------------------------------------------------------------------------------------

def _margin_tensor(A_masked: torch.Tensor) -> torch.Tensor:
    """dominance_margin as a 0-dim float64 tensor on A's device (no host synchronization)."""
    a = A_masked.detach().double().abs()
    diag = a.diagonal()
    off = a.sum(1) - diag
    rel = (diag - off) / diag  # diag 0 -> -inf (or nan for an all-zero row, treated below)
    rel = torch.where(diag > 0, rel, torch.full_like(rel, float("-inf")))
    return rel.min() if rel.numel() else torch.ones((), dtype=torch.float64, device=a.device)


def dominance_margin(A_masked: torch.Tensor) -> float:
    """min over rows of (|a_ii| - sum_{j != i} |a_ij|) / |a_ii|, in float64: > 0 iff strictly diagonally dominant."""
    return float(_margin_tensor(A_masked))


def _inverse64(A_masked: torch.Tensor, block: int | None, band: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse of A_masked in float64, 0-dim bool tensor: the inversion failed or is not finite); no host sync.
    Structure hints as in checked_inverse."""
    d = A_masked.shape[0]
    a64 = A_masked.detach().double()
    if band == 1:
        inv = torch.diag(1.0 / a64.diagonal())
        info = None
    elif block is not None and block < d:
        nb = d // block
        blocks = a64.reshape(nb, block, nb, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [nb, h, h]
        inv_b, info = torch.linalg.inv_ex(blocks)
        inv = torch.block_diag(*inv_b) if nb > 1 else inv_b[0]
    else:
        inv, info = torch.linalg.inv_ex(a64)
    bad = ~torch.isfinite(inv).all()
    if info is not None:
        bad = bad | (info != 0).any()
    return inv, bad


def inverse_with_margin(A_masked: torch.Tensor, block: int | None = None,
                        band: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse of A_masked in its dtype, computed in float64; dominance margin as a 0-dim tensor), without a host
    synchronization: nothing is checked, but the margin is -inf when the inversion failed or is not finite, so one
    later check of the margin (> 0) covers both. The training loop uses this every step and checks once an epoch;
    checked_inverse does the same inversion checked at once. Structure hints as in checked_inverse."""
    margin = _margin_tensor(A_masked)
    inv, bad = _inverse64(A_masked, block, band)
    return inv.to(A_masked.dtype), torch.where(bad, torch.full_like(margin, float("-inf")), margin)


def checked_inverse(A_masked: torch.Tensor, name: str = "", block: int | None = None,
                    band: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse of A_masked in A_masked's dtype, dominance margin). The inverse is computed in float64.

    Raises ValueError naming `name` when the matrix is not strictly diagonally dominant or not invertible.
    Structure hints (optional, they only save time): block: A_masked is block-diagonal with blocks of this size
    (inverted block by block); band == 1: A_masked is diagonal."""
    label = name or "affine transform"
    if A_masked.dim() != 2 or A_masked.shape[0] != A_masked.shape[1]:
        raise ValueError(f"{label}: transform must be a square matrix, got shape {tuple(A_masked.shape)}")
    d = A_masked.shape[0]
    if band != 1 and block is not None and block < d and d % block:
        raise ValueError(f"{label}: block {block} does not divide d={d}")
    margin = dominance_margin(A_masked)
    if not margin > 0:
        raise ValueError(f"{label}: transform is not strictly diagonally dominant (relative margin {margin:.3e}); "
                         "it may be singular: lower the learning rate or grow the mask band more slowly")
    inv, bad = _inverse64(A_masked, block, band)
    if bool(bad):
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
# dispatch: band kernels (Triton), blocked band products (cuBLAS on diagonal windows), dense products (cuBLAS)
# ---------------------------------------------------------------------------------------------------------------------
# "band":    Triton kernels that skip the zero part of A*M (and fuse the fake quantization into the product).
# "blocked": columns in chunks of CHUNK; chunk c only meets the window [c - band + 1, c + CHUNK + band - 1) of A*M:
#            batched cuBLAS products over those windows (work (CHUNK + 2 band) / d of a dense product).
# "dense":   full cuBLAS products with A*M materialized.
# Measured on an H100 (bench/results/calib_kernels.md, bench/NOTES-calib-kernels.md): the band kernels win while
# the band is narrow (share (2 band - 1) / d up to ~0.12 at d = 4096) or the products are small (every path is then
# bound by launches); dense cuBLAS products win above. The blocked products measured slower than dense at every
# band where the band kernels lose, so they are never chosen automatically (gemm="blocked" still runs them).
# "blocks":  A*M block-diagonal (block < d): batched cuBLAS products over its diagonal blocks only (work block / d of
#            a dense product; no atomics, so as deterministic as "dense"; the inverse computed and kept as blocks).
# gemm="deterministic" (what calibration asks for): "blocks" where A*M is block-diagonal, else "dense".
# AQ_AFFINE_GEMM=band|blocked|dense|blocks forces a path everywhere.
BAND_SHARE_MAX = float(os.environ.get("AQ_BAND_SHARE_MAX", "0.12"))
SMALL_WORK = 4e9  # 2 N d span: below this the products cost little and launch count decides
CHUNK = 512
_PATHS = ("band", "blocked", "dense", "blocks")
DETERMINISTIC = "deterministic"


def gemm_path(N: int, d: int, band: int, block: int, device: torch.device, gemm: str | None) -> str:
    gemm = gemm or os.environ.get("AQ_AFFINE_GEMM") or None
    if gemm == DETERMINISTIC:
        return "blocks" if block < d else "dense"
    if gemm == "blocks" and block >= d:
        return "dense"  # one block: the dense product is the block product
    if gemm in _PATHS:
        return gemm
    if gemm is not None:
        raise ValueError(f"gemm must be one of {_PATHS + (DETERMINISTIC,)} or None, got {gemm!r}")
    if device.type != "cuda":
        return "band"  # the interpreter: tests run the kernels
    span = min(2 * band - 1, block, d)
    if span / d <= BAND_SHARE_MAX or 2 * N * d * span < SMALL_WORK:
        return "band"
    return "dense"


def _chunk_runs(d: int, band: int, C: int):
    """Column chunks [c0, c1) of width C with their windows [lo, hi) = [c0 - band + 1, c1 + band - 1) clipped to
    [0, d). Interior chunks (full width, unclipped window) are grouped in runs: ("bmm", c_start, n_chunks);
    the others come alone: ("mm", c0, c1, lo, hi)."""
    P = band - 1
    runs = []
    for c0 in range(0, d, C):
        c1 = min(c0 + C, d)
        lo, hi = c0 - P, c1 + P
        if c1 - c0 == C and lo >= 0 and hi <= d:
            if runs and runs[-1][0] == "bmm" and runs[-1][1] + runs[-1][2] * C == c0:
                runs[-1] = ("bmm", runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append(("bmm", c0, 1))
        else:
            runs.append(("mm", c0, c1, max(lo, 0), min(hi, d)))
    return runs


def _chunking(d: int, band: int, C: int | None):
    """(chunk width, band overhang P, window width C + 2 P, the chunk runs) of the blocked products."""
    C = C or CHUNK
    return C, band - 1, C + 2 * (band - 1), _chunk_runs(d, band, C)


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (2-D or batched 3-D) with a float32 result (cuBLAS writes fp32 directly from 16-bit operands)."""
    if a.dtype != torch.float32 and a.is_cuda:
        try:
            return (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return torch.matmul(a, b).float()


def _windows(t: torch.Tensor, nk: int, rows: int, cols: int, r0: int, c0: int, dr: int, dc: int) -> torch.Tensor:
    """The nk windows t[r0 + k dr : r0 + k dr + rows, c0 + k dc : c0 + k dc + cols] as one [nk, rows, cols] view."""
    s0, s1 = t.stride()
    return t.as_strided((nk, rows, cols), (dr * s0 + dc * s1, s0, s1), t.storage_offset() + r0 * s0 + c0 * s1)


def _blocked_xat(x: torch.Tensor, Am: torch.Tensor, band: int, C: int | None = None) -> torch.Tensor:
    """x @ Am^T (fp32 [N, d]) for Am banded (|i - j| < band), in the dot dtype; x @ Am is _blocked_xat(x, Am.T)."""
    N, d = x.shape
    C, P, L, runs = _chunking(d, band, C)
    out = torch.empty((N, d), dtype=torch.float32, device=x.device)
    for run in runs:
        if run[0] == "bmm":
            _, c, nk = run
            xw = _windows(x, nk, N, L, 0, c - P, 0, C)  # x[:, window]
            aw = _windows(Am, nk, C, L, c, c - P, C, C)  # Am[chunk, window]
            out[:, c:c + nk * C].view(N, nk, C).copy_(_mm32(xw, aw.transpose(1, 2)).permute(1, 0, 2))
        else:
            _, c0, c1, lo, hi = run
            out[:, c0:c1] = _mm32(x[:, lo:hi], Am[c0:c1, lo:hi].T)
    return out


def _blocked_gtx(g: torch.Tensor, x: torch.Tensor, band: int, M: torch.Tensor, C: int | None = None) -> torch.Tensor:
    """(g^T x) * M (fp32 [d, d]) on the band windows only; g, x contiguous [N, d] in the dot dtype."""
    N, d = g.shape
    C, P, L, runs = _chunking(d, band, C)
    out = torch.zeros((d, d), dtype=torch.float32, device=g.device)
    for run in runs:
        if run[0] == "bmm":
            _, c, nk = run
            gc = _windows(g, nk, N, C, 0, c, 0, C).transpose(1, 2)  # g[:, chunk]^T
            xw = _windows(x, nk, N, L, 0, c - P, 0, C)  # x[:, window]
            _windows(out, nk, C, L, c, c - P, C, C).copy_(_mm32(gc, xw))  # out[chunk, window]
        else:
            _, c0, c1, lo, hi = run
            out[c0:c1, lo:hi] = _mm32(g[:, c0:c1].T, x[:, lo:hi])
    return out.mul_(M)


@functools.lru_cache(maxsize=8)  # the few masks of a step stay cached (a captured CUDA graph must not rebuild one)
def _mask_cached(d: int, band: int, block: int, alpha: float, device: str) -> torch.Tensor:
    return affine_mask(d, band, block, alpha, device=device)


def cached_mask(d, band, block, alpha, device):
    return _mask_cached(d, band, block, float(alpha), str(device))


def forget_cached_masks() -> None:
    """Empty the mask cache: after a failed CUDA graph capture it may hold masks that were never computed."""
    _mask_cached.cache_clear()


def _torch_dtype(dm: int, fallback: torch.dtype) -> torch.dtype:
    return {DOT_BF16: torch.bfloat16, DOT_FP16: torch.float16}.get(dm, fallback)


def _dense_mm(a: torch.Tensor, b: torch.Tensor, dm: int) -> torch.Tensor:
    """a @ b (2-D) with both operands in the dot dtype (fp32 for tf32/ieee: cuBLAS follows torch's precision setting),
    the result in float32 where cuBLAS can write it so (16-bit operands on CUDA), else in the operands' dtype."""
    t = _torch_dtype(dm, torch.float32)
    a, b = a.to(t), b.to(t)
    if t != torch.float32 and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return torch.matmul(a, b)


def _diag_blocks(m: torch.Tensor, b: int) -> torch.Tensor:
    """The diagonal b x b blocks of a [d, d] matrix as a [d // b, b, b] view (block j: rows and columns j*b..; a copy
    for a non-contiguous matrix such as A.T)."""
    nb = m.shape[0] // b
    m = m if m.is_contiguous() else m.contiguous()
    return m.view(nb, b, nb, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _block_mask(block: int, band: int, alpha: float, device) -> torch.Tensor:
    """The mask inside one diagonal block, [block, block] (the same for every block); broadcasts over [nb, b, b]."""
    return cached_mask(block, band, block, alpha, device)


def _from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """The block-diagonal [d, d] float32 matrix with these [nb, b, b] blocks (zeros elsewhere)."""
    nb, b, _ = blocks.shape
    out = torch.zeros((nb * b, nb * b), dtype=torch.float32, device=blocks.device)
    _diag_blocks(out, b).copy_(blocks)
    return out


def _by_blocks(x: torch.Tensor, blocks: torch.Tensor, dm: int) -> torch.Tensor:
    """x @ block_diag(blocks) (fp32 [R, d]) for x [R, d], blocks [nb, b, b]: one batched product."""
    R, d = x.shape
    nb, b, _ = blocks.shape
    t = _torch_dtype(dm, torch.float32)
    xb = x.to(t).view(R, nb, b).transpose(0, 1)          # [nb, R, b]
    return _mm32(xb, blocks.to(t)).transpose(0, 1).reshape(R, d)


def _blocks_grad(p: torch.Tensor, q: torch.Tensor, block_mask: torch.Tensor, dm: int) -> torch.Tensor:
    """(p^T q) * M on the diagonal blocks only, as a [d, d] float32 matrix (zeros off the blocks); p, q [R, d];
    block_mask: the [b, b] mask inside every block."""
    R, d = p.shape
    b = block_mask.shape[-1]
    nb = d // b
    t = _torch_dtype(dm, torch.float32)
    pb = p.to(t).view(R, nb, b).permute(1, 2, 0)          # [nb, b, R]
    qb = q.to(t).view(R, nb, b).transpose(0, 1)           # [nb, R, b]
    return _from_blocks(_mm32(pb, qb).mul_(block_mask))


def _margin_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """_margin_tensor of the block-diagonal matrix with these blocks (the same rows, off-block entries being 0)."""
    a = blocks.detach().double().abs()
    diag = a.diagonal(dim1=1, dim2=2)
    rel = (diag - (a.sum(2) - diag)) / diag
    rel = torch.where(diag > 0, rel, torch.full_like(rel, float("-inf")))
    return rel.min()


NS_ITERS = 16  # Newton-Schulz steps: the residual squares each step, from (1 - margin): 0.95^(2^16) ~ 1e-1459


def newton_schulz_inverse(a: torch.Tensor, iters: int = NS_ITERS) -> torch.Tensor:
    """Inverses of strictly (row) diagonally dominant matrices a [..., b, b] by Newton-Schulz from X0 = diag(a)^-1:
    X <- (2I - X a) X, so I - X a squares each step and starts at ||I - X0 a||_inf = 1 - margin < 1. Plain batched
    products (no LU, no pivoting, no host synchronization: safe inside a CUDA graph, unlike a batched LU that some
    backends run through MAGMA). Converged to float64 rounding for margins down to ~1e-3 at NS_ITERS; a
    non-dominant input may not converge (the caller's margin check reports it)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    x = torch.diag_embed(1.0 / a.diagonal(dim1=-2, dim2=-1))
    for _ in range(iters):
        x = (2 * eye - x @ a) @ x
    return x


def inverse_blocks(A_masked_blocks: torch.Tensor, name: str = "", check: bool = True):
    """(inverses of the diagonal blocks [nb, b, b] of a block-diagonal transform, computed in float64 and returned in
    the blocks' dtype; dominance margin). check: raise (naming `name`) on a non-dominant or singular transform and
    return the margin as a float (LU inverse); else no host synchronization, the margin a 0-dim tensor (-inf when the
    inversion failed), as inverse_with_margin, and the inverse by Newton-Schulz (the training step: capturable)."""
    margin = _margin_blocks(A_masked_blocks)
    a64 = A_masked_blocks.detach().double()
    if check:
        inv, info = torch.linalg.inv_ex(a64)
        bad = ~torch.isfinite(inv).all() | (info != 0).any()
    else:
        inv = newton_schulz_inverse(a64)
        bad = ~torch.isfinite(inv).all()
    if check:
        label = name or "affine transform"
        m = float(margin)
        if not m > 0:
            raise ValueError(f"{label}: transform is not strictly diagonally dominant (relative margin {m:.3e}); "
                             "it may be singular: lower the learning rate or grow the mask band more slowly")
        if bool(bad):
            raise ValueError(f"{label}: transform is singular (dominance margin {m:.3e})")
        return inv.to(A_masked_blocks.dtype), m
    return inv.to(A_masked_blocks.dtype), torch.where(bad, torch.full_like(margin, float("-inf")), margin)


_FUSE_GROUPS = (16, 32, 64, 128, 256)


def _band_grads(g, w, A, band, block, alpha, dm, needs) -> tuple:
    """(grad w, grad A) of w @ (A*M)^T on the band kernels, from the output gradient g (None where not needed)."""
    gw = band_mm(g, A, band, block, alpha, transpose_b=True, out_dtype=w.dtype, dot_mode=dm) if needs[0] else None
    gA = band_grad(g, w, band, block, alpha, dot_mode=dm) if needs[1] else None
    return gw, gA


class _MaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, A, band, block, alpha, path):
        d = w.shape[-1]
        dm = dot_mode_for(w.dtype, w.device)
        if path == "band":
            out = band_mm(w, A, band, block, alpha, out_dtype=w.dtype, dot_mode=dm)
        elif path == "blocks":
            Mb = _block_mask(block, band, alpha, A.device)
            out = _by_blocks(w, (_diag_blocks(A, block) * Mb).transpose(1, 2), dm).to(w.dtype)
        else:
            out = _dense_mm(w, (A * cached_mask(d, band, block, alpha, A.device)).T, dm).to(w.dtype)
        ctx.save_for_backward(w, A)
        ctx.cfg = (band, block, alpha, path, dm)
        return out

    @staticmethod
    def backward(ctx, gy):
        w, A = ctx.saved_tensors
        band, block, alpha, path, dm = ctx.cfg
        d = w.shape[-1]
        gy = gy.contiguous()
        gw = gA = None
        if path == "band":
            gw, gA = _band_grads(gy, w, A, band, block, alpha, dm, ctx.needs_input_grad)
        elif path == "blocks":
            Mb = _block_mask(block, band, alpha, A.device)
            if ctx.needs_input_grad[0]:
                gw = _by_blocks(gy, _diag_blocks(A, block) * Mb, dm).to(w.dtype)
            if ctx.needs_input_grad[1]:
                gA = _blocks_grad(gy, w, Mb, dm)
        else:
            M = cached_mask(d, band, block, alpha, A.device)
            if ctx.needs_input_grad[0]:
                gw = _dense_mm(gy, A * M, dm).to(w.dtype)
            if ctx.needs_input_grad[1]:
                gA = _dense_mm(gy.T, w, dm).float() * M
        return gw, (gA.to(A.dtype) if gA is not None else None), None, None, None, None


class _TransformFakeQuant(torch.autograd.Function):
    """y = fake_quant(w @ (A*M)^T) with LWC factors cmax = sigmoid(u), cmin = sigmoid(l)."""

    @staticmethod
    def forward(ctx, w, A, cmax, cmin, band, block, alpha, bits, g, symmetric, path):
        N, d = w.shape
        NG = d // g
        dm = dot_mode_for(w.dtype, w.device)
        cmax2 = FQ.as_group_rows(cmax, N, NG)
        cmin2 = FQ.as_group_rows(cmin, N, NG)
        Am = None
        if path == "band" and g in _FUSE_GROUPS:
            wt, y, stats = band_mm(w, A, band, block, alpha, out_dtype=w.dtype, dot_mode=dm,
                                   quant=dict(bits=bits, g=g, symmetric=symmetric, cmax=cmax2, cmin=cmin2))
        else:
            if path == "band":
                wt = band_mm(w, A, band, block, alpha, out_dtype=torch.float32, dot_mode=dm)
            elif path == "blocks":  # Am: the masked diagonal blocks [nb, b, b]
                Am = _diag_blocks(A, block) * _block_mask(block, band, alpha, A.device)
                wt = _by_blocks(w, Am.transpose(1, 2), dm)
            else:
                t = _torch_dtype(dm, torch.float32)
                Am = (A * cached_mask(d, band, block, alpha, A.device)).to(t)
                if path == "blocked":
                    wt = _blocked_xat(w.to(t), Am, band)
                else:
                    wt = _mm32(w.to(t), Am.T)
            y, stats = FQ.fake_quant_fwd(wt, bits, g, symmetric, cmax2, cmin2, save_stats=True, out_dtype=w.dtype)
        ctx.save_for_backward(w, A, Am, wt, stats, cmax2, cmin2)
        ctx.cfg = (band, block, alpha, bits, g, symmetric, path, dm,
                   None if cmax is None else cmax.shape, None if cmin is None else cmin.shape)
        return y

    @staticmethod
    def backward(ctx, gy):
        w, A, Am, wt, stats, cmax2, cmin2 = ctx.saved_tensors
        band, block, alpha, bits, g, symmetric, path, dm, cmax_shape, cmin_shape = ctx.cfg
        d = w.shape[-1]
        t = _torch_dtype(dm, torch.float32)
        gwt, gcmax, gcmin = FQ.fake_quant_bwd(wt, gy, stats, bits, g, symmetric, cmax2, cmin2,
                                              gx_dtype=t)
        gw = gA = None
        if path == "band":
            gw, gA = _band_grads(gwt, w, A, band, block, alpha, dm, ctx.needs_input_grad)
        elif path == "blocks":
            if ctx.needs_input_grad[0]:
                gw = _by_blocks(gwt, Am, dm).to(w.dtype)
            if ctx.needs_input_grad[1]:
                gA = _blocks_grad(gwt, w, _block_mask(block, band, alpha, A.device), dm)
        else:
            M = cached_mask(d, band, block, alpha, A.device)
            wd = w.to(t)
            if path == "blocked":
                if ctx.needs_input_grad[0]:
                    gw = _blocked_xat(gwt, Am.T, band).to(w.dtype)
                if ctx.needs_input_grad[1]:
                    gA = _blocked_gtx(gwt, wd, band, M)
            else:
                if ctx.needs_input_grad[0]:
                    gw = _mm32(gwt, Am).to(w.dtype)
                if ctx.needs_input_grad[1]:
                    gA = _mm32(gwt.T, wd).mul_(M)
        gcmax = gcmax.reshape(cmax_shape) if gcmax is not None and ctx.needs_input_grad[2] else None
        gcmin = gcmin.reshape(cmin_shape) if gcmin is not None and ctx.needs_input_grad[3] else None
        return (gw, (gA.to(A.dtype) if gA is not None else None), gcmax, gcmin) + (None,) * 7


class _MaskedInverseAct(torch.autograd.Function):
    """y = x @ inv with inv = (A*M)^-1 (checked_inverse, float64, computed by the caller).
    Backward: gx = gy inv^T, gA = -(inv^T x^T gy inv^T) * M = -(y^T gx) * M (only the band/block tiles)."""

    @staticmethod
    def forward(ctx, x, A, inv, band, block, alpha, path):
        d = x.shape[-1]
        dm = dot_mode_for(x.dtype, x.device)
        inv_band = 1 if band == 1 else d  # the inverse of a banded matrix is dense (inside its blocks)
        structured = path == "band" and (inv_band < d or block < d)
        if path == "blocks":  # inv: the inverses of the diagonal blocks [nb, b, b]
            y = _by_blocks(x, inv, dm).to(x.dtype)
        elif structured:
            y = band_mm(x, inv, inv_band, block, 1.0, transpose_b=True, apply_mask=False, out_dtype=x.dtype,
                        dot_mode=dm)
        else:
            y = _dense_mm(x, inv, dm).to(x.dtype)
        ctx.save_for_backward(y, inv)
        ctx.cfg = (band, block, alpha, path, dm, inv_band, structured)
        return y

    @staticmethod
    def backward(ctx, gy):
        y, inv = ctx.saved_tensors
        band, block, alpha, path, dm, inv_band, structured = ctx.cfg
        d = y.shape[-1]
        gy = gy.contiguous()
        if path == "blocks":
            gx = _by_blocks(gy, inv.transpose(1, 2), dm)
        elif structured:
            gx = band_mm(gy, inv, inv_band, block, 1.0, apply_mask=False, out_dtype=torch.float32, dot_mode=dm)
        else:
            gx = _dense_mm(gy, inv.T, dm).float()
        gA = None
        if ctx.needs_input_grad[1]:
            if path == "band":
                gA = band_grad(y, gx, band, block, alpha, scale=-1.0, dot_mode=dm)
            elif path == "blocks":
                gA = _blocks_grad(y, gx, _block_mask(block, band, alpha, y.device), dm).neg_()
            else:
                gA = -(_dense_mm(y.T, gx, dm).float() * cached_mask(d, band, block, alpha, y.device))
        gx = gx.to(y.dtype) if ctx.needs_input_grad[0] else None
        return gx, gA, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------------

def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 and t2.stride(0) == t2.shape[-1] else t2.contiguous()


def masked_weight(w: torch.Tensor, A: torch.Tensor, band: int | None = None, block: int | None = None,
                  alpha: float = 1.0, gemm: str | None = None) -> torch.Tensor:
    """w @ (A*M)^T for a weight w [N, d]; differentiable w.r.t. w and A. Output in w's dtype.

    gemm: None (choose), "band" (Triton band kernels), "dense" (cuBLAS products), "blocks" (batched cuBLAS products
    over the diagonal blocks) or "deterministic" (blocks or dense by the structure) on the Triton backend ("blocked"
    runs as "dense" here)."""
    d = w.shape[-1]
    _check_square(A, d, "masked_weight")
    bnd, blk = norm_structure(d, band, block)
    if backend.choose(w, A) != backend.TRITON:
        return masked_weight_reference(w, A, band, block, alpha)
    path = gemm_path(w.numel() // d, d, bnd, blk, w.device, gemm)
    path = "dense" if path == "blocked" else path
    return _MaskedWeight.apply(_rows(w), A, bnd, blk, float(alpha), path).reshape(w.shape)


def masked_inverse_act(x: torch.Tensor, A: torch.Tensor, band: int | None = None, block: int | None = None,
                       alpha: float = 1.0, name: str = "", gemm: str | None = None, return_margin: bool = False,
                       check: bool = True):
    """x @ (A*M)^-1 for an activation x [..., d]; the inverse in float64 after the dominance check (ValueError naming
    `name` otherwise). Differentiable w.r.t. x and A. Output in x's dtype. return_margin: also return the relative
    dominance margin (see dominance_margin).

    check=False (the calibration step): no check and no host synchronization; the margin comes back as a 0-dim tensor
    that is -inf when the inverse failed (inverse_with_margin), for the caller to check later."""
    d = x.shape[-1]
    _check_square(A, d, "masked_inverse_act")
    bnd, blk = norm_structure(d, band, block)
    if backend.choose(x, A) != backend.TRITON:
        y = masked_inverse_act_reference(x, A, band, block, alpha, name)  # checks (raises) whatever `check` says
        if return_margin:
            m = _margin_tensor(A.detach() * affine_mask(d, band, block, alpha, device=A.device))
            return y, (float(m) if check else m)
        return y
    path = gemm_path(x.numel() // d, d, bnd, blk, x.device, gemm)
    path = "dense" if path == "blocked" else path
    if path == "blocks":  # only the diagonal blocks are masked, checked and inverted
        Amb = _diag_blocks(A.detach(), blk) * _block_mask(blk, bnd, alpha, A.device)
        inv, margin = inverse_blocks(Amb, name, check)
    else:
        Am = A.detach() * cached_mask(d, bnd, blk, alpha, A.device)
        structure = (blk if blk < d else None, bnd)
        inv, margin = checked_inverse(Am, name, *structure) if check else inverse_with_margin(Am, *structure)
    y = _MaskedInverseAct.apply(_rows(x), A, inv, bnd, blk, float(alpha), path).reshape(x.shape)
    return (y, margin) if return_margin else y


def transform_fake_quant(w: torch.Tensor, A: torch.Tensor, bits: int, group_size: int | None, band: int | None = None,
                         block: int | None = None, alpha: float = 1.0, u: torch.Tensor | None = None,
                         l: torch.Tensor | None = None, symmetric: bool = False,
                         gemm: str | None = None) -> torch.Tensor:
    """fake_quant(w @ (A*M)^T) with LWC logits u, l ([N, d // g] or None); differentiable w.r.t. w, A, u, l.

    One fused kernel on the band path when g is a power of 2 in 16..256 (transform, group range, quantize in the
    epilogue); per-channel quantization takes a second (row-wise) pass."""
    primitives.check_bits(bits)
    d = w.shape[-1]
    g = primitives.check_group_size(d, group_size)
    _check_square(A, d, "transform_fake_quant")
    if w.dim() != 2:
        raise ValueError(f"transform_fake_quant: w must be a weight [N, d], got shape {tuple(w.shape)}")
    FQ.check_lwc(w, group_size, u, "u")
    FQ.check_lwc(w, group_size, l, "l")
    bnd, blk = norm_structure(d, band, block)
    tensors = [t for t in (w, A, u, l) if t is not None]
    if backend.choose(*tensors) != backend.TRITON:
        return transform_fake_quant_reference(w, A, bits, group_size, band, block, alpha, u, l, symmetric)
    path = gemm_path(w.shape[0], d, bnd, blk, w.device, gemm)
    cmax, cmin = FQ.lwc_factors(u, l)
    return _TransformFakeQuant.apply(_rows(w), A, cmax, cmin, bnd, blk, float(alpha), bits, g, symmetric, path)
