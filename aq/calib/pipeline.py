"""Layer-sequential calibration pipeline, apart from what is trained per layer (aq.calib.loop): capture the inputs of
the first decoder layer, hand each layer with its FP and quantized-stream inputs to a per-layer function, propagate the
quantized stream through the layer it returns, write the per-layer resume files.

Streaming: the model may stay on the CPU while the work runs on `device` (a GPU). Only the layer being calibrated is
moved there for its turn and back afterwards; the first layer's inputs are captured with the decoder layers replaced
by placeholders, so only the embeddings (and the modules outside the decoder layers) visit the device, once. The two
activation streams ([N, T, d] float32 each) stay on the device when a memory estimate says they fit, else in pinned
CPU memory (the same values: only where they are kept changes, see plan_buffers).

Resume files (`ckpt_dir`): run.json (the configuration and what was resolved from it) and one layer_NNN.pt per finished
layer ({"spec", "state", "log"}: the aq.qmodel.QModelSpec that rebuilds the quantized layer from the FP one, its
state_dict, its log line).
Resuming loads the finished layers and recomputes both streams through them, which repeats the uninterrupted run's
computation exactly, so a resumed run ends with the same result.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from aq import models
from aq.qmodel import QModelSpec, enable_qkv_quant

CKPT_VERSION = 2  # 2: layer files hold integer codes and an aq.qmodel.QModelSpec; 1 is refused (other settings)
BUFFERS = ("auto", "device", "cpu")  # where the two activation streams are kept (plan_buffers)
GPU_HEADROOM = 0.85  # share of the free device memory the estimate may plan for


# ---------------------------------------------------------------------------------------------------------------------
# moving modules
# ---------------------------------------------------------------------------------------------------------------------

def move(module: nn.Module, device: torch.device) -> nn.Module:
    """module.to(device) in place: the one place the pipeline moves a layer (tests wrap it to count the moves)."""
    return module.to(device)


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def resolve_device(device: torch.device | str) -> torch.device:
    """torch.device with a CUDA index filled in ("cuda" -> "cuda:<current>"), so that it compares equal to the device
    of the tensors placed there."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class _Placeholder(nn.Module):
    """Stands in for decoder layer i during capture: records the call's keyword arguments, and either passes the
    hidden states through or stops the forward (raising _Stop) after handing them to `sink`."""

    def __init__(self, i: int, kwargs_out: list[dict], sink: Callable | None, stop: bool):
        super().__init__()
        self.i, self.kwargs_out, self.sink, self.stop = i, kwargs_out, sink, stop

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.kwargs_out[self.i] = {k: v for k, v in kwargs.items()
                                   if k not in ("hidden_states", "past_key_values", "use_cache", "past_key_value")}
        if self.sink is not None:
            self.sink(x)
        if self.stop:
            raise _Stop
        return x


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _layers_replaced(model: nn.Module, make: Callable[[int], nn.Module], device: torch.device):
    """The decoder layers replaced by make(i) and the rest of the model on `device`, for the duration; then the layers
    restored and the rest moved back to where it was. The layers themselves never move."""
    layers = models.decoder_layers(model)
    saved = list(layers)
    home = device_of(model)
    try:
        for i in range(len(layers)):
            layers[i] = make(i)
        if home != device:
            move(model, device)  # no layer parameters left in it: only the embeddings, norms, head move
        yield
    finally:
        if home != device:
            move(model, home)
        for i, layer in enumerate(saved):
            layers[i] = layer


# ---------------------------------------------------------------------------------------------------------------------
# capture and propagation
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def capture(model: nn.Module, segments: torch.Tensor, batch: int, device: torch.device | None = None,
            out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict]]:
    """(inputs of the first decoder layer for every segment [N, T, d] float32, keyword arguments of every layer's call
    (position embeddings, masks) recorded from a batch-1 forward; they broadcast over any batch).

    device: where the embeddings run (default: the model's device); the kwargs' tensors live there. out: the
    [N, T, d] float32 tensor to fill (on any device; default a new one on `device`)."""
    device = resolve_device(device) if device is not None else device_of(model)
    L = len(models.decoder_layers(model))
    layer_kwargs: list[dict] = [{} for _ in range(L)]
    # the kwargs of every layer: placeholders pass the embeddings through, the last one stops before the head
    with _layers_replaced(model, lambda i: _Placeholder(i, layer_kwargs, None, i == L - 1), device):
        try:
            model(segments[:1].to(device), use_cache=False)
        except _Stop:
            pass

    N, T = segments.shape
    inps = out if out is not None else torch.empty((N, T, model.config.hidden_size), dtype=torch.float32,
                                                   device=device)
    pos = [0]

    def sink(x):
        inps[pos[0]:pos[0] + x.shape[0]] = x.float().to(inps.device)

    scratch: list[dict] = [{} for _ in range(L)]
    with _layers_replaced(model, lambda i: _Placeholder(i, scratch, sink if i == 0 else None, True), device):
        for s in range(0, N, batch):
            pos[0] = s
            try:
                model(segments[s:s + batch].to(device), use_cache=False)
            except _Stop:
                pass
    return inps, layer_kwargs


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def propagate(layer: nn.Module, buf: torch.Tensor, kwargs: dict, batch: int) -> None:
    """buf <- layer(buf) in place, `batch` segments at a time, in the layer's own precision and on its device (buf may
    be kept elsewhere, e.g. in pinned CPU memory)."""
    p = next(layer.parameters())
    for s in range(0, buf.shape[0], batch):
        y = _out(layer(buf[s:s + batch].to(p.device, p.dtype, non_blocking=True), **kwargs)).float()
        buf[s:s + batch].copy_(y, non_blocking=buf.device.type != y.device.type)
    if buf.device.type != p.device.type and p.device.type == "cuda":
        torch.cuda.current_stream(p.device).synchronize()  # pinned destinations: the copies are complete


