"""The calibration pipeline's streaming (a model kept on one device, the work on another, one layer there at a time)
and the training step's runner (eager, or captured per mask structure and replayed), on CPU.

No GPU here: the "compute device" is torch.device("cpu", 0), which differs from the model's torch.device("cpu") as
far as the pipeline can tell (so every move it would make for a GPU happens) while the tensors stay where they are;
pipeline.move is wrapped to see each move. The CUDA graph is stood in for by a fake whose capture records the step
and whose replay runs it on the static inputs, so the runner's bookkeeping (warm-up, one capture per mask structure,
static inputs, short batches, fallback) is checked against plain eager steps."""
import contextlib
import os
import weakref

import pytest
import torch

from aq import models
from aq.calib import loop, pipeline, step
from aq.config import QuantConfig
from tests.conftest import tiny_llama, tiny_opt

pytestmark = pytest.mark.usefixtures("one_thread")
DEV = torch.device("cpu", 0)  # != torch.device("cpu"): the pipeline streams


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("AQ_BACKEND", "torch")


def _segments(n=4, t=32, seed=0):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


class MoveLog:
    """Wraps pipeline.move: which decoder-layer-like modules (those holding a self_attn) are on DEV at any time."""

    def __init__(self, monkeypatch):
        self.on_dev, self.max_on_dev, self.model_moves = set(), 0, []
        real = pipeline.move

        def move(module, device):
            if hasattr(module, "self_attn"):
                (self.on_dev.add if device == DEV else self.on_dev.discard)(id(module))
                self.max_on_dev = max(self.max_on_dev, len(self.on_dev))
            else:
                # the whole model with its layers swapped out: nothing of a decoder layer may travel with it
                assert not any(hasattr(m, "self_attn") for m in module.modules()), "a layer moved with the model"
                self.model_moves.append(device)
            return real(module, device)

        monkeypatch.setattr(pipeline, "move", move)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make,cfg", [
    (tiny_llama, QuantConfig(mode="affinequant", wbits=3, group_size=16, epochs=2, norm_transform="block",
                             norm_block=16)),
    (tiny_opt, QuantConfig(mode="omniquant", wbits=4, abits=6, group_size=None, epochs=2, rounding="gptq")),
])
def test_streamed_calibration_equals_the_resident_one(make, cfg, monkeypatch, torch_backend, tmp_path):
    ref = make()
    loop.calibrate(ref, _segments(), cfg, progress=False, say=lambda s: None)
    log = MoveLog(monkeypatch)
    model = make()
    msgs = []
    loop.calibrate(model, _segments(), cfg, device=DEV, ckpt_dir=tmp_path, progress=False, say=msgs.append)
    assert any("streaming layers" in m for m in msgs)
    a, b = _state(ref), _state(model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log.max_on_dev == 1 and not log.on_dev  # one layer at a time on the device, all back afterwards
    assert log.model_moves == [DEV, torch.device("cpu")] * 2  # the rest of the model visits twice (two captures)
    assert all(p.device == torch.device("cpu") for p in model.parameters())
    # a resumed streamed run repeats the same computation
    (tmp_path / "layer_001.pt").unlink()
    again = make()
    res = loop.calibrate(again, _segments(), cfg, device=DEV, ckpt_dir=tmp_path, resume=True, progress=False,
                         say=lambda s: None)
    assert res["resumed_layers"] == 1
    c = _state(again)
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_capture_records_what_the_real_layers_receive(make):
    """The placeholders that stand in for the layers during capture see the same hidden states and keyword arguments
    as the real layers in a full forward."""
    model = make()
    ids = _segments(3, 16)
    seen, kws = [], [{} for _ in models.decoder_layers(model)]

    def hook(i):
        def h(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                seen.append(x.detach().float())
            if not kws[i]:
                kws[i] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values",
                                                                         "use_cache", "past_key_value")}
        return h

    hs = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(models.decoder_layers(model))]
    with torch.no_grad():
        for s in range(3):
            model(ids[s:s + 1], use_cache=False)
    for h in hs:
        h.remove()
    inps, layer_kwargs = pipeline.capture(model, ids, 2)
    assert torch.equal(inps, torch.cat(seen))
    for want, got in zip(kws, layer_kwargs):
        assert want.keys() == got.keys()
        for k in want:
            w, g = want[k], got[k]
            if isinstance(w, torch.Tensor):
                assert torch.equal(w, g), k
            elif isinstance(w, tuple):
                assert all(torch.equal(x, y) for x, y in zip(w, g)), k
            else:
                assert w == g, k


