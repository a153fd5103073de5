"""Block-wise calibration of a whole model (AffineQuant / OmniQuant modes): capture the inputs of the first decoder
layer, then for each layer in order train its transforms and clipping on MSE(fp layer(fp in), quantized layer(q in)),
merge them for good, propagate both streams, and checkpoint.

Checkpoints (`ckpt_dir`): run.json (the configuration and what was resolved from it) and one layer_NNN.pt per finished
layer ({"spec", "state", "log"}: the aq.qmodel.QModelSpec that rebuilds the quantized layer from the FP one, its
state_dict, its log line).
Resuming loads the finished layers and recomputes both streams through them, which repeats the uninterrupted run's
computation exactly, so a resumed run ends with the same result.

Robustness: a non-finite loss, or a transform that stops being diagonally dominant (aq.kernels.affine.checked_inverse),
restarts the layer from its initial state with a 10x smaller learning rate, then with diagonal transforms only; if
that fails too the layer falls back to round-to-nearest. Every such event is logged and recorded in the layer's log.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from aq import checks, models
from aq.calib.gptq import gptq_round_layer
from aq.calib.layer import LayerCalib, _set, active_sites
from aq.calib.loss import layer_loss, position0_share
from aq.calib.rotation import rotate_residual
from aq.calib.rtn import check_model
from aq.config import QuantConfig
from aq.primitives import check_group_size
from aq.qmodel import FakeQuantLinear, QModelSpec, enable_qkv_quant, set_qkv_abits

CKPT_VERSION = 2  # 2: layer files hold integer codes and an aq.qmodel.QModelSpec; 1 is refused (other settings)
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


# ---------------------------------------------------------------------------------------------------------------------
# capture and propagation
# ---------------------------------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture(model: nn.Module, segments: torch.Tensor, batch: int) -> tuple[torch.Tensor, list[dict]]:
    """(inputs of the first decoder layer for every segment [N, T, d] float32, keyword arguments of every layer's call
    (position embeddings, masks) recorded from a batch-1 forward; they broadcast over any batch)."""
    layers = models.decoder_layers(model)
    dev = next(model.parameters()).device
    layer_kwargs: list[dict] = [{} for _ in layers]

    def record(i):
        def hook(_m, args, kwargs):
            layer_kwargs[i] = {k: v for k, v in kwargs.items()
                               if k not in ("hidden_states", "past_key_values", "use_cache", "past_key_value")}
        return hook

    hs = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(segments[:1].to(dev), use_cache=False)
    finally:
        for h in hs:
            h.remove()

    N, T = segments.shape
    inps = torch.empty((N, T, model.config.hidden_size), dtype=torch.float32, device=dev)
    pos = [0]

    def stop(_m, args, kwargs):
        x = _hidden_arg(args, kwargs)
        inps[pos[0]:pos[0] + x.shape[0]] = x.float()
        raise _Stop

    h = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for s in range(0, N, batch):
            pos[0] = s
            try:
                model(segments[s:s + batch].to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return inps, layer_kwargs


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def propagate(layer: nn.Module, buf: torch.Tensor, kwargs: dict, batch: int) -> None:
    """buf <- layer(buf) in place, `batch` segments at a time, in the layer's own precision."""
    dt = next(layer.parameters()).dtype
    for s in range(0, buf.shape[0], batch):
        buf[s:s + batch] = _out(layer(buf[s:s + batch].to(dt), **kwargs)).float()


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
# checkpoints
# ---------------------------------------------------------------------------------------------------------------------

PAUSE_ENV = "AQ_TEST_PAUSE_WRITE"


