"""Block-wise calibration of a whole model (AffineQuant / OmniQuant modes): for each decoder layer in order, train its
transforms and clipping on MSE(fp layer(fp in), quantized layer(q in)) and merge them for good. The layer-sequential
pipeline around it (capture, propagation of both streams, streaming a CPU-resident model through a GPU, resume files)
is aq.calib.pipeline; the training step and its CUDA-graph capture are aq.calib.step.

Robustness: a non-finite loss, or a transform that stops being diagonally dominant (aq.kernels.affine.checked_inverse),
restarts the layer from its initial state with a 10x smaller learning rate, then with diagonal transforms only; if
that fails too the layer falls back to round-to-nearest. Every such event is logged and recorded in the layer's log.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from aq import checks, models
from aq.calib import pipeline
from aq.calib import step as step_mod
from aq.calib.gptq import gptq_round_layer
from aq.calib.layer import LayerCalib, active_sites
from aq.calib.loss import layer_loss, position0_share
from aq.calib.pipeline import CKPT_VERSION, propagate, take
from aq.calib.rotation import rotate_residual
from aq.calib.rtn import check_model
from aq.calib.step import autocast
from aq.config import QuantConfig
from aq.primitives import check_group_size
from aq.qmodel import FakeQuantLinear, enable_qkv_quant, set_qkv_abits, set_submodule

INIT_PROBE_SEGMENTS = 4  # segments on which the initial transforms (SmoothQuant scales vs identity) are compared


class _Unstable(Exception):
    """A layer's training diverged (non-finite loss or weights)."""


def _is_instability(e: Exception) -> bool:
    msg = str(e)
    return isinstance(e, _Unstable) or (isinstance(e, ValueError) and (
        "diagonally dominant" in msg or "singular" in msg or "is zero" in msg))


@dataclass
class LayerLog:
    index: int
    loss_init: float = math.nan  # loss of the initial transforms on the first probe_segments segments
    loss_probe: float = math.nan  # loss of the trained transforms on the same segments (compare with loss_init)
    loss: float = math.nan       # mean training loss of the last epoch
    margin: float = 1.0          # smallest dominance margin of the merged transforms
    margin_min: float = 1.0      # smallest margin seen during training
    seconds: float = 0.0
    steps: int = 0
    init: str = ""               # "smoothquant", "identity" or "smoothquant, identity down"
    probe_segments: int = 0      # segments the initial transforms were compared on
    lr_scale: float = 1.0
    form: str = ""               # norm-side form actually used ("full", "block", "diagonal") or "rtn"
    pos0_init: float = math.nan   # share of the plain squared error at position 0, initial transforms (probe segments)
    pos0_probe: float = math.nan  # the same after training
    offdiag: float = 0.0          # off-diagonal share of the norm-side transforms' mass after training (0: diagonal)
    train_seconds: float = 0.0    # of `seconds`, the time in training steps (all attempts)
    graph_captures: int = 0       # CUDA graphs captured for the training step (aq.calib.step), and their replays
    graph_replays: int = 0
    events: list = field(default_factory=list)

    def line(self, n_layers: int) -> str:
        ev = f" [{'; '.join(self.events)}]" if self.events else ""
        return (f"layer {self.index + 1}/{n_layers}: loss {self.loss:.4g}, on {self.probe_segments} probe segments "
                f"{self.loss_init:.4g} -> {self.loss_probe:.4g} (init {self.init}), "
                f"margin {self.margin:.3f} (min {self.margin_min:.3f}), {self.form}, lr x{self.lr_scale:g}, "
                f"{self.steps} steps, {self.seconds:.1f}s{ev}")


# ---------------------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------------------

def check_calibratable(model: nn.Module, cfg: QuantConfig) -> None:
    """Fail before any work on settings the model cannot take (clear messages)."""
    cfg = cfg.resolve(model)
    check_model(model, cfg)
    if cfg.mode == "rtn":
        return
    arch = models.arch_of(model)
    geo = models.geometry(model)
    if getattr(model.config, "do_layer_norm_before", True) is False:
        raise ValueError("this OPT variant applies its layer norms after attention/MLP (do_layer_norm_before=False): "
                         "norm-side transforms have no norm to sit behind; use --mode rtn")
    if arch.rope and (geo.rotary_dim or geo.head_dim) % 2:
        raise ValueError(f"rotary embeddings need an even number of rotated channels per head, got "
                         f"{geo.rotary_dim or geo.head_dim}")
    if cfg.norm_form == "block" and geo.hidden % cfg.norm_block:
        raise ValueError(f"norm block {cfg.norm_block} does not divide the hidden size {geo.hidden}")
    for n in arch.linears:
        lin = models.decoder_layers(model)[0].get_submodule(n)
        check_group_size(lin.in_features, cfg.group_size)


