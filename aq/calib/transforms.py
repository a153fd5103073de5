"""The learnable transforms of AffineQuant calibration and their gradual mask (what a norm-side transform leaves in the
calibrated model when it cannot be folded into the norm weight is aq.qmodel.TransformedNorm).

A transform T sits between a producer of activations X and its consumers W: X becomes (X - delta) T^-1, every consumer
weight W T^T and every consumer bias b + delta W^T, so X W^T + b is unchanged until W T^T is quantized (ALGORITHM.md).
Every transform has two paths:
  - training (`exact=False`): through aq.kernels (Triton on a GPU), differentiable, with the gradual mask of the epoch;
  - merging (`exact=True`): plain float64 torch on the final (full-band) mask, for folding into the calibrated weights.
"""
from __future__ import annotations

import torch
from torch import nn

from aq.kernels import affine as AF
from aq.kernels.fake_quant import fake_quant_ste

# GEMM path of the affine kernels. "deterministic": cuBLAS products + Triton fake-quant, batched over the diagonal
# blocks of a block-diagonal transform (block:N, per-head A_vo / A_qk), dense for a full one; bitwise deterministic.
# The band kernels' gradient splits rows over programs that add atomically (run-to-run noise), and at SmolLM2 sizes
# they are not faster (bench/NOTES-calib.md). A dense product of a block:64 transform at d = 4096 does 64x the work.
GEMM = "deterministic"
# Relative dominance margin kept after every optimizer step (Transform.keep_dominant_): the Levy-Desplanques bound
# then guarantees an inverse whose norm is at most 1 / (MIN_MARGIN * min |a_ii|).
MIN_MARGIN = 0.05


def band_at(epoch: int, epochs: int, size: int) -> int:
    """Band of the gradual mask at `epoch` (0-based): 1 (diagonal only) at the first epoch, growing linearly to `size`
    (the full block) at the last. One epoch: the full band at once (there is nothing to grow over)."""
    if size <= 1 or epochs <= 1:
        return max(size, 1)
    return 1 + round((size - 1) * min(epoch, epochs - 1) / (epochs - 1))


class QuantSpec:
    """How a consumer weight is fake-quantized in the training path (LWC logits u, l or None)."""

    def __init__(self, bits: int, group_size: int | None, symmetric: bool, u=None, l=None):
        self.bits, self.group_size, self.symmetric, self.u, self.l = bits, group_size, symmetric, u, l


