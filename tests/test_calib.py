"""AffineQuant / OmniQuant calibration (aq.calib): the algebra of the transforms (equivalence with quantization off),
the RoPE restriction, the schedule, the merged form handed on, checkpoints and resume, recovery from divergence.

Training-heavy tests run the torch reference paths (AQ_BACKEND=torch): the kernels are tested against them in
test_fake_quant.py / test_affine.py; one short run goes through the interpreted Triton kernels end to end."""
import copy
import json

import pytest
import torch

from aq import models
from aq.calib import loop, pipeline
from aq.calib.layer import LayerCalib
from aq.calib.rtn import quantize_rtn
from aq.calib.transforms import MIN_MARGIN, band_at
from aq.config import QuantConfig, auto_alpha_sf
from aq.primitives import dequantize
from aq.qmodel import FakeQuantLinear, QModelSpec, TransformedNorm
from tests.conftest import tiny_llama, tiny_opt


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("AQ_BACKEND", "torch")


def _randomize(calib: LayerCalib, g: torch.Generator) -> None:
    """Random, non-trivial, diagonally dominant transforms (every kind of parameter moves away from identity)."""
    with torch.no_grad():
        for name, p in calib.named_parameters():
            if "lwc" in name or not p.requires_grad:  # the layer's own (frozen) weights stay as they are
                continue
            if p.dim() == 2 and p.shape[0] == p.shape[1] and ".A" in f".{name.split('.')[-1]}":
                d = p.shape[0]
                p.copy_(torch.diag(1 + 0.5 * torch.rand(d, generator=g)) + 0.3 / d * torch.randn(d, d, generator=g))
            elif name.endswith((".s", ".re")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:  # shifts, imaginary parts
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _out(y):
    return y[0] if isinstance(y, tuple) else y


CASES = [("affinequant", "full"), ("affinequant", "block"), ("affinequant", "diagonal"), ("omniquant", "diagonal")]


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("mode,form", CASES)
def test_random_transforms_with_quantization_off_keep_the_logits(make, mode, form, torch_backend):
    """The proof of the algebra (incl. GQA on the tiny LLaMA, RoPE, shifts on OPT): random transforms on every layer,
    quantization off; both the training path and the merged model match the original logits in fp32."""
    model = make()
    cfg = QuantConfig(mode=mode, norm_transform=form, norm_block=16, down_transform=True)
    arch, geo = models.arch_of(model), models.geometry(model)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    _, kws = pipeline.capture(model, ids, 2)
    layers = models.decoder_layers(model)
    g = torch.Generator().manual_seed(1)
    kvd = geo.kv_heads * geo.head_dim
    for i in range(len(layers)):
        shifts = {} if arch.rope else {"A_qkv": torch.zeros(64), "A_up": torch.zeros(64), "A_vo": torch.zeros(kvd)}
        c = LayerCalib(layers[i], arch, geo, cfg, norm_form=cfg.norm_form, head_affine=mode == "affinequant",
                       alpha=0.7, quantize=False, shifts=shifts)
        assert ("A_down" in c.t) == ("gate" in arch.modules)
        _randomize(c, g)
        c.set_epoch(3, 4)  # the last epoch: full band
        c.refresh()
        x = torch.randn(2, 32, 64, generator=g)
        fp = _out(layers[i](x, **kws[i]))
        with torch.no_grad():
            live = c(x, **kws[i])
            fp = fp.detach()
        assert float((live - fp).norm() / fp.norm()) < 1e-5
        layers[i] = c.merged(layers[i])
    out = model(ids).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-4
    norm = layers[0].get_submodule(arch.attn_norm)
    if cfg.norm_form == "diagonal":
        assert not isinstance(norm, TransformedNorm)  # folded into the norm weight
    else:
        assert isinstance(norm, TransformedNorm) and norm.form == form
        assert norm.transform.shape == ((64, 64) if form == "full" else (4, 16, 16))


def test_unrestricted_qk_transform_breaks_rope_equivalence():
    """Negative control for the RoPE restriction: a general per-head q/k transform (q' = q B, k' = k B^-T) keeps the
    logits without rotary embeddings but not with them, while the complex-scalar form aq uses keeps them."""
    model = tiny_llama()
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    attn = models.decoder_layers(model)[0].self_attn
    hd, kv, groups = 16, 2, 2
    g = torch.Generator().manual_seed(0)
    B = torch.eye(hd) + 0.2 * torch.randn(hd, hd, generator=g)
    Binv_t = torch.linalg.inv(B).T
    with torch.no_grad():
        attn.q_proj.weight.copy_(torch.cat([B.T @ w for w in attn.q_proj.weight.view(kv * groups, hd, -1)]))
        attn.k_proj.weight.copy_(torch.cat([Binv_t.T @ w for w in attn.k_proj.weight.view(kv, hd, -1)]))
    err = float((model(ids).logits - ref).norm() / ref.norm())
    assert err > 1e-3


def test_band_schedule_grows_from_diagonal_to_full_and_survives_one_epoch():
    assert [band_at(e, 5, 9) for e in range(5)] == [1, 3, 5, 7, 9]
    assert band_at(0, 1, 64) == 64  # one epoch: no division by zero, the full band
    assert band_at(7, 20, 1) == 1
    assert auto_alpha_sf(576, 4, 16) == 1.0 and auto_alpha_sf(576, 4, 4) == 0.1 and auto_alpha_sf(4096, 4, 16) == 1e-2


def _segments(n=4, t=32, seed=0):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make,cfg", [
    (tiny_llama, QuantConfig(mode="affinequant", wbits=3, group_size=16, epochs=2, norm_transform="full")),
    (tiny_llama, QuantConfig(mode="omniquant", wbits=4, abits=4, group_size=None, epochs=2)),
    (tiny_opt, QuantConfig(mode="affinequant", wbits=4, abits=6, group_size=None, epochs=2)),
    (tiny_opt, QuantConfig(mode="affinequant", wbits=2, group_size=32, epochs=2, norm_transform="block",
                           norm_block=32)),
])
def test_calibrated_model_is_in_the_handed_on_form(make, cfg, torch_backend):
    model = make()
    arch = models.arch_of(model)
    res = loop.calibrate(model, _segments(), cfg, progress=False, say=lambda s: None)
    assert len(res["layers"]) == 2 and all(r["form"] != "rtn" and r["steps"] == 8 for r in res["layers"])
    for layer in models.decoder_layers(model):
        for n in arch.linears:
            m = layer.get_submodule(n)
            assert isinstance(m, FakeQuantLinear) and m.wbits == cfg.wbits and m.abits == cfg.abits
            codes = m.codes()
            assert int(codes.max()) <= 2 ** cfg.wbits - 1
            assert torch.equal(dequantize(codes, m.scale, m.zero, m.group_size), m.weight)
        norm = layer.get_submodule(arch.attn_norm)
        assert isinstance(norm, TransformedNorm) == (cfg.norm_form != "diagonal")
        attn = layer.get_submodule(arch.attention)
        assert getattr(attn, "aq_qkv_abits", 16) == cfg.abits
    if cfg.abits < 16:
        assert model.config._attn_implementation.startswith("aq_qkv_")
    assert torch.isfinite(model(_segments(1, 32, 5)).logits).all()


