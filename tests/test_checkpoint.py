import json

import pytest
import torch

import aq
from aq.calib.rtn import quantize_rtn
from aq.checkpoint import CheckpointError, MANIFEST, TENSORS, load_checkpoint, read_manifest, save_checkpoint
from aq.packing import pack_storage_codes, unpack_storage_codes
from aq.config import QuantConfig
from aq.deploy import W4A4Linear, W8A8Linear
from aq.patch import patched_summary
from aq.qmodel import FakeQuantLinear, TransformedNorm
from tests.conftest import make_tokenizer, tiny_llama, tiny_opt

IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def resign(d, man=None, tensors=None):
    """Rewrite a checkpoint as a writer that skipped aq's checks would: the manifest (and tensors) given, re-hashed,
    so that what is refused is the content, not the integrity check."""
    from safetensors.torch import load_file, save_file

    from aq.checkpoint import FORMAT, VERSION, _body_sha256, _sha256

    man = man if man is not None else json.loads((d / MANIFEST).read_text())
    tensors = tensors if tensors is not None else load_file(str(d / TENSORS))
    save_file(tensors, str(d / TENSORS), metadata={"format": FORMAT, "version": str(VERSION),
                                                   "manifest_sha256": _body_sha256(man)})
    man["tensors"].update(bytes=(d / TENSORS).stat().st_size, sha256=_sha256(d / TENSORS))
    (d / MANIFEST).write_text(json.dumps(man))


def logits(m):
    with torch.no_grad():
        return m(IDS).logits


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_code_packing_round_trips(bits):
    codes = torch.randint(0, 2**bits, (5, 48), dtype=torch.uint8)
    packed = pack_storage_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 48 * (2 if bits == 2 else 4 if bits <= 4 else 8) // 8)
    assert torch.equal(unpack_storage_codes(packed, bits, 48), codes)