class Transform(nn.Module):
    """A learnable invertible d x d transform T with an optional shift delta (see the module docstring).

    form "diagonal": T = diag(s);
         "block":    T = A * M, M block-diagonal with blocks of `block` (one per head, or per `norm_block` channels),
                     banded inside each block by the gradual mask;
         "full":     the same with one block of d.
    M is affine_mask(d, band, block, alpha): 1 on the diagonal, alpha (the stability factor) on the kept off-diagonal
    entries. `band` is set each epoch (band_at); the band grows up to the block size."""

    def __init__(self, name: str, d: int, form: str, block: int | None = None, init_scale: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None, alpha: float = 1.0):
        super().__init__()
        if form not in ("diagonal", "block", "full"):
            raise ValueError(f"{name}: unknown transform form {form!r}")
        if form == "block" and (block is None or d % block):
            raise ValueError(f"{name}: block size {block} does not divide d={d}")
        self.name, self.d, self.form, self.alpha = name, d, form, float(alpha)
        self.block = {"diagonal": 1, "block": block, "full": d}[form]
        init = torch.ones(d) if init_scale is None else init_scale.detach().float().clone()
        if form == "diagonal":
            self.s = nn.Parameter(init)
        else:
            self.A = nn.Parameter(torch.diag(init))
        self.shift = None if shift is None else nn.Parameter(shift.detach().float().clone())
        self.band = self.block  # full band unless the schedule says otherwise (set_epoch)
        self.margin = 1.0  # dominance margin of T at the last inverse (1 for a diagonal; a device tensor in training)
        self._mask, self._mask_key = None, None

    @property
    def _block_arg(self) -> int | None:
        return None if self.form == "full" else self.block

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.band = band_at(epoch, epochs, self.block)

    def forget_mask(self) -> None:
        """Drop the projection's cached mask (a failed graph capture may have left one that was never computed)."""
        self._mask, self._mask_key = None, None

    @torch.no_grad()
    def keep_dominant_(self, min_margin: float = MIN_MARGIN) -> None:
        """Project A back onto the strictly diagonally dominant matrices after an optimizer step: in every row whose
        masked off-diagonal mass exceeds (1 - min_margin) |a_ii|, scale the off-diagonal entries down to that bound.

        Why: Adam moves every unmasked entry by about lr per step whatever its gradient's size, so a row of a full
        576-wide transform can gain hundreds of lr-sized entries in a few steps; the paper's argument that the gradual
        mask keeps dominance does not hold under that (the official code never checks). Without this the dominance
        check fails and the layer falls back to diagonal transforms."""
        if self.form == "diagonal":
            return
        key = (self.band, self.A.device)  # built inside a graph capture when the band is new there (aq.calib.step)
        if self._mask_key != key:  # one mask per epoch (the band changes once an epoch)
            self._mask, self._mask_key = AF.affine_mask(self.d, self.band, self._block_arg, self.alpha,
                                                        device=self.A.device), key
        Am = self.A * self._mask
        diag = Am.diagonal().abs()
        off = Am.abs().sum(1) - diag
        f = ((1 - min_margin) * diag / off.clamp(min=1e-30)).clamp(max=1.0)
        d = self.A.diagonal().clone()
        self.A.mul_(f.unsqueeze(1))
        self.A.diagonal().copy_(d)

    # ----------------------------------------------------------------------------------------------------------------
    def matrix64(self) -> torch.Tensor:
        """T = A * M (final full-band mask) or diag(s), float64 (merging)."""
        if self.form == "diagonal":
            return torch.diag(self.s.detach().double())
        M = AF.affine_mask(self.d, None, self._block_arg, self.alpha, device=self.A.device).double()
        return self.A.detach().double() * M

    def inverse64(self) -> torch.Tensor:
        """T^-1 in float64 (checked: raises naming the transform when T is not diagonally dominant)."""
        if self.form == "diagonal":
            if not bool((self.s.detach() != 0).all()):
                raise ValueError(f"{self.name}: a diagonal scale is zero")
            return torch.diag(1.0 / self.s.detach().double())
        inv, self.margin = AF.checked_inverse(self.matrix64(), self.name, self._block_arg)
        return inv

    # ----------------------------------------------------------------------------------------------------------------
    def act(self, x: torch.Tensor, exact: bool = False, shift: bool = True) -> torch.Tensor:
        """(x - delta) T^-1 for activations (or weight rows) x [..., d]."""
        if shift and self.shift is not None:
            x = x - (self.shift.detach().double() if exact else self.shift).to(x.dtype)
        if exact:
            return x.double() @ self.inverse64()
        if self.form == "diagonal":
            return x / self.s.to(x.dtype)
        # unchecked (no host synchronization per step): the margin stays a device tensor, checked by the training
        # loop once an epoch; keep_dominant_ keeps it >= MIN_MARGIN anyway
        y, self.margin = AF.masked_inverse_act(x, self.A, self.band, self._block_arg, self.alpha, self.name,
                                               gemm=GEMM, return_margin=True, check=False)
        return y

    def weight(self, w: torch.Tensor, exact: bool = False, quant: QuantSpec | None = None) -> torch.Tensor:
        """W T^T for consumer weights w [N, d], fake-quantized (straight-through, LWC) when quant is given."""
        if exact:
            return w.double() @ self.matrix64().T
        if self.form == "diagonal":
            wt = w * self.s
            if quant is None:
                return wt
            return fake_quant_ste(wt, quant.bits, quant.group_size, quant.symmetric, quant.u, quant.l)
        if quant is None:
            return AF.masked_weight(w, self.A, self.band, self._block_arg, self.alpha, gemm=GEMM)
        return AF.transform_fake_quant(w, self.A, quant.bits, quant.group_size, self.band, self._block_arg, self.alpha,
                                       quant.u, quant.l, quant.symmetric, gemm=GEMM)

    def bias(self, w: torch.Tensor, b: torch.Tensor | None, exact: bool = False) -> torch.Tensor | None:
        """b + delta W^T for a consumer (w: its weight before this transform); b unchanged without a shift."""
        if self.shift is None:
            return b
        delta = self.shift.detach().double() if exact else self.shift
        out = w.to(delta.dtype) @ delta
        return out if b is None else b.to(out.dtype) + out

    def expanded(self, groups: int, head_dim: int) -> "Transform":
        """The same transform with each block of head_dim channels repeated `groups` times (the query-head side of a
        GQA transform: query head h reads key/value head h // groups). Shares the parameters (differentiable)."""
        return _Expanded(self, groups, head_dim)