def test_calibration_beats_round_to_nearest(torch_backend):
    """W2g16 on the tiny OPT: the calibrated model's logits are closer to the FP ones than RTN's, and AffineQuant's
    closer than OmniQuant's (transforms stay strictly diagonally dominant throughout)."""
    seg = _segments(8)
    ref = tiny_opt()(seg).logits
    rtn = quantize_rtn(tiny_opt(), QuantConfig(wbits=2, group_size=16))
    err = {"rtn": float((rtn(seg).logits - ref).pow(2).mean())}
    for mode in ("omniquant", "affinequant"):
        m = tiny_opt()
        res = loop.calibrate(m, seg, QuantConfig(mode=mode, wbits=2, group_size=16, epochs=4, norm_transform="full"),
                             progress=False, say=lambda s: None)
        err[mode] = float((m(seg).logits - ref).pow(2).mean())
        assert all(MIN_MARGIN - 1e-6 <= r[k] <= 1 for r in res["layers"] for k in ("margin", "margin_min"))
    assert err["affinequant"] < err["omniquant"] < err["rtn"], err


def test_triton_kernels_end_to_end_interpreted():
    """One short run through the (interpreted) Triton kernels: same pipeline as on the GPU."""
    model = tiny_llama(num_hidden_layers=1)
    cfg = QuantConfig(mode="affinequant", wbits=4, group_size=16, epochs=1, norm_transform="block", norm_block=16)
    res = loop.calibrate(model, _segments(2, 16), cfg, progress=False, say=lambda s: None)
    assert res["layers"][0]["steps"] == 2 and res["layers"][0]["form"] == "block"
    assert torch.isfinite(model(_segments(1, 16)).logits).all()


