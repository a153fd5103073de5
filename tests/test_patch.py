import copy

import pytest
import torch

from aq.calib.rtn import quantize_rtn
from aq.config import QuantConfig
from aq.kernels.w4a16 import dequantize_weight
from aq.models import arch_of
from aq.deploy import DeferredNorm, FusedNorm, QuantEmbedding, W4A4Linear, W4A16Linear, W8A8Linear
from aq.patch import kernel_for, patch_model, patched_summary, weight_bytes
from aq.primitives import fake_quant
from aq.qmodel import FakeQuantLinear, TransformedNorm
from tests.conftest import tiny_llama, tiny_opt

IDS = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))


def rel(a, b):
    return ((a.float() - b.float()).norm() / a.float().norm()).item()


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(ids).logits


def _norms(model):
    if model.config.model_type == "opt":
        return [(lay, "self_attn_layer_norm", "final_layer_norm") for lay in model.model.decoder.layers]
    return [(lay, "input_layernorm", "post_attention_layernorm") for lay in model.model.layers]


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_w4a16_patched_matches_fake_quant_in_bf16(make):
    fq32 = quantize_rtn(make(), QuantConfig(wbits=4, abits=16, group_size=32))
    fq = copy.deepcopy(fq32).to(torch.bfloat16)
    ref, ref32 = logits(fq), logits(fq32)
    noise = rel(ref32, ref)  # what bf16 alone does to the fake-quant model's logits (~0.5% on this random model)
    fq_lin = {n: m for n, m in fq.named_modules() if isinstance(m, FakeQuantLinear)}
    pm = patch_model(copy.deepcopy(fq))
    s = patched_summary(pm)
    n_layers = 2
    # q/k/v and the MLP inputs each run as one fused kernel call; every norm runs aq's norm kernel
    assert s["W4A16Linear"] == 4 * n_layers and s["FakeQuantLinear"] == 0
    mlp_in = len(arch_of(fq).mlp_in)
    assert s["ProjectionSlice"] == n_layers * (3 + (mlp_in if mlp_in > 1 else 0))
    assert s["FusedNorm"] == 2 * n_layers + 1
    assert type(pm.lm_head) is torch.nn.Linear and type(pm.get_input_embeddings()) is torch.nn.Embedding
    unfused = patch_model(copy.deepcopy(fq), fuse_projections=False, norm_kernel=False)
    assert patched_summary(unfused)["W4A16Linear"] == len(fq_lin)
    for n, m in fq_lin.items():  # same codes; only the scale's rounding to bf16 differs (<= 2^-8 relative)
        w = unfused.get_submodule(n).dequantized_weight(torch.float32)
        assert torch.allclose(w, m.weight.float(), rtol=2**-7, atol=1e-6)
    assert rel(ref, logits(unfused)) < 1e-2
    # aq's norm kernel keeps fp32 where HF rounds to bf16: judge the patched model against the fp32 fake-quant one
    assert rel(ref32, logits(pm)) < 2 * noise


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("fuse", [True, False])
def test_w4a4_patched_is_the_fake_quant_model_in_fp32(make, fuse):
    fq = quantize_rtn(make(), QuantConfig(wbits=4, abits=4, group_size=None))
    pm = patch_model(copy.deepcopy(fq), fuse_norm=fuse)
    s = patched_summary(pm)
    assert s["W4A4Linear"] == 8 and s["FusedProjections"] == (4 if make is tiny_llama else 2)
    assert s["DeferredNorm"] == (4 if fuse else 0)
    if fuse:  # every consumer of a norm quantizes the raw residual stream with the norm fused in
        lay, attn_norm, _ = _norms(pm)[0]
        assert isinstance(getattr(lay, attn_norm), DeferredNorm)
        assert lay.self_attn.q_proj._fused[0].linear._norm_site[0] is getattr(lay, attn_norm)
        assert not lay.get_submodule(arch_of(pm).module("o"))._norm_site
    # integer GEMM + exact per-token codes: the fp32 fake-quant model up to float summation order
    assert rel(logits(fq), logits(pm)) < 1e-5


def test_patch_of_a_plain_model_equals_patch_of_its_rtn_model():
    cfg = QuantConfig(wbits=3, abits=16, group_size=16)
    a = patch_model(tiny_llama(), cfg)
    b = patch_model(quantize_rtn(tiny_llama(), cfg))
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na