class _ChannelStats:
    """Per-channel max |x|, max x and min x of the inputs of some modules (forward pre-hooks)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.amax, self.cmax, self.cmin = {}, {}, {}
        self.hooks = [m.register_forward_pre_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, key):
        def hook(_m, args):
            x = args[0].detach().float().flatten(0, -2)
            mx, mn = x.amax(0), x.amin(0)
            if key in self.cmax:
                mx, mn = torch.maximum(mx, self.cmax[key]), torch.minimum(mn, self.cmin[key])
            self.cmax[key], self.cmin[key] = mx, mn
            self.amax[key] = torch.maximum(mx.abs(), mn.abs())
        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


def _init_scales(stats: _ChannelStats, layer: nn.Module, arch: models.Arch, geo: models.Geometry, alpha: float,
                 shifts: dict[str, bool]) -> tuple[dict, dict]:
    """SmoothQuant-style initial scales s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) for the watched sites (the
    activation range taken after the shift, when there is one), and shifts (max + min) / 2 where enabled; keyed by
    site name."""
    rows = arch.rows(geo, layer)
    init, shift = {}, {}
    for site in arch.sites:
        key = site.name
        if key not in stats.amax:  # a transform this run does not use
            continue
        w_amax = torch.stack([layer.get_submodule(rows[r][0]).weight.detach()[rows[r][1]:rows[r][2]].float().abs()
                              .amax(0) for r in site.consumers]).amax(0)
        cmax, cmin = stats.cmax[key], stats.cmin[key]
        if shifts.get(key):
            delta = (cmax + cmin) / 2
            a_amax = (cmax - cmin) / 2
        else:
            delta, a_amax = None, stats.amax[key]
        if site.form == "head":  # o's input channels -> per kv head channel (a group's query heads share it)
            g = geo.groups

            def per_kv(t, red):
                return red(t.view(geo.kv_heads, g, geo.head_dim), 1)

            a_amax = per_kv(a_amax, lambda t, d: t.amax(d))
            w_amax = per_kv(w_amax, lambda t, d: t.amax(d))
            delta = None if delta is None else per_kv(delta, lambda t, d: t.mean(d))
            a_amax, w_amax = a_amax.reshape(-1), w_amax.reshape(-1)
            delta = None if delta is None else delta.reshape(-1)
        s = (a_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
        init[key] = s
        if delta is not None:
            shift[key] = delta
    return init, shift


def _watched(fp_layer: nn.Module, arch: models.Arch, geo: models.Geometry, cfg: QuantConfig
             ) -> tuple[dict[str, str], dict[str, bool]]:
    """(site name -> the linear whose inputs give its statistics, site name -> whether it gets a shift) for the sites
    with an initialization (all but "qk"): a norm site shifts when its norm has a bias, a head site when its producer
    has one."""
    shifts_on = bool(cfg.shifts)  # resolved by calibrate() (QuantConfig.resolve)
    watched, shifts = {}, {}
    for site in active_sites(arch, geo, cfg):
        if site.form == "qk":
            continue
        watched[site.name] = arch.module(site.consumers[0])
        if site.form == "norm":
            shifts[site.name] = shifts_on and getattr(fp_layer.get_submodule(site.producer), "bias", None) is not None
        elif site.form == "head":
            shifts[site.name] = shifts_on and fp_layer.get_submodule(arch.module(site.producer)).bias is not None
    return watched, shifts


# ---------------------------------------------------------------------------------------------------------------------
# one layer
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def _probe_loss(calib: LayerCalib, q_buf, fp_buf, kwargs, idx: list[int], amp, cfg: QuantConfig,
                dev: torch.device) -> tuple[float, float]:
    """(the training loss over the probe segments, the share of plain squared error at position 0), in one batched
    forward (the layer kwargs broadcast over the batch): each transform is inverted once instead of once per segment."""
    calib.refresh()
    with autocast(dev, amp):
        out = calib(take(q_buf, idx, dev), **kwargs)
    target = take(fp_buf, idx, dev)
    return layer_loss(out, target, cfg.loss, cfg.sink_weight).item(), position0_share(out, target)


def _train(calib: LayerCalib, q_buf, fp_buf, kwargs, cfg: QuantConfig, epochs: int, lr_scale: float,
           gen: torch.Generator, amp, bar_desc: str, progress: bool, log: LayerLog, dev: torch.device,
           step_capture: str = step_mod.DEFAULT_STEP_CAPTURE, say=print) -> float:
    """Train the layer's transforms and clipping for `epochs` epochs (steps run by aq.calib.step.StepRunner: eager or
    CUDA-graph replays of the same step function); returns the last epoch's mean loss."""
    groups = [{"params": calib.transform_params(), "lr": cfg.lr_transform * lr_scale},
              {"params": calib.clip_params(), "lr": cfg.lr_clip * lr_scale}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        return math.nan
    t0 = time.perf_counter()
    graphs = step_mod.graphs_for(step_capture, dev)
    opt = step_mod.make_optimizer(groups, dev, capturable=graphs is not None)
    acc = step_mod.Accum(dev)
    runner = step_mod.StepRunner(calib, opt, kwargs, cfg, amp, acc, graphs, strict=step_capture == "graph", say=say)
    N, B = q_buf.shape[0], cfg.batch_size
    epoch_loss = math.nan
    bar = tqdm(range(epochs), desc=bar_desc, leave=False, disable=not progress, dynamic_ncols=True)
    try:
        for epoch in bar:
            calib.set_epoch(epoch, epochs)
            # loss and dominance margin stay on the device within an epoch: one host synchronization per epoch
            acc.reset()
            for idx in torch.randperm(N, generator=gen).split(B):
                runner(take(q_buf, idx, dev), take(fp_buf, idx, dev))
                log.steps += 1
            epoch_loss, margin = acc.total.item() / N, float(acc.margin)
            log.margin_min = min(log.margin_min, margin)
            if not math.isfinite(epoch_loss):
                raise _Unstable(f"non-finite loss in epoch {epoch + 1}")
            if not margin > 0:  # an inverse failed or a transform lost dominance (keep_dominant_ prevents it)
                raise _Unstable(f"a transform was not strictly diagonally dominant in epoch {epoch + 1} "
                                f"(relative margin {margin:.3e})")
            bar.set_postfix(loss=f"{epoch_loss:.4g}", band=calib.band)
    finally:
        log.train_seconds += time.perf_counter() - t0
        log.graph_captures += runner.captures
        log.graph_replays += runner.replays
    return epoch_loss


def _rtn_layer(fp_layer: nn.Module, arch: models.Arch, cfg: QuantConfig) -> nn.Module:
    new = copy.deepcopy(fp_layer)
    for n in arch.linears:
        lin = new.get_submodule(n)
        set_submodule(new, n, FakeQuantLinear.from_linear(lin, cfg.wbits, cfg.group_size, cfg.abits, cfg.symmetric))
    if cfg.abits < 16:
        set_qkv_abits(new.get_submodule(arch.attention), cfg.abits)
    return new


def _finite_layer(layer: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in list(layer.parameters()) + list(layer.buffers()))


def calibrate_layer(i: int, n_layers: int, fp_layer: nn.Module, fp_buf: torch.Tensor, q_buf: torch.Tensor,
                    kwargs: dict, arch: models.Arch, geo: models.Geometry, cfg: QuantConfig, *,
                    amp, batch: int, progress: bool, say,
                    step_capture: str = step_mod.DEFAULT_STEP_CAPTURE) -> tuple[nn.Module, LayerLog]:
    """Train layer i (on fp_layer's device; the streams may be kept elsewhere); on return fp_buf holds the FP layer's
    outputs (the next layer's FP inputs). Returns the merged quantized layer (q_buf is not propagated here) and its
    log."""
    t0 = time.time()
    log = LayerLog(index=i)
    dev = pipeline.device_of(fp_layer)
    watched, shifts = _watched(fp_layer, arch, geo, cfg)
    stats = _ChannelStats({k: fp_layer.get_submodule(n) for k, n in watched.items()})
    try:
        propagate(fp_layer, fp_buf, kwargs, batch)  # fp_buf: FP inputs -> FP outputs (the training targets)
    finally:
        stats.remove()
    init, shift = _init_scales(stats, fp_layer, arch, geo, cfg.smooth_alpha, shifts)

    head_affine = cfg.mode == "affinequant"
    attempts = [(cfg.norm_form, head_affine, 1.0), (cfg.norm_form, head_affine, 0.1)]
    if cfg.norm_form != "diagonal" or head_affine:
        attempts.append(("diagonal", False, 1.0))
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + i)
    probe = list(range(min(INIT_PROBE_SEGMENTS, fp_buf.shape[0])))
    log.probe_segments = len(probe)
    epochs = cfg.epochs
    qlayer = None
    for form, affine, lr_scale in attempts:
        try:
            gen.manual_seed(cfg.seed * 100_003 + i)
            build = lambda ini: LayerCalib(fp_layer, arch, geo, cfg, norm_form=form, head_affine=affine,  # noqa: E731
                                           alpha=cfg.alpha_sf, init=ini, shifts=shift, name=f"layers.{i}")
            candidates = {"smoothquant": init, "identity": None}
            if "A_down" in init:  # A_down's SmoothQuant start helps only at layers with massive down_proj inputs
                candidates["smoothquant, identity down"] = {k: v for k, v in init.items() if k != "A_down"}
            probed = {k: _probe_loss(build(v), q_buf, fp_buf, kwargs, probe, amp, cfg, dev)
                      for k, v in candidates.items()}
            finite = {k: v[0] for k, v in probed.items() if math.isfinite(v[0])}
            if not finite:
                raise _Unstable("non-finite loss at the initial transforms")
            # ties (equal losses) go to the first candidate in order, never to noise
            log.init = min(finite, key=lambda k: (finite[k], list(candidates).index(k)))
            log.loss_init, log.pos0_init = probed[log.init]
            calib = build(candidates[log.init])
            log.form, log.lr_scale, log.margin_min, log.steps = form, lr_scale, 1.0, 0
            log.loss = _train(calib, q_buf, fp_buf, kwargs, cfg, epochs, lr_scale, gen, amp,
                              f"layer {i + 1}/{n_layers}", progress, log, dev, step_capture, say)
            log.loss_probe, log.pos0_probe = _probe_loss(calib, q_buf, fp_buf, kwargs, probe, amp, cfg, dev)
            log.offdiag = calib.offdiag_share()
            if cfg.rounding == "gptq":
                qlayer, qparams = calib.merged_unrounded(fp_layer)
                gptq_round_layer(qlayer, qparams, arch, q_buf, kwargs, cfg, batch)
            else:
                qlayer = calib.merged(fp_layer)
            log.margin = calib.margin()
            if not _finite_layer(qlayer):
                raise _Unstable("non-finite merged weights")
            break
        except Exception as e:  # noqa: BLE001 -- only instabilities are retried, anything else is a bug: re-raised
            if not _is_instability(e):
                raise
            msg = f"attempt ({form}, lr x{lr_scale:g}) failed: {e}"
            log.events.append(msg)
            say(f"layer {i + 1}/{n_layers}: {msg}; restoring the layer")
            qlayer = None
    if qlayer is None:
        log.events.append("fell back to round-to-nearest")
        say(f"layer {i + 1}/{n_layers}: every attempt diverged; round-to-nearest for this layer")
        qlayer = _rtn_layer(fp_layer, arch, cfg)
        log.form = "rtn"
    if dev.type == "cuda":
        torch.cuda.synchronize()
    log.seconds = time.time() - t0
    return qlayer, log


