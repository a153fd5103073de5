"""One calibration training step and how it runs: eagerly, or captured in a CUDA graph and replayed.

The step (train_step): set the layer's transformed, fake-quantized weights (LayerCalib.refresh), forward under
autocast, the block-wise loss, backward, AdamW, the dominance projection, and the epoch's running loss sum and margin
minimum, kept as device tensors updated in place. At SmolLM2 size the step is bound by its ~500 kernel launches, not by
their arithmetic (bench/NOTES-calib.md); a CUDA graph replays them without the host in the way.

What the graph may not see changing: the tensors it reads and writes must keep their addresses (the inputs are copied
into static tensors before each replay; parameters, optimizer state and the accumulators persist), and the Python-level
choices made while tracing must stay the same. The only such choice that changes during training is the gradual mask's
band (once an epoch: it selects kernels, masks and loop bounds), so a graph is captured per mask structure
(structure_key), after eager steps with that structure (GRAPH_WARMUP before the first capture: Triton autotuning,
cuBLAS handles; RECAPTURE_WARMUP later: the new band's masks are built and cached there),
and replayed for every other step of that structure; a short last batch runs eagerly. A structure that already ran
eagerly in this process (the same band at an earlier layer: its kernels are compiled and tuned, its masks cached) is
captured without the eager step: at 40 epochs that step is ~30 ms of host time per epoch and layer. If such a capture
fails, the warm-up comes back for the rest of the process. Every step, eager, warm-up or
replayed, is a real training step: the captured run is the eager run's computation.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from aq.calib.loss import layer_loss
from aq.calib.transforms import RopeTransform, Transform
from aq.kernels import affine as AF

STEP_CAPTURES = ("auto", "off", "graph")  # auto: a CUDA graph on CUDA devices, eager elsewhere
# Captured steps give bitwise the eager result (bench/calib_step.py --check on the H200, NOTES-calib-speed.md)
DEFAULT_STEP_CAPTURE = "auto"
GRAPH_WARMUP = 2  # eager steps before the first capture (later structures: RECAPTURE_WARMUP)
RECAPTURE_WARMUP = 1  # a new band needs one eager step (its masks are built and cached there)
_capture_failed: str | None = None  # set by the first failed capture: "auto" stays eager for the rest of the process
_warm_structures: set = set()  # (structure key, input shape, device) that ran an eager step in this process
_cold_capture_failed: str | None = None  # set when a capture without its warm-up failed: warm-ups always from then on


def autocast(device: torch.device, amp: torch.dtype | None):
    """The forward's autocast (off when amp is None). No cast cache: a captured graph must not keep casts made while
    it was traced (torch.cuda.graphs' rule); the cast weights here are recomputed every step anyway."""
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None, cache_enabled=False)