@pytest.mark.parametrize("form", ["diagonal", "block"])
@pytest.mark.parametrize("abits", [16, 4])
def test_norm_transforms_run_inside_the_norm_kernel(form, abits):
    torch.manual_seed(1)
    model = tiny_llama()
    for lay, attn_norm, mlp_norm in _norms(model):
        for site in (attn_norm, mlp_norm):
            t = torch.rand(64) + 0.5 if form == "diagonal" else torch.eye(16) + 0.1 * torch.randn(4, 16, 16)
            setattr(lay, site, TransformedNorm(getattr(lay, site), t))
    cfg = QuantConfig(wbits=4, abits=abits, group_size=32 if abits == 16 else None)
    fq = quantize_rtn(model, cfg)
    pm = patch_model(copy.deepcopy(fq))
    s = patched_summary(pm)
    assert s["TransformedNorm"] == 0  # no dense matmul left after any norm
    if abits == 16:
        assert s["FusedNorm"] == 5 and all(m.transform is not None for n, m in pm.named_modules()
                                           if isinstance(m, FusedNorm) and "layers" in n)
    else:
        assert s["DeferredNorm"] == 4
    assert rel(logits(fq), logits(pm)) < (1e-5 if abits < 16 else 1e-2)


def test_a_full_transform_stays_a_dense_matmul_with_a_warning():
    model = tiny_llama()
    lay = model.model.layers[0]
    lay.input_layernorm = TransformedNorm(lay.input_layernorm, torch.eye(64) + 0.01 * torch.randn(64, 64))
    fq = quantize_rtn(model, QuantConfig(wbits=4, abits=16, group_size=32))
    with pytest.warns(UserWarning, match="dense matmul"):
        pm = patch_model(copy.deepcopy(fq))
    assert isinstance(pm.model.layers[0].input_layernorm, TransformedNorm)
    assert rel(logits(fq), logits(pm)) < 1e-2


def test_lm_head_and_embeddings_on_request_and_generate():
    cfg = QuantConfig(wbits=4, abits=16, group_size=32)
    base = tiny_llama().to(torch.bfloat16)
    pm = patch_model(copy.deepcopy(base), cfg)
    before = weight_bytes(pm)
    patch_model(pm, cfg, lm_head=True, embeddings=True)
    assert isinstance(pm.lm_head, W4A16Linear) and isinstance(pm.model.embed_tokens, QuantEmbedding)
    assert weight_bytes(pm) < 0.75 * before
    emb = pm.model.embed_tokens(IDS)
    ref = fake_quant(base.model.embed_tokens.weight.float(), 4, 32)[IDS]
    assert torch.allclose(emb.float(), ref, rtol=2**-7, atol=1e-6)
    ref_model = quantize_rtn(copy.deepcopy(base), cfg)  # the same model with head and embeddings fake-quantized
    with torch.no_grad():
        for m in (ref_model.lm_head, ref_model.model.embed_tokens):
            m.weight.copy_(fake_quant(m.weight.float(), 4, 32))
    assert rel(logits(ref_model), logits(pm)) < 2e-2  # bf16 logits of ~0.1 on a random model: rounding-level
    out = pm.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("wbits,abits", [(4, 4), (8, 8)])  # W4A4Linear, W8A8Linear (decode: one token a call)
def test_generate_matches_the_fake_quant_model(wbits, abits):
    fq = quantize_rtn(tiny_llama(), QuantConfig(wbits=wbits, abits=abits, group_size=None))
    pm = patch_model(copy.deepcopy(fq))
    a = fq.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False)
    b = pm.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


# every setting aq calibrates (issue 16): (wbits, abits, group) -> the module that serves it
SETTINGS = [(8, 8, None, W8A8Linear), (6, 6, None, W8A8Linear), (8, 8, 32, W8A8Linear), (4, 4, 32, W8A8Linear),
            (4, 8, None, W8A8Linear), (4, 4, None, W4A4Linear), (3, 16, 64, W4A16Linear), (2, 16, 64, W4A16Linear)]