def test_batched_steps_and_down_transform(torch_backend):
    """batch_size segments per step (ceil(N / B) steps per epoch); W4A4 with the up -> down transform trains, keeps
    it positive and folds it into up_proj's rows and down_proj's columns (nothing of it left at inference)."""
    seg = _segments(5)
    ref = tiny_llama()(seg).logits
    cfg = QuantConfig(mode="affinequant", wbits=4, abits=4, group_size=None, epochs=2, batch_size=2)
    assert cfg.down_on and not QuantConfig(wbits=4).down_on and not QuantConfig(abits=4, down_transform=False).down_on
    model = tiny_llama()
    res = loop.calibrate(model, seg, cfg, progress=False, say=lambda s: None)
    assert all(r["steps"] == 2 * 3 and r["form"] == "diagonal" for r in res["layers"])
    layer = models.decoder_layers(model)[0]
    assert isinstance(layer.mlp.up_proj, FakeQuantLinear) and isinstance(layer.mlp.down_proj, FakeQuantLinear)
    rtn = quantize_rtn(tiny_llama(), QuantConfig(wbits=4, abits=4, group_size=None))
    err = float((model(seg).logits - ref).pow(2).mean())
    assert err < float((rtn(seg).logits - ref).pow(2).mean())
    with pytest.raises(ValueError, match="batch_size"):
        QuantConfig(batch_size=0)


def test_checkpoint_resume_gives_the_same_result(tmp_path, torch_backend):
    cfg = QuantConfig(mode="affinequant", wbits=3, group_size=16, epochs=2, norm_transform="full")
    a = tiny_llama()
    loop.calibrate(a, _segments(), cfg, ckpt_dir=tmp_path, progress=False, say=lambda s: None)
    first = torch.load(tmp_path / "layer_001.pt", weights_only=False)["state"]
    (tmp_path / "layer_001.pt").unlink()  # as if killed after layer 0
    msgs = []
    b = tiny_llama()
    res = loop.calibrate(b, _segments(), cfg, ckpt_dir=tmp_path, resume=True, progress=False, say=msgs.append)
    assert res["resumed_layers"] == 1 and any("resumed" in m for m in msgs)
    again = torch.load(tmp_path / "layer_001.pt", weights_only=False)["state"]
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # a fresh FP model loads the finished run
    c = pipeline.load_calibrated(tiny_llama(), tmp_path)
    ids = _segments(1, 32, 9)
    assert torch.equal(c(ids).logits, a(ids).logits)
    # resuming with other settings, or writing over a run without --resume, fails clearly
    with pytest.raises(ValueError, match="other settings"):
        loop.calibrate(tiny_llama(), _segments(), QuantConfig(mode="affinequant", wbits=4, group_size=16, epochs=2),
                       ckpt_dir=tmp_path, resume=True, progress=False, say=lambda s: None)
    with pytest.raises(ValueError, match="pass --resume"):
        loop.calibrate(tiny_llama(), _segments(), cfg, ckpt_dir=tmp_path, progress=False, say=lambda s: None)