class Accum:
    """The epoch's running loss sum (times segments) and smallest dominance margin, as device tensors updated in
    place (their addresses persist across replays)."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.margin = torch.ones((), dtype=torch.float64, device=device)

    def reset(self) -> None:
        self.total.zero_()
        self.margin.fill_(1.0)


def attention_backends(device: torch.device):
    """The attention kernels the training step may use: all, unless torch's deterministic mode is on
    (torch.use_deterministic_algorithms; aq.calibrate --deterministic) on a CUDA device, then SDPA's math backend only:
    the fused attention backwards add the query gradient up with atomics, so two same-seed runs differ from the
    first layer on (seen on the H200). The math backend is plain products and a softmax, repeatable bit for bit."""
    if device.type != "cuda" or not torch.are_deterministic_algorithms_enabled():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def train_step(calib, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor, kwargs: dict, cfg,
               amp: torch.dtype | None, acc: Accum) -> None:
    """One optimizer step of layer calibration on the batch x -> target ([B, T, d] on the layer's device)."""
    calib.refresh()
    with autocast(x.device, amp), attention_backends(x.device):
        out = calib(x, **kwargs)
    loss = layer_loss(out, target, cfg.loss, cfg.sink_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    calib.keep_dominant_()
    acc.total.add_(loss.detach() * x.shape[0])
    torch.minimum(acc.margin, calib.margin_tensor(), out=acc.margin)


def make_optimizer(groups: list[dict], device: torch.device, capturable: bool) -> torch.optim.Optimizer:
    """AdamW without weight decay; fused on CUDA; capturable (step counts on the device) for a captured CUDA step
    (torch offers it on accelerators only; the CPU tests' stand-in graphs need none)."""
    kw = {"fused": True} if device.type == "cuda" else {}
    if capturable and device.type == "cuda":
        kw["capturable"] = True
    return torch.optim.AdamW(groups, weight_decay=0.0, **kw)


def structure_key(calib) -> tuple:
    """What the traced step depends on beyond tensor values: each matrix transform's band, and whether each rotary
    transform's imaginary part is on (it joins once the band passes head_dim / 2)."""
    key = []
    for m in calib.modules():
        if isinstance(m, Transform):
            key.append(m.band if m.form != "diagonal" else 1)
        elif isinstance(m, RopeTransform):
            key.append(m.im is not None and m.band > m.hd // 2)
    return tuple(key)


class CudaGraphs:
    """The CUDA side of StepRunner: eager warm-up steps and captures on one side stream (the autograd engine's
    gradient-accumulation nodes, created by the warm-up steps, then run on the stream they are captured on), capture
    into one memory pool shared by the layer's successive graphs, replay.

    The caller keeps the previous graph alive until the next capture has finished: the allocator frees a private pool
    once no graph uses it but tensors it holds (the gradients) are still alive, and a later capture into that pool then
    fails an internal assert (seen on the H200, torch 2.11)."""

    def __init__(self, device: torch.device):
        self.device, self.pool = device, None
        self.stream = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def eager(self):
        cur = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            yield
        cur.wait_stream(self.stream)

    def capture(self, fn: Callable[[], None]):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool, stream=self.stream):
            fn()
        return g

    def replay(self, g) -> None:
        g.replay()


def graphs_for(step_capture: str, device: torch.device):
    """The graph backend for a --step-capture choice on `device` (None: eager steps)."""
    if step_capture not in STEP_CAPTURES:
        raise ValueError(f"step capture must be one of {', '.join(STEP_CAPTURES)}, got {step_capture!r}")
    if step_capture == "off" or (step_capture == "auto" and (device.type != "cuda" or _capture_failed)):
        return None
    if device.type != "cuda":
        raise ValueError(f"step capture 'graph' needs a CUDA device, the layer is on {device}")
    return CudaGraphs(device)


class StepRunner:
    """Runs train_step for each batch: eagerly without `graphs`; with it, captured once per structure_key and
    replayed (see the module docstring). strict: a failed capture raises; else it is reported through `say` and the
    rest of the layer runs eagerly (the failed step too, so no step is lost)."""

    def __init__(self, calib, opt, kwargs: dict, cfg, amp, acc: Accum, graphs=None, strict: bool = False, say=print):
        self.calib, self.opt, self.kwargs, self.cfg, self.amp, self.acc = calib, opt, kwargs, cfg, amp, acc
        self.graphs, self.strict, self.say = graphs, strict, say
        self.key, self.graph, self.warm, self.static = None, None, 0, None
        self.retired = None  # the previous structure's graph, alive until the next capture (see CudaGraphs)
        self.captures = self.replays = 0

    def _step(self, x, target) -> None:
        train_step(self.calib, self.opt, x, target, self.kwargs, self.cfg, self.amp, self.acc)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> None:
        global _capture_failed, _cold_capture_failed
        if self.graphs is None:
            return self._step(x, target)
        if self.static is not None and x.shape != self.static[0].shape:  # a short last batch
            with self.graphs.eager():
                return self._step(x, target)
        key = structure_key(self.calib)
        if key != self.key:
            if self.graph is not None:
                self.retired = self.graph
            self.key, self.graph, self.warm = key, None, 0
        seen = (key, tuple(x.shape), x.device)
        if self.captures == 0:
            warmup = GRAPH_WARMUP  # the layer's first capture: new parameters, optimizer state, side stream
        else:
            warmup = 0 if seen in _warm_structures and _cold_capture_failed is None else RECAPTURE_WARMUP
        if self.warm < warmup:
            self.warm += 1
            if self.static is None:
                self.static = (torch.empty_like(x), torch.empty_like(target))
            with self.graphs.eager():
                self._step(x, target)
            _warm_structures.add(seen)
            return
        sx, st = self.static
        if self.graph is None:
            try:
                self.graph = self.graphs.capture(lambda: self._step(sx, st))
            except Exception as e:
                if warmup == 0:  # captured without its eager step: warm up from now on, this step eagerly
                    _cold_capture_failed = f"{type(e).__name__}: {e}"
                    self.say(f"note: CUDA graph capture without a warm-up step failed ({_cold_capture_failed}); "
                             "warming up before every capture from here on")
                    AF.forget_cached_masks()  # masks first built inside the failed capture were never computed
                    for m in self.calib.modules():
                        if isinstance(m, Transform):
                            m.forget_mask()
                    self.warm += 1
                    with self.graphs.eager():
                        self._step(x, target)
                    _warm_structures.add(seen)
                    return
                if self.strict:
                    raise
                _capture_failed = f"{type(e).__name__}: {e}"
                self.say(f"warning: CUDA graph capture of the training step failed ({_capture_failed}); "
                         "eager steps from here on")
                self.graphs = None
                return self._step(x, target)
            self.captures += 1
            self.retired = None
        sx.copy_(x)
        st.copy_(target)
        self.graphs.replay(self.graph)
        self.replays += 1