@pytest.mark.parametrize("wbits,abits,group,kind", SETTINGS,
                         ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_every_calibrated_setting_is_served_like_its_fake_quant_model(wbits, abits, group, kind, one_thread):
    fq = quantize_rtn(tiny_llama(), QuantConfig(wbits=wbits, abits=abits, group_size=group, mode="rtn"))
    pm = patch_model(copy.deepcopy(fq))
    s = patched_summary(pm)
    assert s[kind.__name__] == 8 and s["FakeQuantLinear"] == 0  # q/k/v, gate/up joined: 4 per layer, 2 layers
    assert isinstance(pm.model.layers[0].mlp.down_proj, kind)
    ref = logits(fq)
    if abits < 16:
        # integer GEMM on exact per-token codes, fp32 epilogue: the fp32 fake-quant model up to summation order
        # (a wrong code, zero point or scale anywhere moves the logits by > 1e-3)
        assert s["DeferredNorm"] == 4 and rel(ref, logits(pm)) < 1e-5
    else:
        # the weight-only kernel computes in bf16: within twice what bf16 alone does to the fake-quant model
        noise = rel(ref, logits(copy.deepcopy(fq).to(torch.bfloat16)))
        assert rel(ref, logits(pm)) < 2 * noise


def test_kernel_for_is_the_one_dispatch():
    assert kernel_for(4, 16, 64, 128) == "w4a16" and kernel_for(8, 16, None, 128) == "w4a16"
    assert kernel_for(4, 4, None, 128) == "w4a4" and kernel_for(3, 7, 128, 128) == "w4a4"  # one group = per channel
    assert kernel_for(8, 8, None, 128) == kernel_for(6, 6, None, 128) == kernel_for(4, 4, 64, 128) == "w8a8"
    assert kernel_for(4, 8, None, 128) == kernel_for(5, 4, None, 128) == "w8a8"


def test_patch_refuses_what_has_no_kernel():
    with pytest.raises(ValueError, match="nothing to patch"):
        patch_model(tiny_llama())
    with pytest.raises(ValueError, match="needs a QuantConfig"):
        patch_model(quantize_rtn(tiny_llama(), QuantConfig()), lm_head=True)


def test_patched_modules_move_with_the_model_and_run_the_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("AQ_BACKEND", "torch")  # the plain-torch path a CPU machine without the interpreter uses
    fq = quantize_rtn(tiny_llama(), QuantConfig(wbits=4, abits=16, group_size=32))
    pm = patch_model(copy.deepcopy(fq))
    lin = pm.model.layers[0].self_attn.o_proj
    assert isinstance(lin, W4A16Linear) and lin.qweight.dtype == torch.int32
    assert torch.equal(dequantize_weight(lin.packed, torch.float32), lin.dequantized_weight(torch.float32))
    assert rel(logits(fq), logits(pm)) < 1e-2
    assert isinstance(pm.model.layers[0].mlp.down_proj, W4A16Linear)
    assert not any(isinstance(m, W4A4Linear) for m in pm.modules())
    assert isinstance(pm.model.norm, FusedNorm)  # the norm kernel's torch reference runs here


@pytest.mark.parametrize("abits,fuse_projections", [(16, True), (4, True), (4, False)])
def test_shared_results_are_never_reused_across_calls(abits, fuse_projections):
    """q/k/v share one computation per call; a second call on the same input tensor object (as a CUDA-graph capture
    after its warm-up, with static input buffers) must compute again and see the current weights."""
    cfg = QuantConfig(wbits=4, abits=abits, group_size=32 if abits == 16 else None)
    pm = patch_model(quantize_rtn(tiny_llama(), cfg), fuse_projections=fuse_projections)
    att = pm.model.layers[0].self_attn
    x = torch.randn(1, 3, 64)
    if abits < 16:
        site = pm.model.layers[0].input_layernorm
        assert isinstance(site, DeferredNorm) and site.consumers == (1 if fuse_projections else 3)
    with torch.no_grad():
        first = [att.q_proj(x), att.k_proj(x), att.v_proj(x)]
        if fuse_projections:
            lin = att.q_proj._fused[0].linear
        else:
            lin = att.k_proj
        buf = lin.scales if abits == 16 else lin.w_scale
        buf.mul_(2)  # change the weights in place; the input object stays the same
        again = [att.q_proj(x), att.k_proj(x), att.v_proj(x)]
    changed = [not torch.allclose(a, b) for a, b in zip(first, again)]
    assert changed == ([True, True, True] if fuse_projections else [False, True, False])