def test_streamed_forward_matches_and_moves_one_layer_at_a_time(monkeypatch):
    model = tiny_llama()
    ids = _segments(2, 16)
    with torch.no_grad():
        ref = model(ids).logits
        log = MoveLog(monkeypatch)
        with pipeline.streamed(model, DEV):
            out = model(ids).logits
    assert torch.equal(out, ref)
    assert log.max_on_dev == 1 and not log.on_dev and log.model_moves == [DEV, torch.device("cpu")]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in models.decoder_layers(model))


def test_buffer_plan_follows_the_memory_estimate(monkeypatch):
    layer = models.decoder_layers(tiny_llama())[0]
    cuda = torch.device("cuda")
    shape = (128, 2048, 64)
    need = 2 * 4 * 128 * 2048 * 64 + pipeline.training_bytes(layer, 2048, 64)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (int(need / pipeline.GPU_HEADROOM) + 1, 1 << 40))
    assert pipeline.plan_buffers("auto", shape, layer, cuda, 2048) == "device"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (need, 1 << 40))
    assert pipeline.plan_buffers("auto", shape, layer, cuda, 2048) == "cpu"
    assert pipeline.plan_buffers("device", shape, layer, cuda, 2048) == "device"
    assert pipeline.plan_buffers("cpu", shape, layer, torch.device("cpu"), 2048) == "cpu"
    assert pipeline.plan_buffers("auto", shape, layer, torch.device("cpu"), 2048) == "device"
    with pytest.raises(ValueError, match="buffers must be one of"):
        pipeline.plan_buffers("gpu", shape, layer, cuda, 2048)


def test_cpu_kept_streams_give_the_same_model(torch_backend):
    cfg = QuantConfig(mode="omniquant", wbits=4, group_size=16, epochs=1)
    a, b = tiny_llama(), tiny_llama()
    loop.calibrate(a, _segments(), cfg, progress=False, say=lambda s: None)
    loop.calibrate(b, _segments(), cfg, buffers="cpu", device=DEV, progress=False, say=lambda s: None)
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


class FakeGraphs:
    """capture() records the step without running it; replay() runs it (on the runner's static inputs). Like CUDA's
    private pools, a capture after the first one needs an earlier graph still alive (else the allocator asserts)."""

    def __init__(self, fail=False):
        """fail: True, every capture fails; "cold": a capture with no eager step since the last one fails."""
        self.fail, self.captured, self.eager_steps, self.live = fail, [], 0, []
        self.eager_since_capture = 0

    def eager(self):
        self.eager_steps += 1
        self.eager_since_capture += 1
        return contextlib.nullcontext()

    def capture(self, fn):
        cold, self.eager_since_capture = self.eager_since_capture == 0, 0
        if self.fail is True or (self.fail == "cold" and cold):
            raise RuntimeError("operation not permitted when stream is capturing")
        if self.live and not any(r() is not None for r in self.live):
            raise AssertionError("capture into a pool whose graphs were all freed")
        g = _FakeGraph(fn)
        self.captured.append(fn)
        self.live.append(weakref.ref(g))
        return g

    def replay(self, g):
        g.fn()


class _FakeGraph:
    def __init__(self, fn):
        self.fn = fn


