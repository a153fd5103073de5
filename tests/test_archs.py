"""The architectures of aq.models.ARCHS beyond LLaMA / OPT (test_calib.py), each on a tiny random config built from
transformers' own config classes (no download): the transform algebra with quantization off (random non-trivial
transforms at every site, logits unchanged in fp32), the sites each architecture leaves out and why, the residual
rotation where it is exact, a round-to-nearest and a short AffineQuant run (API and CLI) and patch_model on them."""
import copy

import pytest
import torch

from aq import calibrate, models
from aq.calib import loop, pipeline
from aq.calib.layer import LayerCalib
from aq.calib.rotation import check_rotatable, rotate_residual
from aq.calib.rtn import FakeQuantLinear, quantize_rtn
from aq.checkpoint import load_checkpoint
from aq.config import QuantConfig
from aq.patch import patch_model, patched_summary
from aq.primitives import fake_quant
from tests.conftest import make_tokenizer
from tests.test_calib import _randomize

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048)


def _build(model_type: str):
    import transformers as tf

    kw = dict(SHAPE)
    if model_type == "qwen2":  # q/k/v biases
        cfg, cls = tf.Qwen2Config(**kw, tie_word_embeddings=False), tf.Qwen2ForCausalLM
    elif model_type == "mistral":  # sliding window shorter than the sequences below
        cfg, cls = tf.MistralConfig(**kw, sliding_window=16, tie_word_embeddings=False), tf.MistralForCausalLM
    elif model_type == "qwen3":
        cfg, cls = tf.Qwen3Config(**kw, head_dim=16, tie_word_embeddings=False), tf.Qwen3ForCausalLM
    elif model_type == "phi3":
        cfg, cls = tf.Phi3Config(**kw, pad_token_id=0, bos_token_id=1, eos_token_id=2), tf.Phi3ForCausalLM
    elif model_type == "gemma":  # (1 + w) norms, scaled embedding, tied lm_head
        cfg, cls = tf.GemmaConfig(**kw, head_dim=16), tf.GemmaForCausalLM
    elif model_type == "gemma2":  # tied lm_head, soft-capping, alternating sliding / full attention
        cfg = tf.Gemma2Config(**kw, head_dim=16, sliding_window=16, attn_logit_softcapping=5.0,
                              final_logit_softcapping=3.0, query_pre_attn_scalar=16)
        cls = tf.Gemma2ForCausalLM
    elif model_type == "gemma3_text":
        cfg = tf.Gemma3TextConfig(**kw, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(model_type)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-trivial norm weights everywhere (HF starts them at 1, or 0 for Gemma's 1 + w)
        for m in model.modules():
            if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None:
                m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=g))
    return model