@pytest.mark.parametrize("make,kw", [(tiny_llama, {}), (tiny_llama, {"tie_word_embeddings": True}), (tiny_opt, {})])
def test_save_load_round_trip_is_exact(make, kw, tmp_path):
    cfg = QuantConfig(wbits=3, abits=16, group_size=16)
    fq = quantize_rtn(make(**kw), cfg)
    if make is tiny_llama:  # a norm-side transform left by calibration travels too
        lay = fq.model.layers[1]
        lay.input_layernorm = TransformedNorm(lay.input_layernorm, torch.eye(16) + 0.1 * torch.randn(4, 16, 16))
    save_checkpoint(fq, cfg, tmp_path / "ck", tokenizer=make_tokenizer(tmp_path), base_model="tiny")
    man = read_manifest(tmp_path / "ck")
    assert man["quant_config"]["wbits"] == 3 and man["base_model"] == "tiny"
    assert len(man["linears"]) == sum(isinstance(m, FakeQuantLinear) for m in fq.modules())
    if kw.get("tie_word_embeddings"):
        assert man["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    m2 = load_checkpoint(tmp_path / "ck")  # built from the saved config alone
    assert torch.equal(logits(fq), logits(m2))
    for n, m in fq.named_modules():
        if isinstance(m, FakeQuantLinear):
            m2l = m2.get_submodule(n)
            assert isinstance(m2l, FakeQuantLinear) and torch.equal(m2l.codes(), m.codes())
            assert torch.equal(m2l.scale, m.scale)
    if kw.get("tie_word_embeddings"):
        assert m2.lm_head.weight is m2.model.embed_tokens.weight
    assert (tmp_path / "ck" / "tokenizer.json").is_file()


def test_load_into_a_given_model_and_patched(tmp_path):
    cfg = QuantConfig(wbits=4, abits=4, group_size=None)
    fq = quantize_rtn(tiny_llama(), cfg)
    save_checkpoint(fq, cfg, tmp_path / "ck")
    into = tiny_llama()
    torch.nn.init.zeros_(into.model.norm.weight)  # every tensor comes from the checkpoint
    m = load_checkpoint(tmp_path / "ck", model=into)
    assert m is into and torch.equal(logits(fq), logits(m))
    pm = aq.load_checkpoint(tmp_path / "ck", patch=True)
    assert patched_summary(pm)["W4A4Linear"] == 8 and isinstance(pm.model.layers[0].mlp.down_proj, W4A4Linear)
    ref = logits(fq)
    assert ((logits(pm) - ref).norm() / ref.norm()) < 1e-5


def test_a_w6a6_checkpoint_loads_patched(tmp_path):
    cfg = QuantConfig(wbits=6, abits=6, group_size=None, mode="rtn")
    fq = quantize_rtn(tiny_llama(), cfg)
    save_checkpoint(fq, cfg, tmp_path / "ck")
    pm = aq.load_checkpoint(tmp_path / "ck", patch=True)
    assert patched_summary(pm)["W8A8Linear"] == 8 and isinstance(pm.model.layers[0].mlp.down_proj, W8A8Linear)
    ref = logits(fq)
    assert ((logits(pm) - ref).norm() / ref.norm()) < 1e-5


def test_a_checkpoint_for_another_model_is_refused(tmp_path):
    cfg = QuantConfig(wbits=4, abits=16, group_size=32)
    save_checkpoint(quantize_rtn(tiny_llama(), cfg), cfg, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="another model: hidden_size: checkpoint 64, model 128"):
        load_checkpoint(tmp_path / "ck", model=tiny_llama(hidden_size=128, intermediate_size=256))
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        load_checkpoint(tmp_path / "ck", model=tiny_llama(num_hidden_layers=3))
    with pytest.raises(CheckpointError, match="another model: model_type"):
        load_checkpoint(tmp_path / "ck", model=tiny_opt())


def test_truncated_altered_and_incomplete_checkpoints_are_refused(tmp_path):
    cfg = QuantConfig(wbits=4, abits=16, group_size=32)
    d = tmp_path / "ck"
    save_checkpoint(quantize_rtn(tiny_llama(), cfg), cfg, d)
    blob = (d / TENSORS).read_bytes()
    (d / TENSORS).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(d)
    altered = bytearray(blob)
    altered[-3] ^= 0xFF
    (d / TENSORS).write_bytes(bytes(altered))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(d)
    (d / TENSORS).write_bytes(blob)
    man = json.loads((d / MANIFEST).read_text())
    man["linears"]["model.layers.5.mlp.up_proj"] = dict(man["linears"]["model.layers.0.mlp.up_proj"])
    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="manifest was edited"):
        load_checkpoint(d)
    resign(d, man)
    with pytest.raises(CheckpointError, match="model.layers.5.mlp.up_proj: no such module"):
        load_checkpoint(d)
    man["version"] = 99
    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(d)
    (d / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="quant_config.json is missing"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file

    cfg = QuantConfig(wbits=4, abits=16, group_size=32)
    d = tmp_path / "ck"
    save_checkpoint(quantize_rtn(tiny_llama(), cfg), cfg, d)
    t = load_file(str(d / TENSORS))
    del t["model.layers.1.self_attn.k_proj.scale"]
    resign(d, tensors=t)
    with pytest.raises(CheckpointError, match="no tensor 'model.layers.1.self_attn.k_proj.scale'"):
        load_checkpoint(d)


def test_saving_a_model_without_quantized_linears_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no FakeQuantLinear"):
        save_checkpoint(tiny_llama(), QuantConfig(), tmp_path / "ck")
    assert not (tmp_path / "ck" / MANIFEST).exists()


def test_eval_cli_reads_a_checkpoint(tmp_path, data_dir):
    from aq import eval as aq_eval

    cfg = QuantConfig(wbits=4, abits=4, group_size=None, mode="rtn")
    fq = quantize_rtn(tiny_llama(), cfg)
    save_checkpoint(fq, cfg, tmp_path / "ck", tokenizer=make_tokenizer(tmp_path))
    args = ["--checkpoint", str(tmp_path / "ck"), "--tasks", "wikitext2", "--seqlen", "64", "--eval-windows", "2",
            "--device", "cpu", "--dtype", "float32"]
    fake = aq_eval.main(args)
    patched = aq_eval.main(args + ["--patch"])
    assert fake["setting"] == "RTN W4A4" and patched["setting"] == "RTN W4A4 (aq kernels)"
    assert patched["perplexity"]["wikitext2"] == pytest.approx(fake["perplexity"]["wikitext2"], rel=1e-4)


# ---- issue 16: every file a checkpoint is read from is verified (one test per row of the table)
def _saved(tmp_path, wbits=4):
    cfg = QuantConfig(wbits=wbits, abits=16, group_size=32)
    d = tmp_path / "ck"
    save_checkpoint(quantize_rtn(tiny_llama(), cfg), cfg, d)
    return d


@pytest.mark.parametrize("field,value", [("rms_norm_eps", 1e-2), ("hidden_act", "gelu")])
def test_a_config_json_that_disagrees_is_refused_naming_the_field(tmp_path, field, value):
    d = _saved(tmp_path)
    c = json.loads((d / "config.json").read_text())
    c[field] = value
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match=f"config.json differs .*{field}: checkpoint .*, config.json {value!r}"):
        load_checkpoint(d)
    c = json.loads((d / "config.json").read_text())
    c[field] = json.loads((d / MANIFEST).read_text())["model_config"][field]
    c["use_cache"] = not c.get("use_cache")  # a field that does not change the computation: still not the file written
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="not the one written"):
        load_checkpoint(d)