def test_same_seed_same_model_other_seed_other_model(torch_backend):
    def run(seed):
        m = tiny_opt()
        cfg = QuantConfig(mode="affinequant", wbits=3, group_size=16, epochs=2, seed=seed)
        loop.calibrate(m, _segments(), cfg, progress=False, say=lambda s: None)
        return m.state_dict()
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_divergence_restores_the_layer_then_falls_back(monkeypatch, torch_backend):
    """A NaN loss restarts the layer with a 10x smaller lr; a transform that stays broken ends in diagonal transforms,
    and a layer that diverges every time falls back to round-to-nearest: logged, never a NaN model."""
    real_forward = LayerCalib.forward
    calls = {"n": 0}

    def nan_first_attempts(self, x, **kw):
        out = real_forward(self, x, **kw)
        if self.t["A_qkv"].form != "diagonal" and torch.is_grad_enabled():
            calls["n"] += 1
            return out * float("nan")
        return out

    monkeypatch.setattr(LayerCalib, "forward", nan_first_attempts)
    model = tiny_llama(num_hidden_layers=1)
    msgs = []
    cfg = QuantConfig(mode="affinequant", wbits=3, group_size=16, epochs=1, norm_transform="full")
    res = loop.calibrate(model, _segments(), cfg, progress=False, say=msgs.append)
    log = res["layers"][0]
    assert calls["n"] > 0 and log["form"] == "diagonal" and log["lr_scale"] == 1.0
    # the NaN shows either as a non-finite epoch loss or as NaN transforms failing the dominance check next step
    assert len(log["events"]) == 2 and "(full, lr x1) failed" in log["events"][0]
    assert "(full, lr x0.1) failed" in log["events"][1]
    assert sum("restoring the layer" in m for m in msgs) == 2
    assert torch.isfinite(model(_segments(1)).logits).all()

    monkeypatch.setattr(LayerCalib, "forward", lambda self, x, **kw: real_forward(self, x, **kw) * float("nan"))
    model = tiny_llama(num_hidden_layers=1)
    res = loop.calibrate(model, _segments(), cfg, progress=False, say=msgs.append)
    assert res["layers"][0]["form"] == "rtn" and "round-to-nearest" in res["layers"][0]["events"][-1]
    assert torch.isfinite(model(_segments(1)).logits).all()


def test_bad_settings_fail_before_any_work():
    model = tiny_llama()
    with pytest.raises(ValueError, match="norm block 48 does not divide the hidden size 64"):
        loop.check_calibratable(model, QuantConfig(norm_transform="block", norm_block=48, group_size=16))
    with pytest.raises(ValueError, match="group size 48 does not divide"):
        loop.check_calibratable(model, QuantConfig(group_size=48))
    with pytest.raises(ValueError, match="do_layer_norm_before"):
        loop.check_calibratable(tiny_opt(do_layer_norm_before=False), QuantConfig(group_size=16))
    for kw, msg in [(dict(mode="bogus"), "unknown mode"), (dict(norm_transform="dense"), "unknown norm transform"),
                    (dict(epochs=0), "epochs"), (dict(alpha_sf=2.0), "alpha_sf"), (dict(lr_clip=0.0), "lr_clip")]:
        with pytest.raises(ValueError, match=msg):
            QuantConfig(**kw)


def test_norm_transform_module_block_matches_dense():
    norm = torch.nn.LayerNorm(8)
    inv = torch.randn(2, 4, 4)
    nt = TransformedNorm(copy.deepcopy(norm), inv, "block")
    x = torch.randn(3, 8)
    assert torch.allclose(nt(x), norm(x) @ torch.block_diag(*inv), atol=1e-6)
    with pytest.raises(ValueError):
        TransformedNorm(norm, torch.randn(8, 8), "diagonal")
    assert json.dumps(QModelSpec.of(torch.nn.Sequential(nt)).to_json())  # the spec is plain JSON
