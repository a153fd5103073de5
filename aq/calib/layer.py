"""A decoder layer under calibration, driven by the architecture mapping (aq.models.Arch), and its merge into the form
calibration hands on (aq.qmodel: FakeQuantLinear everywhere, norms folded or followed by a TransformedNorm).

The HF layer's own forward runs unchanged on a working copy in which every consumer linear is a _LiveLinear (its weight
set each step by LayerCalib.refresh: transformed, fake-quantized, differentiable) and each norm a _LiveNorm (the norm,
then the activation side of its transform). So LLaMA, Mistral, Qwen2 (GQA, q/k/v biases) and OPT share one code path.

Transforms of a layer (ALGORITHM.md, "Where the transforms sit"):
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
from aq.models import Arch, Geometry
from aq.primitives import check_group_size, choose_qparams
from aq.qmodel import FakeQuantLinear, TransformedNorm, set_qkv_abits
from aq.qmodel import set_submodule as _set

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


def _parent(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def _key(name: str) -> str:
    return name.replace(".", "__")


def _with_bias(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return w if b is None else torch.cat([w, b.to(w.dtype).unsqueeze(1)], 1)


def _without_bias(wb: torch.Tensor, has_bias: bool):
    return (wb[:, :-1], wb[:, -1]) if has_bias else (wb, None)


class LayerCalib(nn.Module):
    """The learnable state of one decoder layer (transforms + clipping) and the working copy it drives.

    norm_form: form of A_qkv / A_up ("full", "block", "diagonal"); head_affine: A_vo / A_qk per-head matrices (else
    diagonal); init: per-channel initial scales {"attn", "mlp", "vo"} (None = identity); shifts: initial shifts for the
    same keys (None = no shift there); quantize=False keeps weights in floating point (the equivalence tests)."""

    def __init__(self, layer: nn.Module, arch: Arch, geo: Geometry, cfg: QuantConfig, *, norm_form: str,
                 head_affine: bool, alpha: float, init: dict | None = None, shifts: dict | None = None,
                 quantize: bool = True, name: str = "layer"):
        super().__init__()
        init, shifts = init or {}, shifts or {}
        self.arch, self.geo, self.cfg, self.quantize, self.name = arch, geo, cfg, quantize, name
        self.work = copy.deepcopy(layer)
        for p in self.work.parameters():
            p.requires_grad_(False)
        dev = next(layer.parameters()).device
        self.orig: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for n in arch.linears:
            lin = layer.get_submodule(n)
            b = None if lin.bias is None else lin.bias.detach().float()
            self.orig[n] = (lin.weight.detach().float(), b)

        d, hd, kvd = geo.hidden, geo.head_dim, geo.kv_heads * geo.head_dim
        vo_form = "block" if head_affine else "diagonal"
        self.t_attn = Transform(f"{name}.A_qkv", d, norm_form, cfg.norm_block, init.get("attn"), shifts.get("attn"),
                                alpha)
        self.t_mlp = Transform(f"{name}.A_up", d, norm_form, cfg.norm_block, init.get("mlp"), shifts.get("mlp"), alpha)
        self.t_vo = Transform(f"{name}.A_vo", kvd, vo_form, hd, init.get("vo"), shifts.get("vo"), alpha)
        self.t_o = self.t_vo.expanded(geo.groups, hd)
        self.t_down = None
        if cfg.down_on and arch.mlp_up is not None:
            inter = layer.get_submodule(arch.mlp_out).in_features
            self.t_down = Transform(f"{name}.A_down", inter, "diagonal", init_scale=init.get("down"))
        if arch.rope:
            self.t_qk = RopeTransform(f"{name}.A_qk", geo.kv_heads, hd, geo.groups, head_affine, alpha)
        else:
            self.t_qk = HeadTransform(Transform(f"{name}.A_qk", kvd, vo_form, hd, alpha=alpha), geo.groups, hd)
        self.to(dev)

        # learnable clipping logits per linear, [N, K // g]
        self.lwc_u, self.lwc_l = nn.ParameterDict(), nn.ParameterDict()
        if cfg.lwc and quantize:
            for n, (w, _) in self.orig.items():
                ng = w.shape[1] // check_group_size(w.shape[1], cfg.group_size)
                self.lwc_u[_key(n)] = nn.Parameter(torch.full((w.shape[0], ng), LWC_INIT, device=dev))
                self.lwc_l[_key(n)] = nn.Parameter(torch.full((w.shape[0], ng), LWC_INIT, device=dev))

        abits = cfg.abits if quantize else 16
        self.live = {n: _LiveLinear(abits) for n in arch.linears}
        for n, m in self.live.items():
            _set(self.work, n, m)
        _set(self.work, arch.attn_norm, _LiveNorm(self.work.get_submodule(arch.attn_norm), self.t_attn))
        _set(self.work, arch.mlp_norm, _LiveNorm(self.work.get_submodule(arch.mlp_norm), self.t_mlp))
        if abits < 16:
            set_qkv_abits(self.work.get_submodule(_parent(arch.q)[0]), abits)

    # ----------------------------------------------------------------------------------------------------------------
    def transform_params(self) -> list[nn.Parameter]:
        mods = (self.t_attn, self.t_mlp, self.t_vo, self.t_qk) + ((self.t_down,) if self.t_down is not None else ())
        seen, out = set(), []
        for m in mods:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def clip_params(self) -> list[nn.Parameter]:
        return list(self.lwc_u.values()) + list(self.lwc_l.values())

    def set_epoch(self, epoch: int, epochs: int) -> None:
        for t in (self.t_attn, self.t_mlp, self.t_vo, self.t_qk):
            t.set_epoch(epoch, epochs)

    def keep_dominant_(self) -> None:
        """After each optimizer step: keep every matrix transform strictly diagonally dominant."""
        for t in (self.t_attn, self.t_mlp, self.t_vo) + ((self.t_qk.t,) if isinstance(self.t_qk, HeadTransform) else ()):
            t.keep_dominant_()

    def margin_tensor(self) -> torch.Tensor:
        """Smallest dominance margin at the last inverses, as a 0-dim tensor (no host synchronization; 1.0 when every
        transform is diagonal; -inf when an inverse failed)."""
        ts = [self.t_attn, self.t_mlp, self.t_vo] + ([self.t_qk.t] if isinstance(self.t_qk, HeadTransform) else [])
        dev = next(self.parameters()).device
        # tensors in training (no copy here), floats after merging (inverse64); diagonal transforms have margin 1
        ms = [torch.as_tensor(t.margin, dtype=torch.float64, device=dev) for t in ts if t.form != "diagonal"]
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
        ts = [self.t_attn, self.t_mlp, self.t_vo] + ([self.t_qk.t] if isinstance(self.t_qk, HeadTransform) else [])
        off = total = 0.0
        for t in ts:
            if t.form == "diagonal":
                continue
            m = t.matrix64().abs()
            off += float(m.sum() - m.diagonal().sum())
            total += float(m.sum())
        return off / total if total else 0.0

    def _spec(self, names: list[str]) -> QuantSpec | None:
        cfg = self.cfg
        if not self.quantize:
            return None
        u = l = None
        if len(self.lwc_u):
            u = torch.cat([self.lwc_u[_key(n)] for n in names])
            l = torch.cat([self.lwc_l[_key(n)] for n in names])
        return QuantSpec(cfg.wbits, cfg.group_size, cfg.symmetric, u, l)

    def _consume(self, t, items: list[tuple[str, torch.Tensor, torch.Tensor | None]], exact: bool) -> dict:
        """Consumer weights of transform t (one fused call for all of them): {name: (W T^T [fake-quantized], bias)}."""
        W = torch.cat([w for _, w, _ in items]) if len(items) > 1 else items[0][1]
        Wt = t.weight(W, exact, None if exact else self._spec([n for n, _, _ in items]))
        out, r = {}, 0
        for n, w, b in items:
            out[n] = (Wt[r:r + w.shape[0]], t.bias(w, b, exact))
            r += w.shape[0]
        return out

    def effective(self, exact: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Every linear's weight and bias with the transforms applied: fake-quantized and differentiable (training),
        or float64 and unquantized (exact: merging)."""
        a = self.arch
        O = {n: ((w.double(), None if b is None else b.double()) if exact else (w, b)) for n, (w, b) in self.orig.items()}
        (wq, bq), (wk, bk), (wv, bv), (wo, bo) = O[a.q], O[a.k], O[a.v], O[a.o]
        # A_qk on q / k rows (biases ride along as a last column)
        q_rows, k_rows = self.t_qk.rows(_with_bias(wq, bq), _with_bias(wk, bk), exact)
        wq, bq = _without_bias(q_rows, bq is not None)
        wk, bk = _without_bias(k_rows, bk is not None)
        # A_vo on v rows: W_v^T T^-1 and (b_v - delta) T^-1
        vt = self.t_vo
        cols = [wv.T]
        if bv is not None:
            delta = 0 if vt.shift is None else (vt.shift.detach().double() if exact else vt.shift)
            cols.append((bv - delta).unsqueeze(0))
        v_cols = vt.act(torch.cat(cols), exact, shift=False)
        wv, bv = v_cols[:wv.shape[1]].T, (v_cols[-1] if bv is not None else None)

        out = self._consume(self.t_attn, [(a.q, wq, bq), (a.k, wk, bk), (a.v, wv, bv)], exact)
        out.update(self._consume(self.t_o, [(a.o, wo, bo)], exact))
        out.update(self._consume(self.t_mlp, [(n, *O[n]) for n in a.mlp_in], exact))
        wd, bd = O[a.mlp_out]
        td = self.t_down
        if td is not None:
            # up rows / s after their (row-wise, hence scale-invariant for s > 0) fake quantization; down columns * s
            # before it. merged() checks s > 0, which makes the two orders agree.
            s = td.s.detach().double() if exact else td.s
            wu, bu = out[a.mlp_up]
            out[a.mlp_up] = (wu / s.unsqueeze(1).to(wu.dtype), None if bu is None else bu / s.to(bu.dtype))
            wd = td.weight(wd, exact)
        if not exact and self.quantize:
            spec = self._spec([a.mlp_out])
            wd = fake_quant_ste(wd, spec.bits, spec.group_size, spec.symmetric, spec.u, spec.l)
        out[a.mlp_out] = (wd, bd)
        return out

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
        if self.t_down is not None and not bool((self.t_down.s > 0).all()):
            raise ValueError(f"{self.t_down.name}: a diagonal scale is zero or negative (the up rows' quantization is "
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
                    cmax, cmin = torch.sigmoid(self.lwc_u[_key(n)]), torch.sigmoid(self.lwc_l[_key(n)])
                qparams[n] = choose_qparams(w32, cfg.wbits, cfg.group_size, cfg.symmetric, cmax, cmin)
            if self.quantize and rounded:
                mod = FakeQuantLinear.from_weight(w32, bias, *qparams[n], wbits=cfg.wbits, group_size=cfg.group_size,
                                                  abits=cfg.abits, symmetric=cfg.symmetric, dtype=dt)
            else:
                mod = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=dt)
                mod.weight.copy_((w32 if self.quantize else w).to(dt))
                if bias is not None:
                    mod.bias.copy_(bias)
            _set(new, n, mod)
        for norm_name, t in ((a.attn_norm, self.t_attn), (a.mlp_norm, self.t_mlp)):
            _set(new, norm_name, _merge_norm(new.get_submodule(norm_name), t))
        if self.quantize and cfg.abits < 16:
            set_qkv_abits(new.get_submodule(_parent(a.q)[0]), cfg.abits)
        return new, qparams


@torch.no_grad()
def _merge_norm(norm: nn.Module, t: Transform) -> nn.Module:
    """Fold (norm(x) - delta) T^-1 into the norm when T is diagonal; else fold delta into its bias and return a
    TransformedNorm carrying T^-1."""
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
        w.copy_((w.double() / s).to(w.dtype))
        if b is not None:
            b.copy_((b.double() / s).to(b.dtype))
        return norm
    inv = t.inverse64()
    if t.form == "full":
        return TransformedNorm(norm, inv.float(), "full")
    nb, blk = t.d // t.block, t.block
    blocks = inv.view(nb, blk, nb, blk).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return TransformedNorm(norm, blocks.float().contiguous(), "block")