@pytest.mark.parametrize("bits", [2, 8, 3])
def test_a_manifest_with_other_bits_than_stored_is_refused(tmp_path, bits):
    d = _saved(tmp_path, wbits=4)
    man = json.loads((d / MANIFEST).read_text())
    name = "model.layers.0.self_attn.q_proj"
    man["linears"][name]["wbits"] = bits
    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="manifest was edited"):  # the integrity check
        load_checkpoint(d)
    resign(d, man)  # and the content check, for a manifest whose hash was rewritten to match
    match = "not how the codes were stored" if bits in (2, 8) else "exceed 7"
    with pytest.raises(CheckpointError, match=f"{name}: .*{match}"):
        load_checkpoint(d)


def test_a_manifest_with_other_groups_than_stored_is_refused(tmp_path):
    d = _saved(tmp_path)
    man = json.loads((d / MANIFEST).read_text())
    man["linears"]["model.layers.0.mlp.down_proj"]["group_size"] = 16
    resign(d, man)
    with pytest.raises(CheckpointError, match="down_proj: .*group size disagrees"):
        load_checkpoint(d)


@pytest.mark.parametrize("field,value", [("rope_theta", 1234.0), ("rms_norm_eps", 1e-3), ("hidden_act", "gelu")])
def test_a_base_model_with_other_computation_fields_is_refused(tmp_path, field, value):
    d = _saved(tmp_path)
    into = tiny_llama()
    if field == "rope_theta":  # transformers 5 keeps it in rope_parameters
        into.config.rope_parameters = dict(into.config.rope_parameters, rope_theta=value)
        field = "rope_parameters"
    else:
        setattr(into.config, field, value)
    with pytest.raises(CheckpointError, match=f"another model: {field}: checkpoint"):
        load_checkpoint(d, model=into)
    load_checkpoint(d, model=tiny_llama())  # the same config loads


def test_format_version_1_is_refused_with_the_reason(tmp_path):
    d = _saved(tmp_path)
    man = json.loads((d / MANIFEST).read_text())
    man["version"] = 1
    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="version 1 .*not covered by the integrity check"):
        load_checkpoint(d)


def test_the_block_form_named_blockdiag_by_earlier_writers_loads_and_symmetry_travels(tmp_path):
    """Version-2 checkpoints written before aq.qmodel call the block form 'blockdiag' and may lack 'symmetric': they
    load as written; an unknown form is refused naming it; a symmetric model comes back symmetric."""
    cfg = QuantConfig(wbits=4, abits=16, group_size=16, symmetric=True)
    fq = quantize_rtn(tiny_llama(), cfg)
    lay = fq.model.layers[0]
    lay.post_attention_layernorm = TransformedNorm(lay.post_attention_layernorm,
                                                   torch.eye(16) + 0.1 * torch.randn(4, 16, 16))
    d = tmp_path / "ck"
    save_checkpoint(fq, cfg, d)
    assert all(m.symmetric for m in load_checkpoint(d).modules() if isinstance(m, FakeQuantLinear))
    man = json.loads((d / MANIFEST).read_text())
    site = "model.layers.0.post_attention_layernorm"
    assert man["norm_transforms"][site]["form"] == "block"
    man["norm_transforms"][site]["form"] = "blockdiag"
    for info in man["linears"].values():
        del info["symmetric"]
    resign(d, man)
    m = load_checkpoint(d)
    assert isinstance(m.model.layers[0].post_attention_layernorm, TransformedNorm)
    assert torch.equal(logits(m), logits(fq))
    man["norm_transforms"][site]["form"] = "banded"
    resign(d, man)
    with pytest.raises(CheckpointError, match="unknown form 'banded'"):
        load_checkpoint(d)