NEW = ["qwen2", "mistral", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text"]
IDS = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _equivalence(model, arch, cfg, alpha=0.7) -> tuple[float, float]:
    """Random transforms on every layer of model (in place, quantization off): (the largest relative change of a
    layer's output in the training path, the relative change of the logits of the merged model)."""
    geo = models.geometry(model)
    with torch.no_grad():
        ref = model(IDS).logits
    _, kws = pipeline.capture(model, IDS, 2)
    layers = models.decoder_layers(model)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for i in range(len(layers)):
        c = LayerCalib(layers[i], arch, geo, cfg, norm_form=cfg.norm_form, head_affine=cfg.mode == "affinequant",
                       alpha=alpha, quantize=False)
        _randomize(c, g)
        c.set_epoch(3, 4)
        c.refresh()
        x = torch.randn(2, 32, geo.hidden, generator=g)
        with torch.no_grad():
            fp, live = pipeline._out(layers[i](x, **kws[i])), c(x, **kws[i])
        worst = max(worst, _rel(live, fp))
        layers[i] = c.merged(layers[i])
    with torch.no_grad():
        return worst, _rel(model(IDS).logits, ref)


@pytest.mark.parametrize("mt", NEW)
@pytest.mark.parametrize("mode,form", [("affinequant", "block"), ("affinequant", "full"), ("omniquant", "diagonal")])
def test_random_transforms_with_quantization_off_keep_the_logits(mt, mode, form, torch_backend):
    model = _build(mt)
    arch = models.arch_of(model)
    cfg = QuantConfig(mode=mode, norm_transform=form, norm_block=16, down_transform=True)
    sites = {s.name for s in arch.sites}
    assert {"A_qkv", "A_up", "A_vo", "A_down"} <= sites
    assert ("A_qk" in sites) == (mt not in ("qwen3", "gemma3_text"))  # q/k norms: no q/k transform
    live, merged = _equivalence(model, arch, cfg)
    assert live < 1e-5 and merged < 1e-4


@pytest.mark.parametrize("mt", ["qwen3", "gemma3_text"])
def test_a_qk_transform_would_break_q_k_norm_models(mt, torch_backend):
    """Why Qwen3 / Gemma 3 leave A_qk out: the per-head RMSNorm on q and k renormalizes what B scaled."""
    from dataclasses import replace

    model = _build(mt)
    arch = models.arch_of(model)
    with_qk = replace(arch, sites=models.llama_sites(arch.attn_norm, arch.mlp_norm, qk=True))
    live, merged = _equivalence(model, with_qk, QuantConfig(mode="affinequant", norm_transform="diagonal"))
    assert live > 1e-4 and merged > 1e-3


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("AQ_BACKEND", "torch")


def test_fused_linears_split_by_role():
    model = _build("phi3")
    arch, geo = models.arch_of(model), models.geometry(model)
    rows = arch.rows(geo, models.decoder_layers(model)[0])
    assert rows["q"] == ("self_attn.qkv_proj", 0, 64) and rows["k"] == ("self_attn.qkv_proj", 64, 96)
    assert rows["v"] == ("self_attn.qkv_proj", 96, 128)
    assert rows["gate"] == ("mlp.gate_up_proj", 0, 128) and rows["up"] == ("mlp.gate_up_proj", 128, 256)
    assert arch.linears == ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@pytest.mark.parametrize("mode", ["affinequant", "omniquant"])
def test_partial_rotary_qk_transform(mode, torch_backend):
    """Phi-3 with partial_rotary_factor 0.5 (as Phi-4-mini's 0.75): A_qk pairs the rotated channels (i, i + 4) of each
    16-wide head and scales the 8 channels RoPE leaves alone; the logits stay."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Phi3Config(**SHAPE, pad_token_id=0, bos_token_id=1, eos_token_id=2, partial_rotary_factor=0.5)
    model = tf.Phi3ForCausalLM(cfg).eval()
    geo = models.geometry(model)
    assert geo.partial_rotary and geo.rotary_dim == 8
    live, merged = _equivalence(model, models.arch_of(model), QuantConfig(mode=mode, norm_transform="block",
                                                                          norm_block=16))
    assert live < 1e-5 and merged < 1e-4
    # the channels RoPE leaves alone are scaled (q * s, k / s): their rows change, their products do not
    from aq.calib.transforms import RopeTransform

    t = RopeTransform("t", 2, 16, 2, affine=True, rotary_dim=8)
    with torch.no_grad():
        t.s.copy_(torch.rand(2, 8) + 0.5)
        t.im.copy_(torch.randn(2, 4))
    wq, wk = torch.randn(64, 8, dtype=torch.float64), torch.randn(32, 8, dtype=torch.float64)
    q, k = t.rows(wq, wk, exact=True)
    assert not torch.allclose(q[8:16], wq[8:16])
    assert torch.allclose(q[8:16] * k[8:16], wq[8:16] * wk[8:16])


@pytest.mark.parametrize("mt", NEW)
def test_rotation_exact_where_enabled(mt):
    model = _build(mt)
    if mt in ("gemma2", "gemma3_text"):  # norms after attention / MLP scale o / down's outputs: not a rotation
        with pytest.raises(ValueError, match="norms after attention"):
            check_rotatable(model)
        return
    with torch.no_grad():
        ref = model(IDS).logits
        rotate_residual(model, "hadamard", seed=0)
        out = model(IDS).logits
    assert _rel(out, ref) < 1e-5


def test_unknown_architecture_names_what_to_add():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"Add an Arch to aq.models.ARCHS under 'gpt2': layers .*modules .*sites"):
        models.arch_of(m)
    with pytest.raises(ValueError, match="missing \\['down'\\]"):
        models.Arch(layers="x", modules={r: r for r in ("q", "k", "v", "o", "up")}, sites=(), final_norm="n",
                    embed="e", rope=True)
    with pytest.raises(ValueError, match="site A_vo names role 'gate', which Arch.modules does not map"):
        models.Arch(layers="x", modules={r: r for r in ("q", "k", "o", "up", "down")} | {"v": "v"}, final_norm="n",
                    embed="e", rope=True, sites=(models.Site("A_vo", "v", ("gate",), "head"),))


@pytest.mark.parametrize("mt", NEW)
def test_rtn_and_affinequant_then_patch_model(mt, monkeypatch):
    """RTN and a short AffineQuant run (API) quantize every decoder linear; patch_model on both runs close to the
    fake-quantized model, norms (1 + w for Gemma) and embeddings included. The patched AffineQuant model of Gemma 2
    (1 + w norm kernel) and Phi-3 (fused linears) runs the Triton kernels (interpreted), the rest the torch reference
    (the kernels themselves are checked against it in the kernel tests)."""
    monkeypatch.setenv("AQ_BACKEND", "torch")
    cfg = QuantConfig(wbits=4, abits=16, group_size=32)
    fq = quantize_rtn(_build(mt), cfg)
    n_lin = 4 * 2 if mt == "phi3" else 7 * 2
    assert sum(isinstance(m, FakeQuantLinear) for m in fq.modules()) == n_lin
    segs = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    aq_model = _build(mt)
    res = loop.calibrate(aq_model, segs, QuantConfig(mode="affinequant", wbits=4, group_size=32, epochs=1,
                                                     norm_transform="block", norm_block=16, down_transform=True),
                         progress=False, say=lambda s: None)
    assert all(r["form"] == "block" and r["steps"] > 0 for r in res["layers"])
    for m in (fq, aq_model):
        if m is aq_model and mt in ("gemma2", "phi3"):
            monkeypatch.delenv("AQ_BACKEND")
        with torch.no_grad():
            ref32 = m(IDS).logits
            bf = copy.deepcopy(m).to(torch.bfloat16)
            noise = _rel(bf(IDS).logits, ref32)  # what bf16 alone does to the fake-quantized model
            pm = patch_model(bf, cfg)
            s = patched_summary(pm)
            assert s["FakeQuantLinear"] == 0 and s["W4A16Linear"] >= n_lin // 2
            assert s["FusedNorm"] == 2 * 2 + 1  # the two norm sites of each layer and the final norm ((1 + w): Gemma)
            assert _rel(pm(IDS).logits, ref32) < 2 * noise
    # a quantized embedding keeps the scale of Gemma's scaled embedding
    emb = fq.get_input_embeddings()
    with torch.no_grad():
        pe = patch_model(copy.deepcopy(fq).to(torch.bfloat16), cfg, embeddings=True).get_input_embeddings()
        want = fake_quant(emb.weight.to(torch.bfloat16).float(), 4, 32)[IDS] * getattr(emb, "scalar_embed_scale", 1.0)
        assert _rel(pe(IDS), want) < 1e-2


@pytest.mark.parametrize("mt", ["qwen3", "phi3", "gemma2"])
def test_cli_affinequant_round_trip(mt, data_dir, tmp_path):
    """The CLI on a saved model folder: calibrates, writes a checkpoint, and the checkpoint loads to the same logits."""
    d = tmp_path / mt
    _build(mt).save_pretrained(d)
    make_tokenizer(tmp_path).save_pretrained(d)
    out = tmp_path / "run"
    res = calibrate.main(["--model", str(d), "--mode", "affinequant", "--epochs", "1", "--nsamples", "2", "--seqlen",
                          "64", "--group-size", "32", "--eval-windows", "1", "--no-progress", "--skip-fp",
                          "--out", str(out)])
    assert len(res["layers"]) == 2
    model = load_checkpoint(out)
    assert sum(isinstance(m, FakeQuantLinear) for m in model.modules()) == (8 if mt == "phi3" else 14)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize("mt", ["phi3", "gemma3_text"])
def test_w4a4_patched_is_the_fake_quant_model(mt):
    """Weight-activation: the norms (Gemma: 1 + w) fused into the W4A4 activation quantization of their consumers
    (Phi-3: one fused consumer per norm), integer GEMMs, the fake-quantized model in fp32 up to summation order."""
    fq = quantize_rtn(_build(mt), QuantConfig(wbits=4, abits=4, group_size=None))
    pm = patch_model(copy.deepcopy(fq))
    s = patched_summary(pm)
    assert s["W4A4Linear"] == 8 and s["DeferredNorm"] == 4  # q/k/v and gate/up one GEMM each (fused or joined)
    with torch.no_grad():
        assert _rel(pm(IDS).logits, fq(IDS).logits) < 1e-5


def test_gptq_on_fused_linears(torch_backend):
    """GPTQ's true-sequential stages come from the sites (Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj): every
    linear rounded, and closer to the FP model than round-to-nearest on the calibration tokens."""
    from aq.calib.gptq import quantize_gptq, stages

    fp = _build("phi3")
    assert stages(models.arch_of(fp)) == [("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                                          ("mlp.down_proj",)]
    segs = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(4))
    cfg = QuantConfig(mode="gptq", wbits=3, group_size=32)
    g = quantize_gptq(_build("phi3"), segs, cfg, progress=False, say=lambda s: None)
    r = quantize_rtn(_build("phi3"), cfg)
    assert sum(isinstance(m, FakeQuantLinear) for m in g.modules()) == 8
    with torch.no_grad():
        ref = fp(segs).logits
        assert _rel(g(segs).logits, ref) < _rel(r(segs).logits, ref)


@pytest.mark.parametrize("mt", ["qwen3", "phi3", "gemma3_text"])
def test_weight_activation_calibration(mt, torch_backend):
    """W4A8 OmniQuant (per-token inputs, Q/K/V quantized per head, A_down on): every layer trains (no fallback to
    round-to-nearest) and the attention modules carry the activation bits."""
    model = _build(mt)
    segs = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(6))
    res = loop.calibrate(model, segs, QuantConfig(mode="omniquant", wbits=4, abits=8, group_size=None, epochs=1),
                         progress=False, say=lambda s: None)
    assert all(r["form"] == "diagonal" and not r["events"] for r in res["layers"])
    arch = models.arch_of(model)
    for layer in models.decoder_layers(model):
        assert layer.get_submodule(arch.attention).aq_qkv_abits == 8
        assert all(layer.get_submodule(n).abits == 8 for n in arch.linears)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_qkv_quantization_keeps_eager_attention(monkeypatch):
    """Q/K/V quantization wraps the model's own eager attention (Gemma 2's soft-capping of the scores stays), not
    sdpa: with 16 bits (no quantization) the logits are the eager model's, which differ from sdpa's."""
    from aq.qmodel import enable_qkv_quant

    model = _build("gemma2")
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for layer in models.decoder_layers(model):  # scores large enough for the soft-cap (5) to bite
            layer.self_attn.q_proj.weight.mul_(20)
        eager = model(IDS).logits
        model.config._attn_implementation = "sdpa"
        sdpa = model(IDS).logits  # transformers' sdpa path has no soft-capping
        model.config._attn_implementation = "eager"
        enable_qkv_quant(model)
        assert model.config._attn_implementation == "aq_qkv_eager"
        wrapped = model(IDS).logits
    assert _rel(sdpa, eager) > 1e-3 and torch.equal(wrapped, eager)