def take(buf: torch.Tensor, idx: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    """Rows idx of an activation stream, on `device` (the stream may be kept elsewhere)."""
    if isinstance(idx, torch.Tensor):
        idx = idx.to(buf.device)
    return buf[idx].to(device, non_blocking=True)


def _layer_bytes(layer: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def training_bytes(layer: nn.Module, tokens: int, hidden: int) -> int:
    """A generous estimate of the device memory one layer's calibration needs besides the streams: the layer, float32
    copies of its weights (originals, transformed, gradients, optimizer moments: ~6 each) and the activations of a
    step of `tokens` tokens (~40 hidden-sized float32 rows per token, attention and MLP intermediates included)."""
    n = sum(p.numel() for p in layer.parameters())
    inter = max((m.out_features for m in layer.modules() if isinstance(m, nn.Linear)), default=hidden)
    return _layer_bytes(layer) + 6 * 4 * n + tokens * (40 * hidden + 8 * inter) * 4


def plan_buffers(choice: str, shape: tuple[int, int, int], layer: nn.Module, device: torch.device,
                 step_tokens: int) -> str:
    """Where the two activation streams go: "device" (float32 on the device) or "cpu" (float32, pinned when the
    device is a GPU). "auto": the device when both streams plus training_bytes fit in GPU_HEADROOM of its free
    memory, else the CPU; on a CPU device always "device"."""
    if choice not in BUFFERS:
        raise ValueError(f"buffers must be one of {', '.join(BUFFERS)}, got {choice!r}")
    if device.type != "cuda" or choice != "auto":
        return "device" if choice == "auto" else choice
    free, _ = torch.cuda.mem_get_info(device)
    need = 2 * 4 * shape[0] * shape[1] * shape[2] + training_bytes(layer, step_tokens, shape[2])
    return "device" if need <= GPU_HEADROOM * free else "cpu"


def alloc_stream(shape: tuple[int, int, int], where: str, device: torch.device) -> torch.Tensor:
    if where == "device":
        return torch.empty(shape, dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, pin_memory=device.type == "cuda")


# ---------------------------------------------------------------------------------------------------------------------
# resume files
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


def open_ckpt_dir(ckpt_dir: Path, meta: dict, resume: bool) -> None:
    """Create ckpt_dir and write run.json; a resumed run must match the saved settings, a fresh one must not overwrite
    finished layers."""
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


def load_calibrated(model: nn.Module, ckpt_dir: Path) -> nn.Module:
    """Replace the decoder layers of an FP model by the calibrated ones saved in ckpt_dir (all layers must be there)."""
    ckpt_dir = Path(ckpt_dir)
    layers = models.decoder_layers(model)
    meta = json.loads((ckpt_dir / "run.json").read_text())
    dev = device_of(model)
    for i in range(len(layers)):
        path = ckpt_dir / f"layer_{i:03d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the calibration in {ckpt_dir} did not finish")
        saved = torch.load(path, map_location=dev, weights_only=False)
        layers[i] = QModelSpec.from_json(saved["spec"]).rebuild(layers[i], saved["state"])
    if meta["config"]["abits"] < 16:
        enable_qkv_quant(model)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# the layer loop
# ---------------------------------------------------------------------------------------------------------------------

def _hms(s: float) -> str:
    s = round(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """The outer bar over layers (tqdm's ETA counts resumed layers as instant, so the estimate here uses calibrated
    layers only) and the per-layer log suffix: this layer's time, the mean so far, the estimated time left."""

    def __init__(self, n_layers: int, progress: bool):
        self.n, self.times = n_layers, []
        self.bar = tqdm(total=n_layers, desc="layers", unit="layer", disable=not progress, dynamic_ncols=True)

    def eta(self, done: int) -> float | None:
        return sum(self.times) / len(self.times) * (self.n - done) if self.times else None

    def step(self, done: int, seconds: float | None) -> str:
        """Layer `done` (1-based count) finished after `seconds` (None: resumed); returns the log suffix."""
        if seconds is not None:
            self.times.append(seconds)
        eta = self.eta(done)
        self.bar.update(1)
        if eta is not None:
            self.bar.set_postfix_str(f"{self.times[-1]:.1f}s/layer, {_hms(eta)} left")
        if seconds is None or eta is None:
            return ""
        return f" (mean {sum(self.times) / len(self.times):.1f}s/layer, ~{_hms(eta)} left)"

    def close(self):
        self.bar.close()


def run_layers(model: nn.Module, segments: torch.Tensor, calibrate_one: Callable, *, batch: int,
               device: torch.device | None = None, stream: bool | None = None, buffers: str = "auto",
               step_tokens: int = 2048,
               ckpt_dir: Path | None = None, resume: bool = False, max_layers: int | None = None,
               progress: bool = True, intro: str = "", say=print) -> tuple[list[dict], int]:
    """Run the layer loop on `model` in place (its decoder layers replaced by calibrated ones); returns (the per-layer
    logs, how many layers were resumed from files).

    calibrate_one(i, fp_layer, fp_buf, q_buf, kwargs) -> (quantized layer, log dict, log line) trains layer i (fp_layer
    on the compute device) and leaves fp_buf holding the FP layer's outputs. device: where the work runs (default the
    model's device); a model kept elsewhere (the CPU) is streamed layer by layer (stream=None; True forces the
    moves even where they are no-ops, for tests). buffers: see plan_buffers;
    step_tokens: tokens of one training step (for its memory estimate). max_layers: stop after that many layers (the
    rest stay FP; for benchmarks)."""
    layers = models.decoder_layers(model)
    L = len(layers)
    home = device_of(model)
    dev = resolve_device(device) if device is not None else home
    stream = home != dev if stream is None else stream
    N, T = segments.shape
    shape = (N, T, model.config.hidden_size)
    where = plan_buffers(buffers, shape, layers[0], dev, step_tokens)
    fp_buf, layer_kwargs = capture(model, segments, batch, dev, out=alloc_stream(shape, where, dev))
    q_buf = alloc_stream(shape, where, dev)
    q_buf.copy_(fp_buf)
    if intro:
        say(intro + (f"; streaming layers {home.type} -> {dev.type}" if stream else "")
            + (", activations in pinned CPU memory" if where == "cpu" and dev.type != "cpu" else ""))
    n_run = L if max_layers is None else min(L, max_layers)
    logs: list[dict] = []
    start = 0
    bar = Progress(n_run, progress)
    try:
        for i in range(n_run):
            fp_layer = layers[i]
            if stream:
                move(fp_layer, dev)
            path = None if ckpt_dir is None else ckpt_dir / f"layer_{i:03d}.pt"
            if resume and path is not None and path.is_file() and start == i:
                saved = torch.load(path, map_location=dev if dev.type != "cpu" else "cpu", weights_only=False)
                qlayer = QModelSpec.from_json(saved["spec"]).rebuild(fp_layer, saved["state"])
                propagate(fp_layer, fp_buf, layer_kwargs[i], batch)
                log = saved["log"]
                start = i + 1
                bar.step(i + 1, None)
                say(f"layer {i + 1}/{L}: resumed from {path.name}")
            else:
                qlayer, log, line = calibrate_one(i, fp_layer, fp_buf, q_buf, layer_kwargs[i])
                say(line + bar.step(i + 1, log.get("seconds")))
                if path is not None:
                    _atomic_save({"spec": QModelSpec.of(qlayer).to_json(), "state": qlayer.state_dict(), "log": log},
                                 path)
            propagate(qlayer, q_buf, layer_kwargs[i], batch)
            if stream:
                move(qlayer, home)
                move(fp_layer, home)
            layers[i] = qlayer
            logs.append(log)
    finally:
        bar.close()
    return logs, start


def _move_rest(model: nn.Module, device: torch.device) -> None:
    """Move the modules outside the decoder layers to `device`; the layers stay where they are."""
    layers = models.decoder_layers(model)
    saved = list(layers)
    try:
        for i in range(len(layers)):
            layers[i] = nn.Identity()
        move(model, device)
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


@contextlib.contextmanager
def streamed(model: nn.Module, device: torch.device):
    """Run forward passes of a model kept on the CPU on `device`: the modules outside the decoder layers move there for
    the duration, each decoder layer only during its own forward (moved in by a pre-hook, back by a hook). For
    evaluating a model larger than the device; a no-op when the model is already there."""
    device = resolve_device(device)
    home = device_of(model)
    if home == device:
        yield model
        return

    def arrive(m, args):
        move(m, device)

    def leave(m, args, out):
        move(m, home)

    hooks = []
    for layer in models.decoder_layers(model):
        hooks += [layer.register_forward_pre_hook(arrive), layer.register_forward_hook(leave)]
    _move_rest(model, device)
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
        _move_rest(model, home)