@pytest.mark.parametrize("mode,n,batch", [("affinequant", 8, 2), ("omniquant", 9, 2)])
def test_graph_runner_replays_the_eager_computation(mode, n, batch, monkeypatch, torch_backend):
    cfg = QuantConfig(mode=mode, wbits=3, group_size=16, epochs=3, norm_transform="block", norm_block=16,
                      batch_size=batch)
    ref = tiny_llama()
    res_ref = loop.calibrate(ref, _segments(n), cfg, step_capture="off", progress=False, say=lambda s: None)
    fakes = []
    monkeypatch.setattr(step, "graphs_for", lambda choice, dev: fakes.append(FakeGraphs()) or fakes[-1])
    monkeypatch.setattr(step, "_warm_structures", set())  # a fresh process
    model = tiny_llama()
    res = loop.calibrate(model, _segments(n), cfg, progress=False, say=lambda s: None)
    a, b = _state(ref), _state(model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps_per_epoch = -(-n // batch)
    for i, (r, r0) in enumerate(zip(res["layers"], res_ref["layers"])):
        assert r["steps"] == r0["steps"] == 3 * steps_per_epoch and r0["graph_captures"] == 0
        # affinequant: the band changes every epoch (a capture each); omniquant: one structure for the whole layer
        captures = 3 if mode == "affinequant" else 1
        short = n % batch != 0  # the short last batch of each epoch runs eagerly
        assert r["graph_captures"] == captures
        # a band met at an earlier layer is captured without its eager warm-up step
        warmups = step.GRAPH_WARMUP + (step.RECAPTURE_WARMUP * (captures - 1) if i == 0 else 0)
        assert r["graph_replays"] == r["steps"] - warmups - 3 * short


def test_failed_capture_without_warmup_brings_the_warmup_back(monkeypatch, torch_backend):
    cfg = QuantConfig(mode="affinequant", wbits=3, group_size=16, epochs=3, norm_transform="block", norm_block=16,
                      batch_size=2)
    ref = tiny_llama()
    loop.calibrate(ref, _segments(8), cfg, step_capture="off", progress=False, say=lambda s: None)
    monkeypatch.setattr(step, "graphs_for", lambda choice, dev: FakeGraphs(fail="cold"))
    monkeypatch.setattr(step, "_warm_structures", set())
    monkeypatch.setattr(step, "_cold_capture_failed", None)
    model, msgs = tiny_llama(), []
    res = loop.calibrate(model, _segments(8), cfg, progress=False, say=msgs.append)
    assert sum("without a warm-up step failed" in m for m in msgs) == 1  # once: warm-ups from then on
    assert step._cold_capture_failed and step._capture_failed is None
    assert [r["graph_captures"] for r in res["layers"]] == [3, 3]  # still captured, after warm-ups
    a, b = _state(ref), _state(model)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the failed capture lost no step and changed nothing


def test_failed_capture_falls_back_to_eager_steps_or_raises_when_required(monkeypatch, torch_backend):
    cfg = QuantConfig(mode="affinequant", wbits=3, group_size=16, epochs=2, norm_transform="block", norm_block=16)
    ref = tiny_llama()
    loop.calibrate(ref, _segments(8), cfg, step_capture="off", progress=False, say=lambda s: None)
    monkeypatch.setattr(step, "graphs_for", lambda choice, dev: FakeGraphs(fail=True))
    model, msgs = tiny_llama(), []
    res = loop.calibrate(model, _segments(8), cfg, progress=False, say=msgs.append)
    assert any("graph capture of the training step failed" in m for m in msgs)
    monkeypatch.undo()  # the real graphs_for: after a failure, auto means eager even on a CUDA device
    try:
        assert step._capture_failed and step.graphs_for("auto", torch.device("cuda")) is None
    finally:
        step._capture_failed = None
    assert all(r["graph_captures"] == 0 for r in res["layers"])
    a, b = _state(ref), _state(model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        loop.calibrate(tiny_llama(), _segments(8), cfg, step_capture="graph", progress=False, say=lambda s: None)
    with pytest.raises(ValueError, match="step_capture must be one of"):
        loop.calibrate(tiny_llama(), _segments(8), cfg, step_capture="compile", progress=False, say=lambda s: None)
    calib, kws = _calib(cfg)
    runner = step.StepRunner(calib, torch.optim.AdamW(calib.transform_params()), kws, cfg, None,
                             step.Accum(torch.device("cpu")), FakeGraphs(fail=True), strict=True)
    x = torch.randn(1, 8, 64)
    for _ in range(step.GRAPH_WARMUP):
        runner(x, x)
    with pytest.raises(RuntimeError, match="capturing"):
        runner(x, x)


def _calib(cfg):
    from aq.calib.layer import LayerCalib
    model = tiny_llama(num_hidden_layers=1)
    layer = models.decoder_layers(model)[0]
    _, kws = pipeline.capture(model, _segments(1, 8), 1)
    return LayerCalib(layer, models.arch_of(model), models.geometry(model), cfg.resolve(model), norm_form="block",
                      head_affine=True, alpha=1.0), kws[0]


def test_structure_key_follows_the_band():
    cfg = QuantConfig(mode="affinequant", wbits=3, group_size=16, norm_transform="block", norm_block=16)
    calib, _ = _calib(cfg)
    keys = []
    for e in range(4):
        calib.set_epoch(e, 4)
        keys.append(step.structure_key(calib))
    assert len(set(keys)) == 4
    calib.set_epoch(3, 4)
    assert step.structure_key(calib) == keys[-1]


def test_progress_estimates_the_time_left():
    p = pipeline.Progress(4, False)
    assert p.step(1, None) == ""  # a resumed layer: no time to go by yet
    assert p.step(2, 10.0) == " (mean 10.0s/layer, ~0:20 left)"
    assert p.step(3, 20.0) == " (mean 15.0s/layer, ~0:15 left)"
    p.close()
    assert pipeline._hms(3725) == "1:02:05"


def test_cli_streams_when_the_weights_would_crowd_the_gpu(monkeypatch):
    from aq.calibrate import _should_stream, build_parser
    model = tiny_llama()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert not _should_stream(model, "cpu", None) and not _should_stream(model, "cpu", True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (weights, 1 << 40))  # weights > half the free
    assert _should_stream(model, "cuda", None) and not _should_stream(model, "cuda", False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (3 * weights, 1 << 40))
    assert not _should_stream(model, "cuda", None) and _should_stream(model, "cuda", True)
    args = build_parser().parse_args(["--stream", "on", "--calib-buffers", "cpu", "--step-capture", "off"])
    assert (args.stream, args.calib_buffers, args.step_capture) == ("on", "cpu", "off")


def test_streamed_gptq_equals_the_resident_one(monkeypatch):
    from aq.calib.gptq import quantize_gptq
    cfg = QuantConfig(mode="gptq", wbits=3, group_size=16)
    ref = quantize_gptq(tiny_llama(), _segments(), cfg, batch=2, progress=False, say=lambda s: None)
    log = MoveLog(monkeypatch)
    model = quantize_gptq(tiny_llama(), _segments(), cfg, batch=2, progress=False, say=lambda s: None, device=DEV)
    a, b = _state(ref), _state(model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log.max_on_dev == 1 and not log.on_dev and log.model_moves == [DEV, torch.device("cpu")] * 2


def test_deterministic_mode_gives_the_training_step_the_math_attention_only(monkeypatch):
    from aq.calibrate import build_parser, use_deterministic
    cuda = torch.device("cuda")
    assert isinstance(step.attention_backends(cuda), contextlib.nullcontext)  # torch's default: every backend
    prev = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert build_parser().parse_args(["--deterministic"]).deterministic
    assert not build_parser().parse_args([]).deterministic
    use_deterministic()
    try:
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        with step.attention_backends(cuda):
            assert torch.backends.cuda.math_sdp_enabled()
            assert not (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
                        or torch.backends.cuda.cudnn_sdp_enabled())
        assert torch.backends.cuda.flash_sdp_enabled()  # restored after the step
        assert isinstance(step.attention_backends(torch.device("cpu")), contextlib.nullcontext)
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
