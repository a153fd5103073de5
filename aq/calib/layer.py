"""A decoder layer under calibration, driven by the architecture mapping (aq.models.Arch), and its merge into the form
calibration hands on (aq.qmodel: FakeQuantLinear everywhere, norms folded or followed by a TransformedNorm).

The HF layer's own forward runs unchanged on a working copy in which every linear is a _LiveLinear (its weight set each
step by LayerCalib.refresh: transformed, fake-quantized, differentiable) and each norm of a site a _LiveNorm (the norm,
then the activation side of its transform). Which transforms exist and what they touch is the architecture's data
(aq.models.Arch.sites, by role; a fused linear's rows are split by role), so every architecture of aq.models.ARCHS
shares one code path.

Transforms of a LLaMA layer (ALGORITHM.md, "Where the transforms sit"; other architectures leave some out):
  A_qkv: norm before attention -> q, k, v (columns)      A_up: norm before the MLP -> gate/up or fc1 (columns)
  A_vo:  v rows (inverse) -> o columns, per kv head      A_qk: q rows / k rows (inverse), per kv head (RoPE-restricted)
  A_down (QuantConfig.down_transform, not in the paper): diagonal, up_proj rows (inverse) -> down_proj columns;
         silu(g) * (u / s) = (silu(g) * u) / s, so it folds into both weights at no inference cost. It lets
         per-token quantization of down_proj's input survive the massive activations of some channels.
down_proj / fc2 gets learnable clipping (and A_down where enabled).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from aq.calib.transforms import HeadTransform, QuantSpec, RopeTransform, Transform
from aq.config import QuantConfig
from aq.kernels.fake_quant import fake_quant_ste
from aq.models import Arch, Geometry, Site
from aq.primitives import check_group_size, choose_qparams
from aq.qmodel import FakeQuantLinear, TransformedNorm, set_qkv_abits
from aq.qmodel import set_submodule

LWC_INIT = 4.0  # sigmoid(4) ~ 0.982 of the group's range (OmniQuant's init)


class _LiveLinear(nn.Module):
    """A consumer linear during calibration: `w` / `b` are set by LayerCalib.refresh every step; inputs are
    fake-quantized per token (straight-through) in weight-activation settings."""

    def __init__(self, abits: int):
        super().__init__()
        self.abits = abits
        self.w: torch.Tensor | None = None
        self.b: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.abits < 16:
            x = fake_quant_ste(x, self.abits)
        return F.linear(x, self.w, self.b)


class _LiveNorm(nn.Module):
    """The norm, then (x - shift) T^-1 of its transform, in float32 (outside autocast: the inverse is near identity
    and bf16 would round away the learned part)."""

    def __init__(self, norm: nn.Module, transform: Transform):
        super().__init__()
        self.norm, self.transform = norm, transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        with torch.autocast(y.device.type, enabled=False):
            return self.transform.act(y.float())


def _with_bias(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return w if b is None else torch.cat([w, b.to(w.dtype).unsqueeze(1)], 1)


def _without_bias(wb: torch.Tensor, has_bias: bool):
    return (wb[:, :-1], wb[:, -1]) if has_bias else (wb, None)


def active_sites(arch: Arch, geo: Geometry, cfg: QuantConfig) -> tuple[Site, ...]:
    """The sites of `arch` that this run calibrates: A_down (form "scale") only with cfg.down_on."""
    out = []
    for s in arch.sites:
        if s.form == "scale" and not cfg.down_on:
            continue
        out.append(s)
    return tuple(out)


class LayerCalib(nn.Module):
    """The learnable state of one decoder layer (one transform per site of arch.sites, and clipping) and the working
    copy it drives.

    Transforms are in `self.t` under their site names (A_qkv, A_up, A_vo, A_qk, A_down). norm_form: form of the
    "norm" sites' transforms ("full", "block", "diagonal"); head_affine: "head" / "qk" sites per-head matrices (else
    diagonal); init: per-channel initial scales by site name (None = identity); shifts: initial shifts by site name
    (None = no shift there); quantize=False keeps weights in floating point (the equivalence tests). Weights are held
    per role (arch.modules; a fused linear's rows split by role) and joined per linear for the working copy."""

    def __init__(self, layer: nn.Module, arch: Arch, geo: Geometry, cfg: QuantConfig, *, norm_form: str,
                 head_affine: bool, alpha: float, init: dict | None = None, shifts: dict | None = None,
                 quantize: bool = True, name: str = "layer"):
        super().__init__()
        init, shifts = init or {}, shifts or {}
        self.arch, self.geo, self.cfg, self.quantize, self.name = arch, geo, cfg, quantize, name
        self.sites = active_sites(arch, geo, cfg)
        self.work = copy.deepcopy(layer)
        for p in self.work.parameters():
            p.requires_grad_(False)
        dev = next(layer.parameters()).device
        self.rows = arch.rows(geo, layer)  # role -> (linear, first row, end row)
        self.orig: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # per role
        for role, (n, r0, r1) in self.rows.items():
            lin = layer.get_submodule(n)
            b = None if lin.bias is None else lin.bias.detach().float()[r0:r1]
            self.orig[role] = (lin.weight.detach().float()[r0:r1], b)

        d, hd, kvd = geo.hidden, geo.head_dim, geo.kv_heads * geo.head_dim
        head_form = "block" if head_affine else "diagonal"
        self.t = nn.ModuleDict()
        self.consumer_side: dict[str, nn.Module] = {}  # what multiplies a site's consumer columns
        for s in self.sites:
            tn = f"{name}.{s.name}"
            if s.form == "norm":
                t = Transform(tn, d, norm_form, cfg.norm_block, init.get(s.name), shifts.get(s.name), alpha)
                self.consumer_side[s.name] = t
            elif s.form == "head":
                t = Transform(tn, kvd, head_form, hd, init.get(s.name), shifts.get(s.name), alpha)
                self.consumer_side[s.name] = t.expanded(geo.groups, hd)
            elif s.form == "qk":
                if arch.rope:
                    t = RopeTransform(tn, geo.kv_heads, hd, geo.groups, head_affine, alpha, geo.rotary_dim)
                else:
                    t = HeadTransform(Transform(tn, kvd, head_form, hd, alpha=alpha), geo.groups, hd)
            else:  # "scale"
                t = Transform(tn, self.orig[s.producer][0].shape[0], "diagonal", init_scale=init.get(s.name))
            self.t[s.name] = t
        self.to(dev)

        # learnable clipping logits per role, [rows, K // g]
        self.lwc_u, self.lwc_l = nn.ParameterDict(), nn.ParameterDict()
        if cfg.lwc and quantize:
            for role, (w, _) in self.orig.items():
                ng = w.shape[1] // check_group_size(w.shape[1], cfg.group_size)
                self.lwc_u[role] = nn.Parameter(torch.full((w.shape[0], ng), LWC_INIT, device=dev))
                self.lwc_l[role] = nn.Parameter(torch.full((w.shape[0], ng), LWC_INIT, device=dev))

        abits = cfg.abits if quantize else 16
        self.live = {n: _LiveLinear(abits) for n in arch.linears}
        for n, m in self.live.items():
            set_submodule(self.work, n, m)
        for s in self.sites:
            if s.form == "norm":
                set_submodule(self.work, s.producer, _LiveNorm(self.work.get_submodule(s.producer), self.t[s.name]))
        if abits < 16:
            set_qkv_abits(self.work.get_submodule(arch.attention), abits)

    # ----------------------------------------------------------------------------------------------------------------
    def _matrices(self) -> list[Transform]:
        """The Transforms of the layer (the q/k HeadTransform's own; RopeTransform has no matrix)."""
        out = []
        for t in self.t.values():
            if isinstance(t, HeadTransform):
                out.append(t.t)
            elif isinstance(t, Transform):
                out.append(t)
        return out

    @property
    def band(self) -> int:
        """Band of the gradual mask of the first site's transform (progress display)."""
        return getattr(next(iter(self.t.values())), "band", 1)

    def transform_params(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for m in self.t.values():
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def clip_params(self) -> list[nn.Parameter]:
        return list(self.lwc_u.values()) + list(self.lwc_l.values())

    def set_epoch(self, epoch: int, epochs: int) -> None:
        for t in self.t.values():
            t.set_epoch(epoch, epochs)

    def keep_dominant_(self) -> None:
        """After each optimizer step: keep every matrix transform strictly diagonally dominant."""
        for t in self._matrices():
            t.keep_dominant_()

    def margin_tensor(self) -> torch.Tensor:
        """Smallest dominance margin at the last inverses, as a 0-dim tensor (no host synchronization; 1.0 when every
        transform is diagonal; -inf when an inverse failed)."""
        dev = next(self.parameters()).device
        # tensors in training (no copy here), floats after merging (inverse64); diagonal transforms have margin 1
        ms = [torch.as_tensor(t.margin, dtype=torch.float64, device=dev) for t in self._matrices()
              if t.form != "diagonal"]
        if not ms:
            return torch.ones((), dtype=torch.float64, device=dev)
        return torch.stack(ms).min() if len(ms) > 1 else ms[0]

    def margin(self) -> float:
        """margin_tensor as a float."""
        return float(self.margin_tensor())

    @torch.no_grad()
    def offdiag_share(self) -> float:
        """Share of the absolute mass of the matrix transforms (final mask) that lies off the diagonal: how much the
        affine part learned beyond OmniQuant's scales (0 when every transform is diagonal)."""
        off = total = 0.0
        for t in self._matrices():
            if t.form == "diagonal":
                continue
            m = t.matrix64().abs()
            off += float(m.sum() - m.diagonal().sum())
            total += float(m.sum())
        return off / total if total else 0.0

    def _spec(self, roles: list[str]) -> QuantSpec | None:
        cfg = self.cfg
        if not self.quantize:
            return None
        u = l = None
        if len(self.lwc_u):
            u = torch.cat([self.lwc_u[r] for r in roles])
            l = torch.cat([self.lwc_l[r] for r in roles])
        return QuantSpec(cfg.wbits, cfg.group_size, cfg.symmetric, u, l)

    def _consume(self, t, items: list[tuple[str, torch.Tensor, torch.Tensor | None]], exact: bool) -> dict:
        """Consumer weights of transform t (one fused call for all of them): {role: (W T^T [fake-quantized], bias)}."""
        W = torch.cat([w for _, w, _ in items]) if len(items) > 1 else items[0][1]
        Wt = t.weight(W, exact, None if exact else self._spec([n for n, _, _ in items]))
        out, r = {}, 0
        for n, w, b in items:
            out[n] = (Wt[r:r + w.shape[0]], t.bias(w, b, exact))
            r += w.shape[0]
        return out

    def effective_roles(self, exact: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Every role's weight and bias with the transforms applied: fake-quantized and differentiable (training), or
        float64 and unquantized (exact: merging). Order: the producer-row transforms (q/k, then v), the consumer
        columns of "norm" / "head" sites with their quantization, then the "scale" sites, then the plain rest."""
        O = {r: ((w.double(), None if b is None else b.double()) if exact else (w, b))  # noqa: E741
             for r, (w, b) in self.orig.items()}
        for s in self.sites:
            t = self.t[s.name]
            if s.form == "qk":  # q / k rows (biases ride along as a last column)
                (wq, bq), (wk, bk) = O[s.producer], O[s.consumers[0]]
                q_rows, k_rows = t.rows(_with_bias(wq, bq), _with_bias(wk, bk), exact)
                O[s.producer] = _without_bias(q_rows, bq is not None)
                O[s.consumers[0]] = _without_bias(k_rows, bk is not None)
            elif s.form == "head":  # producer rows: W_v^T T^-1 and (b_v - delta) T^-1
                wv, bv = O[s.producer]
                cols = [wv.T]
                if bv is not None:
                    delta = 0 if t.shift is None else (t.shift.detach().double() if exact else t.shift)
                    cols.append((bv - delta).unsqueeze(0))
                v_cols = t.act(torch.cat(cols), exact, shift=False)
                O[s.producer] = (v_cols[:wv.shape[1]].T, v_cols[-1] if bv is not None else None)
        out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for s in self.sites:
            if s.name in self.consumer_side:
                out.update(self._consume(self.consumer_side[s.name], [(r, *O[r]) for r in s.consumers], exact))
        for s in self.sites:
            if s.form != "scale":
                continue
            # producer rows / s after their (row-wise, hence scale-invariant for s > 0) fake quantization; consumer
            # columns * s before theirs. merged() checks s > 0, which makes the two orders agree.
            t = self.t[s.name]
            sc = t.s.detach().double() if exact else t.s
            wu, bu = out.get(s.producer, O[s.producer])
            out[s.producer] = (wu / sc.unsqueeze(1).to(wu.dtype), None if bu is None else bu / sc.to(bu.dtype))
            for r in s.consumers:
                O[r] = (t.weight(O[r][0], exact), O[r][1])
        for r, (w, b) in O.items():
            if r in out:
                continue
            if not exact and self.quantize:
                spec = self._spec([r])
                w = fake_quant_ste(w, spec.bits, spec.group_size, spec.symmetric, spec.u, spec.l)
            out[r] = (w, b)
        return out

    def effective(self, exact: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """effective_roles joined per linear (a fused linear's roles in row order)."""
        roles = self.effective_roles(exact)
        out = {}
        for n in self.arch.linears:
            parts = sorted((r0, r) for r, (m, r0, _) in self.rows.items() if m == n)
            ws = [roles[r][0] for _, r in parts]
            bs = [roles[r][1] for _, r in parts]
            out[n] = (ws[0] if len(ws) == 1 else torch.cat(ws), None if bs[0] is None else
                      bs[0] if len(bs) == 1 else torch.cat(bs))
        return out

    def roles_of(self, linear: str) -> list[str]:
        """The roles of a linear, in row order."""
        return [r for _, r in sorted((r0, r) for r, (m, r0, _) in self.rows.items() if m == linear)]

    def refresh(self) -> None:
        """Set this step's effective weights on the live linears (call outside autocast)."""
        for n, (w, b) in self.effective().items():
            self.live[n].w, self.live[n].b = w, b

    def forward(self, x: torch.Tensor, **layer_kwargs) -> torch.Tensor:
        out = self.work(x, **layer_kwargs)
        return out[0] if isinstance(out, tuple) else out

    # ----------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged(self, fp_layer: nn.Module) -> nn.Module:
        """A copy of fp_layer with the transforms merged for good: FakeQuantLinear (with the learned clipping's
        scale / zero) for every linear, diagonal norm transforms folded into the norm, others as TransformedNorm."""
        return self._merge(fp_layer, rounded=True)[0]

    @torch.no_grad()
    def merged_unrounded(self, fp_layer: nn.Module) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """As merged, but every linear a plain nn.Linear holding its transformed weight before rounding, with the
        clipped qparams {name: (scale, zero)} that would round it: for a rounding other than round-to-nearest
        (QuantConfig.rounding "gptq") to finish."""
        return self._merge(fp_layer, rounded=False)

    def _merge(self, fp_layer: nn.Module, rounded: bool):
        cfg, a = self.cfg, self.arch
        for s in self.sites:
            t = self.t[s.name]
            if s.form == "scale" and not bool((t.s > 0).all()):
                raise ValueError(f"{t.name}: a diagonal scale is zero or negative (the producer rows' quantization is "
                                 "invariant to positive scales only)")
        new = copy.deepcopy(fp_layer)
        qparams = {}
        for n, (w, b) in self.effective(exact=True).items():
            lin = fp_layer.get_submodule(n)
            dt = lin.weight.dtype
            w32 = w.float()
            bias = None if b is None else b.to(dt)
            if self.quantize:
                cmax = cmin = None
                if len(self.lwc_u):
                    roles = self.roles_of(n)
                    cmax = torch.sigmoid(torch.cat([self.lwc_u[r] for r in roles]))
                    cmin = torch.sigmoid(torch.cat([self.lwc_l[r] for r in roles]))
                qparams[n] = choose_qparams(w32, cfg.wbits, cfg.group_size, cfg.symmetric, cmax, cmin)
            if self.quantize and rounded:
                mod = FakeQuantLinear.from_weight(w32, bias, *qparams[n], wbits=cfg.wbits, group_size=cfg.group_size,
                                                  abits=cfg.abits, symmetric=cfg.symmetric, dtype=dt)
            else:
                mod = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=dt)
                mod.weight.copy_((w32 if self.quantize else w).to(dt))
                if bias is not None:
                    mod.bias.copy_(bias)
            set_submodule(new, n, mod)
        for s in self.sites:
            if s.form == "norm":
                merged = _merge_norm(new.get_submodule(s.producer), self.t[s.name], a.norm_offset)
                set_submodule(new, s.producer, merged)
        if self.quantize and cfg.abits < 16:
            set_qkv_abits(new.get_submodule(a.attention), cfg.abits)
        return new, qparams


@torch.no_grad()
def _merge_norm(norm: nn.Module, t: Transform, offset: float = 0.0) -> nn.Module:
    """Fold (norm(x) - delta) T^-1 into the norm when T is diagonal; else fold delta into its bias and return a
    TransformedNorm carrying T^-1. offset: the norm scales by (offset + weight) (Arch.norm_offset)."""
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    if t.shift is not None:
        if b is None:
            raise ValueError(f"{t.name}: a shift needs a norm with a bias")
        b.sub_(t.shift.detach().to(b.dtype))
    if t.form == "diagonal":
        if w is None:
            raise ValueError(f"{t.name}: cannot fold a diagonal transform into a norm without a weight")
        s = t.s.detach().double()
        w.copy_(((w.double() + offset) / s - offset).to(w.dtype))
        if b is not None:
            b.copy_((b.double() / s).to(b.dtype))
        return norm
    inv = t.inverse64()
    if t.form == "full":
        return TransformedNorm(norm, inv.float(), "full")
    nb, blk = t.d // t.block, t.block
    blocks = inv.view(nb, blk, nb, blk).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return TransformedNorm(norm, blocks.float().contiguous(), "block")