def _test_pause(stage: str, path: Path, tmp: Path) -> None:
    """Test hook for tests/test_resume.py, which SIGKILLs a run at a known point of a checkpoint write: with
    AQ_TEST_PAUSE_WRITE=<stage>:<file name>, the write of that file stops at `stage` (mid: the temporary file cut to
    half its bytes, as a kill during the write leaves it; after: the file renamed into place), drops a
    <file>.paused marker and sleeps until killed. Unset (always, outside that test) it does nothing."""
    if os.environ.get(PAUSE_ENV) != f"{stage}:{path.name}":
        return
    if stage == "mid":
        with open(tmp, "r+b") as f:
            f.truncate(tmp.stat().st_size // 2)
    path.with_name(path.name + ".paused").touch()
    while True:
        time.sleep(1)


def _atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename: a kill leaves either the old state or the whole new file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    _test_pause("mid", path, tmp)
    os.replace(tmp, path)
    _test_pause("after", path, tmp)


def _atomic_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# one layer
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def _probe_loss(calib: LayerCalib, q_buf, fp_buf, kwargs, idx: list[int], amp, cfg: QuantConfig) -> tuple[float, float]:
    """(the training loss over the probe segments, the share of plain squared error at position 0), in one batched
    forward (the layer kwargs broadcast over the batch): each transform is inverted once instead of once per segment."""
    calib.refresh()
    with _autocast(q_buf, amp):
        out = calib(q_buf[idx], **kwargs)
    target = fp_buf[idx]
    return layer_loss(out, target, cfg.loss, cfg.sink_weight).item(), position0_share(out, target)


def _autocast(t: torch.Tensor, amp: torch.dtype | None):
    return torch.autocast(t.device.type, dtype=amp or torch.float32, enabled=amp is not None)


def _train(calib: LayerCalib, q_buf, fp_buf, kwargs, cfg: QuantConfig, epochs: int, lr_scale: float,
           gen: torch.Generator, amp, bar_desc: str, progress: bool, log: LayerLog) -> float:
    groups = [{"params": calib.transform_params(), "lr": cfg.lr_transform * lr_scale},
              {"params": calib.clip_params(), "lr": cfg.lr_clip * lr_scale}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        return math.nan
    dev = q_buf.device
    opt = torch.optim.AdamW(groups, weight_decay=0.0, **({"fused": True} if dev.type == "cuda" else {}))
    N, B = q_buf.shape[0], cfg.batch_size
    epoch_loss = math.nan
    bar = tqdm(range(epochs), desc=bar_desc, leave=False, disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        calib.set_epoch(epoch, epochs)
        # loss and dominance margin stay on the device within an epoch: one host synchronization per epoch
        total = torch.zeros((), device=dev)
        margin_min = torch.ones((), dtype=torch.float64, device=dev)
        for idx in torch.randperm(N, generator=gen).to(dev).split(B):
            calib.refresh()
            with _autocast(q_buf, amp):
                out = calib(q_buf[idx], **kwargs)
            loss = layer_loss(out, fp_buf[idx], cfg.loss, cfg.sink_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            calib.keep_dominant_()
            total += loss.detach() * idx.numel()
            margin_min = torch.minimum(margin_min, calib.margin_tensor())
            log.steps += 1
        epoch_loss, margin = total.item() / N, float(margin_min)
        log.margin_min = min(log.margin_min, margin)
        if not math.isfinite(epoch_loss):
            raise _Unstable(f"non-finite loss in epoch {epoch + 1}")
        if not margin > 0:  # an inverse failed or a transform lost dominance in this epoch (keep_dominant_ prevents it)
            raise _Unstable(f"a transform was not strictly diagonally dominant in epoch {epoch + 1} "
                            f"(relative margin {margin:.3e})")
        bar.set_postfix(loss=f"{epoch_loss:.4g}", band=calib.band)
    return epoch_loss


def _rtn_layer(fp_layer: nn.Module, arch: models.Arch, cfg: QuantConfig) -> nn.Module:
    new = copy.deepcopy(fp_layer)
    for n in arch.linears:
        lin = new.get_submodule(n)
        _set(new, n, FakeQuantLinear.from_linear(lin, cfg.wbits, cfg.group_size, cfg.abits, cfg.symmetric))
    if cfg.abits < 16:
        set_qkv_abits(new.get_submodule(arch.attention), cfg.abits)
    return new


def _finite_layer(layer: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in list(layer.parameters()) + list(layer.buffers()))


def calibrate_layer(i: int, n_layers: int, fp_layer: nn.Module, fp_buf: torch.Tensor, q_buf: torch.Tensor,
                    kwargs: dict, arch: models.Arch, geo: models.Geometry, cfg: QuantConfig, *,
                    amp, batch: int, progress: bool, say) -> tuple[nn.Module, LayerLog]:
    """Train layer i; on return fp_buf holds the FP layer's outputs (the next layer's FP inputs). Returns the merged
    quantized layer (q_buf is not propagated here) and its log."""
    t0 = time.time()
    log = LayerLog(index=i)
    dev = fp_buf.device
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
            probed = {k: _probe_loss(build(v), q_buf, fp_buf, kwargs, probe, amp, cfg) for k, v in candidates.items()}
            finite = {k: v[0] for k, v in probed.items() if math.isfinite(v[0])}
            if not finite:
                raise _Unstable("non-finite loss at the initial transforms")
            # ties (equal losses) go to the first candidate in order, never to noise
            log.init = min(finite, key=lambda k: (finite[k], list(candidates).index(k)))
            log.loss_init, log.pos0_init = probed[log.init]
            calib = build(candidates[log.init])
            log.form, log.lr_scale, log.margin_min, log.steps = form, lr_scale, 1.0, 0
            log.loss = _train(calib, q_buf, fp_buf, kwargs, cfg, epochs, lr_scale, gen, amp,
                              f"layer {i + 1}/{n_layers}", progress, log)
            log.loss_probe, log.pos0_probe = _probe_loss(calib, q_buf, fp_buf, kwargs, probe, amp, cfg)
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
              progress: bool = True, say=print) -> dict:
    """Calibrate `model` in place (its decoder layers are replaced by calibrated ones) on token segments [N, T].

    Returns {"layers": [LayerLog as dict], "alpha_sf", "resumed_layers", "seconds"}."""
    if cfg.mode == "rtn":
        raise ValueError("calibrate() trains omniquant/affinequant; rtn is aq.calib.rtn.quantize_rtn")
    cfg = cfg.resolve(model)
    check_calibratable(model, cfg)
    checks.check_seqlen(model.config, segments.shape[1], "calibration segment length")
    arch, geo = models.arch_of(model), models.geometry(model)
    layers = models.decoder_layers(model)
    L = len(layers)
    alpha = cfg.alpha_sf  # resolved (0 for omniquant: nothing off the diagonal to scale)
    meta = run_config(cfg, model_name, L, alpha, amp)
    logs: list[dict] = []
    start = 0
    if ckpt_dir is not None:
        ckpt_dir = Path(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        run_json = ckpt_dir / "run.json"
        if resume and run_json.is_file():
            saved = json.loads(run_json.read_text())
            if saved != meta:
                diff = {k: (saved.get(k), meta[k]) for k in meta if saved.get(k) != meta[k]}
                raise ValueError(f"cannot resume from {ckpt_dir}: it was made with other settings {diff}")
        elif not resume and any(ckpt_dir.glob("layer_*.pt")):
            raise ValueError(f"{ckpt_dir} already holds layer checkpoints: pass --resume to continue that run, "
                             "or choose another --out")
        _atomic_json(meta, run_json)
    if cfg.abits < 16:
        enable_qkv_quant(model)
    if cfg.rotate != "none":  # deterministic from the seed, so a resumed run rotates the same way
        rotate_residual(model, cfg.rotate, cfg.seed)

    t0 = time.time()
    inps, layer_kwargs = capture(model, segments, batch)
    fp_buf, q_buf = inps, inps.clone()
    say(f"calibrating {L} layers: {cfg.mode} {cfg.label}, {segments.shape[0]} x {segments.shape[1]} tokens, "
        f"{cfg.epochs} epochs, alpha_sf {alpha:g}, norm transform {cfg.norm_form}, loss {cfg.loss}"
        + (f" (sink weight {cfg.sink_weight:g})" if cfg.loss == "token" and cfg.sink_weight != 1 else "")
        + (f", {cfg.rotate} rotation" if cfg.rotate != "none" else "")
        + (f" (block {cfg.norm_block})" if cfg.norm_form == "block" else "")
        + (f", {str(amp).replace('torch.', '')} autocast" if amp is not None else ""))

    for i in range(L):
        fp_layer = layers[i]
        path = None if ckpt_dir is None else ckpt_dir / f"layer_{i:03d}.pt"
        if resume and path is not None and path.is_file() and start == i:
            saved = torch.load(path, map_location=fp_buf.device, weights_only=False)
            qlayer = QModelSpec.from_json(saved["spec"]).rebuild(fp_layer, saved["state"])
            propagate(fp_layer, fp_buf, layer_kwargs[i], batch)
            log = saved["log"]
            start = i + 1
            say(f"layer {i + 1}/{L}: resumed from {path.name}")
        else:
            qlayer, ll = calibrate_layer(i, L, fp_layer, fp_buf, q_buf, layer_kwargs[i], arch, geo, cfg,
                                         amp=amp, batch=batch, progress=progress, say=say)
            log = asdict(ll)
            say(ll.line(L))
            if path is not None:
                _atomic_save({"spec": QModelSpec.of(qlayer).to_json(), "state": qlayer.state_dict(), "log": log}, path)
        layers[i] = qlayer
        propagate(qlayer, q_buf, layer_kwargs[i], batch)
        logs.append(log)
    return {"layers": logs, "alpha_sf": alpha, "resumed_layers": start, "seconds": time.time() - t0}


def load_calibrated(model: nn.Module, ckpt_dir: Path) -> nn.Module:
    """Replace the decoder layers of an FP model by the calibrated ones saved in ckpt_dir (all layers must be there)."""
    ckpt_dir = Path(ckpt_dir)
    layers = models.decoder_layers(model)
    meta = json.loads((ckpt_dir / "run.json").read_text())
    dev = next(model.parameters()).device
    for i in range(len(layers)):
        path = ckpt_dir / f"layer_{i:03d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the calibration in {ckpt_dir} did not finish")
        saved = torch.load(path, map_location=dev, weights_only=False)
        layers[i] = QModelSpec.from_json(saved["spec"]).rebuild(layers[i], saved["state"])
    if meta["config"]["abits"] < 16:
        enable_qkv_quant(model)
    return model