class _Expanded(nn.Module):
    """View of a per-kv-head Transform on the query-head side (GQA); used for consumer weights only."""

    def __init__(self, base: Transform, groups: int, head_dim: int):
        super().__init__()
        self.base, self.groups, self.hd = base, groups, head_dim

    def _rep(self, t: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return t
        kv = self.base.d // self.hd
        if t.dim() == 1:
            return t.view(kv, self.hd).repeat_interleave(self.groups, 0).reshape(-1)
        blocks = t.view(kv, self.hd, kv, self.hd).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [kv, hd, hd]
        return torch.block_diag(*blocks.repeat_interleave(self.groups, 0).unbind(0))

    def weight(self, w: torch.Tensor, exact: bool = False, quant: QuantSpec | None = None) -> torch.Tensor:
        b = self.base
        if exact:
            return w.double() @ self._rep(b.matrix64()).T
        if b.form == "diagonal":
            wt = w * self._rep(b.s)
            if quant is None:
                return wt
            return fake_quant_ste(wt, quant.bits, quant.group_size, quant.symmetric, quant.u, quant.l)
        A = self._rep(b.A)
        if quant is None:
            return AF.masked_weight(w, A, b.band, self.hd, b.alpha, gemm=GEMM)
        return AF.transform_fake_quant(w, A, quant.bits, quant.group_size, b.band, self.hd, b.alpha, quant.u, quant.l,
                                       quant.symmetric, gemm=GEMM)

    def bias(self, w: torch.Tensor, b: torch.Tensor | None, exact: bool = False) -> torch.Tensor | None:
        if self.base.shift is None:
            return b
        delta = self._rep(self.base.shift.detach().double() if exact else self.base.shift)
        out = w.to(delta.dtype) @ delta
        return out if b is None else b.to(out.dtype) + out


class RopeTransform(nn.Module):
    """The query/key transform of a model with rotary embeddings, per key/value head: q' = q B, k' = k B^-T.

    It must commute with the rotation RoPE applies to each channel pair (i, i + rotary_dim/2) (the HF "rotate_half"
    layout), so B acts on every pair as one complex scalar c = re + i*im: z_q' = c z_q, z_k' = z_k / conj(c). Scores
    q'.k' = Re(sum c z_q conj(z_k) / c) are unchanged for any c != 0, at every position. In the gradual mask `im` is an
    off-diagonal entry (|i - j| = rotary_dim/2): it enters times alpha once the band passes rotary_dim/2, and only in
    the affine form (omniquant: real c, a diagonal pair-tied scale). Partial rotary embeddings (rotary_dim < head_dim:
    the last head_dim - rotary_dim channels of a head are not rotated) give those channels a real scale `s` each
    (q * s, k / s)."""

    def __init__(self, name: str, kv_heads: int, head_dim: int, groups: int, affine: bool, alpha: float = 1.0,
                 rotary_dim: int | None = None):
        super().__init__()
        rd = head_dim if rotary_dim is None else rotary_dim
        if rd % 2 or not 0 < rd <= head_dim:
            raise ValueError(f"{name}: rotary embeddings need an even rotary_dim in (0, head_dim={head_dim}], got {rd}")
        self.name, self.hd, self.rd, self.groups, self.alpha = name, head_dim, rd, groups, float(alpha)
        self.re = nn.Parameter(torch.ones(kv_heads, rd // 2))
        self.im = nn.Parameter(torch.zeros(kv_heads, rd // 2)) if affine else None
        self.s = nn.Parameter(torch.ones(kv_heads, head_dim - rd)) if rd < head_dim else None
        self.band = head_dim

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.band = band_at(epoch, epochs, self.hd)

    def _c(self, exact: bool):
        re = self.re.detach().double() if exact else self.re
        if self.im is None:
            return re, None
        on = exact or self.band > self.rd // 2
        im = (self.im.detach().double() if exact else self.im) * (self.alpha if on else 0.0)
        return re, im

    @staticmethod
    def _pairs(w: torch.Tensor, re: torch.Tensor, im: torch.Tensor | None, hd: int) -> torch.Tensor:
        """Rows of w [heads * hd, cols] times c per head and pair: (x1, x2) -> (re x1 - im x2, im x1 + re x2)."""
        heads = re.shape[0]
        x = w.reshape(heads, 2, hd // 2, -1)
        x1, x2 = x[:, 0], x[:, 1]
        re, im = re.unsqueeze(-1).to(w.dtype), None if im is None else im.unsqueeze(-1).to(w.dtype)
        if im is None:
            y1, y2 = re * x1, re * x2
        else:
            y1, y2 = re * x1 - im * x2, im * x1 + re * x2
        return torch.stack((y1, y2), 1).reshape(w.shape)

    def _head_rows(self, w: torch.Tensor, re, im, s) -> torch.Tensor:
        """The rotated channels of each head through _pairs, the others times s."""
        if s is None:
            return self._pairs(w, re, im, self.hd)
        x = w.reshape(re.shape[0], self.hd, -1)
        rot = self._pairs(x[:, :self.rd].reshape(-1, x.shape[-1]), re, im, self.rd).reshape(x.shape[0], self.rd, -1)
        return torch.cat((rot, x[:, self.rd:] * s.unsqueeze(-1).to(w.dtype)), 1).reshape(w.shape)

    def rows(self, wq: torch.Tensor, wk: torch.Tensor, exact: bool = False):
        """(q rows, k rows) transformed; wq [heads*hd, cols], wk [kv*hd, cols] (bias as an extra column if any)."""
        if exact:
            wq, wk = wq.double(), wk.double()
        re, im = self._c(exact)
        s = None if self.s is None else (self.s.detach().double() if exact else self.s)
        norm2 = re * re if im is None else re * re + im * im
        if exact and not (bool((norm2 > 0).all()) and (s is None or bool((s != 0).all()))):
            raise ValueError(f"{self.name}: a rotary-pair or pass-through scale is zero")
        rq = re.repeat_interleave(self.groups, 0)
        iq = None if im is None else im.repeat_interleave(self.groups, 0)
        sq = None if s is None else s.repeat_interleave(self.groups, 0)
        q = self._head_rows(wq, rq, iq, sq)
        k = self._head_rows(wk, re / norm2, None if im is None else im / norm2, None if s is None else 1 / s)
        return q, k


class HeadTransform(nn.Module):
    """The query/key transform of a model without rotary embeddings (OPT): q' = q T, k' = k T^-T with T a Transform per
    key/value head (block of head_dim, or diagonal): W_q <- T^T W_q (query heads through .expanded for GQA),
    W_k <- T^-1 W_k."""

    def __init__(self, t: Transform, groups: int, head_dim: int):
        super().__init__()
        self.t, self.q_side = t, t.expanded(groups, head_dim)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.t.set_epoch(epoch, epochs)

    def rows(self, wq: torch.Tensor, wk: torch.Tensor, exact: bool = False):
        t = self.t
        if t.form == "diagonal":
            s = t.s.detach().double() if exact else t.s
            sq = self.q_side._rep(s)
            if exact:
                wq, wk = wq.double(), wk.double()
            return wq * sq.unsqueeze(1).to(wq.dtype), wk / s.unsqueeze(1).to(wk.dtype)
        if exact:
            q = (wq.double().T @ self.q_side._rep(t.matrix64())).T  # (W_q^T T)^T
            k = (wk.double().T @ t.inverse64().T).T                 # (W_k^T T^-T)^T
            return q, k
        Aq = self.q_side._rep(t.A)
        q = AF.masked_weight(wq.T, Aq.T, t.band, t._block_arg, t.alpha, gemm=GEMM).T   # W_q^T (A*M)
        k, t.margin = AF.masked_inverse_act(wk.T, t.A.T, t.band, t._block_arg, t.alpha, t.name, gemm=GEMM,
                                            return_margin=True, check=False)             # W_k^T (A*M)^-T
        return q, k.T