# ---------------------------------------------------------------------------------------------------------------------
# whole model
# ---------------------------------------------------------------------------------------------------------------------

def run_config(cfg: QuantConfig, model_name: str, n_layers: int, alpha: float, amp) -> dict:
    return {"version": CKPT_VERSION, "model": model_name, "config": cfg.to_dict(), "layers": n_layers,
            "alpha_sf": alpha, "amp": None if amp is None else str(amp).replace("torch.", "")}


def calibrate(model: nn.Module, segments: torch.Tensor, cfg: QuantConfig, *, ckpt_dir: Path | None = None,
              resume: bool = False, model_name: str = "", amp: torch.dtype | None = None, batch: int = 8,
              progress: bool = True, say=print, device: torch.device | str | None = None, stream: bool | None = None,
              buffers: str = "auto", step_capture: str = step_mod.DEFAULT_STEP_CAPTURE,
              max_layers: int | None = None) -> dict:
    """Calibrate `model` in place (its decoder layers are replaced by calibrated ones) on token segments [N, T].

    device: where the work runs (default: the model's device); a model kept on the CPU with device "cuda" is streamed
    one layer at a time (aq.calib.pipeline; stream=True forces the moves). buffers: where the activation streams live
    ("auto", "device", "cpu": pipeline.plan_buffers). step_capture: "auto" (a CUDA graph per mask structure on CUDA,
    eager elsewhere), "off", "graph" (required; fails on a CPU). max_layers: calibrate only the first layers (the rest
    stay FP; for benchmarks).

    Returns {"layers": [LayerLog as dict], "alpha_sf", "resumed_layers", "seconds"}."""
    if cfg.mode == "rtn":
        raise ValueError("calibrate() trains omniquant/affinequant; rtn is aq.calib.rtn.quantize_rtn")
    if step_capture not in step_mod.STEP_CAPTURES:
        raise ValueError(f"step_capture must be one of {', '.join(step_mod.STEP_CAPTURES)}, got {step_capture!r}")
    if buffers not in pipeline.BUFFERS:
        raise ValueError(f"buffers must be one of {', '.join(pipeline.BUFFERS)}, got {buffers!r}")
    dev = pipeline.resolve_device(device) if device is not None else pipeline.device_of(model)
    if step_capture == "graph" and dev.type != "cuda":
        raise ValueError(f"step_capture 'graph' needs a CUDA device, calibration runs on {dev}")
    cfg = cfg.resolve(model)
    check_calibratable(model, cfg)
    checks.check_seqlen(model.config, segments.shape[1], "calibration segment length")
    arch, geo = models.arch_of(model), models.geometry(model)
    L = len(models.decoder_layers(model))
    alpha = cfg.alpha_sf
    if cfg.mode == "omniquant":
        alpha = 0.0  # diagonal transforms only: nothing off the diagonal to scale
    meta = run_config(cfg, model_name, L, alpha, amp)
    if ckpt_dir is not None:
        ckpt_dir = Path(ckpt_dir)
        pipeline.open_ckpt_dir(ckpt_dir, meta, resume)
    if cfg.abits < 16:
        enable_qkv_quant(model)
    if cfg.rotate != "none":  # deterministic from the seed, so a resumed run rotates the same way
        rotate_residual(model, cfg.rotate, cfg.seed)

    t0 = time.time()
    intro = (f"calibrating {L} layers: {cfg.mode} {cfg.label}, {segments.shape[0]} x {segments.shape[1]} tokens, "
             f"{cfg.epochs} epochs, alpha_sf {alpha:g}, norm transform {cfg.norm_form}, loss {cfg.loss}"
             + (f" (sink weight {cfg.sink_weight:g})" if cfg.loss == "token" and cfg.sink_weight != 1 else "")
             + (f", {cfg.rotate} rotation" if cfg.rotate != "none" else "")
             + (f" (block {cfg.norm_block})" if cfg.norm_form == "block" else "")
             + (f", {str(amp).replace('torch.', '')} autocast" if amp is not None else "")
             + (", CUDA-graph steps" if step_mod.graphs_for(step_capture, dev) is not None else ""))

    def one(i, fp_layer, fp_buf, q_buf, kwargs):
        qlayer, ll = calibrate_layer(i, L, fp_layer, fp_buf, q_buf, kwargs, arch, geo, cfg, amp=amp, batch=batch,
                                     progress=progress, say=say, step_capture=step_capture)
        return qlayer, asdict(ll), ll.line(L)

    logs, start = pipeline.run_layers(model, segments, one, batch=batch, device=dev, stream=stream, buffers=buffers,
                                      step_tokens=cfg.batch_size * segments.shape[1], ckpt_dir=ckpt_dir,
                                      resume=resume, max_layers=max_layers, progress=progress, intro=intro, say=say)
    return {"layers": logs, "alpha_sf": alpha, "resumed_layers": start, "seconds": time.time() - t0}
