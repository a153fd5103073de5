"""Test setup: Triton runs interpreted on CPU tensors (set before any triton.jit decorator executes), and small
offline models and tokenizers are built from configs."""
import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Quantization maps floats to a few integers. ") * 40


def make_tokenizer(tmp_path):
    """A small byte-level BPE tokenizer trained on the spot (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_llama(vocab=300, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    cfg.update(kw)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_opt(vocab=300, **kw):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = dict(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, word_embed_proj_dim=64)
    cfg.update(kw)
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread, for modules of tiny-model tests: on a shared 2-core machine torch's thread pool spinning
    against other processes made them ~40x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny GQA LLaMA with its tokenizer, loadable by path."""
    d = tmp_path / "tiny-llama"
    # a context of 2048 (LLaMA's positions have no parameters: same weights as tiny_llama()), so that the CLIs'
    # default 2048-token evaluation windows fit it
    tiny_llama(max_position_embeddings=2048).save_pretrained(d)
    make_tokenizer(tmp_path).save_pretrained(d)
    return d


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A small data folder with the layout of ../shared/data, pointed to by AQ_DATA_DIR."""
    import json

    d = tmp_path / "data"
    (d / "wikitext-2-raw-v1").mkdir(parents=True)
    (d / "c4").mkdir()
    rows = [{"text": f" = Section {i} = \n {TEXT[: 200 + 7 * i]}"} for i in range(40)]
    (d / "wikitext-2-raw-v1" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    docs = [{"text": f"doc {i}: {TEXT[: 100 + 3 * i]}", "url": "", "timestamp": ""} for i in range(1000)]
    (d / "c4" / "c4-train.00000-of-01024.first1000.jsonl").write_text("\n".join(json.dumps(r) for r in docs))
    monkeypatch.setenv("AQ_DATA_DIR", str(d))
    return d


@pytest.fixture(scope="session", autouse=True)
def gguf_cache(tmp_path_factory):
    """Converted GGUF files go to a folder of this test session, not the user's ~/.cache/aq."""
    old = os.environ.get("AQ_CACHE_DIR")
    os.environ["AQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("aq-cache"))
    yield
    if old is None:
        os.environ.pop("AQ_CACHE_DIR", None)
    else:
        os.environ["AQ_CACHE_DIR"] = old
