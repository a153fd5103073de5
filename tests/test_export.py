"""Export to compressed-tensors pack-quantized: calibrate a tiny model, export, load it with plain transformers and get
aq's fake-quantized logits; runs that the format cannot express are refused before anything is written."""
import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

from aq import calibrate  # noqa: E402
from aq.calib.rtn import quantize_rtn  # noqa: E402
from aq.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from aq.config import QuantConfig  # noqa: E402
from aq.export import ExportError, export, main  # noqa: E402
from aq.patch import TransformedNorm  # noqa: E402
from tests.conftest import make_tokenizer, tiny_llama, tiny_opt  # noqa: E402

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _hf(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d).eval()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def _logits(m):
    return m(IDS).logits.float()


def test_calibrated_diagonal_run_round_trips_through_transformers(tiny_model_dir, data_dir, tmp_path):
    """AffineQuant W4A16g16 with diagonal norm transforms, the up -> down transform and the q/k and v/o transforms,
    exported by calibrate itself; transformers' model gives aq's logits in fp32."""
    out = tmp_path / "run"
    calibrate.main(["--model", str(tiny_model_dir), "--norm-transform", "diagonal", "--down-transform", "on",
                    "--group-size", "16", "--nsamples", "2", "--seqlen", "32", "--epochs", "1", "--eval-windows", "1",
                    "--skip-fp", "--no-progress", "--out", str(out), "--export-format", "compressed-tensors"])
    ct = out / "compressed-tensors"
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    (group,) = qc["config_groups"].values()
    want = {"num_bits": 4, "group_size": 16, "strategy": "group", "symmetric": False}
    assert want.items() <= group["weights"].items()
    assert qc["ignore"] == ["lm_head"]
    from safetensors import safe_open

    with safe_open(str(ct / "model.safetensors"), framework="pt") as f:
        qw = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        zp = f.get_tensor("model.layers.0.mlp.down_proj.weight_zero_point")
        assert "model.layers.0.mlp.down_proj.weight" not in f.keys()
    assert qw.dtype == torch.int32 and qw.shape == (64, 128 * 4 // 32) and zp.shape == (64 * 4 // 32, 128 // 16)
    ref = _logits(load_checkpoint(out))  # aq's fake-quantized model
    hf = _hf(ct)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert _rel(_logits(hf), ref) <= 1e-3
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(ct)("a fox").input_ids == AutoTokenizer.from_pretrained(out)("a fox").input_ids


@pytest.mark.parametrize("make,kw,cfg", [
    (tiny_llama, {"tie_word_embeddings": True}, QuantConfig(mode="rtn", wbits=3, group_size=None, symmetric=True)),
    (tiny_llama, {}, QuantConfig(mode="rtn", wbits=8, group_size=32)),
    (tiny_llama, {}, QuantConfig(mode="rtn", wbits=2, group_size=16)),
    (tiny_llama, {}, QuantConfig(mode="rtn", wbits=4, group_size=64)),  # two schemes, targeted by name
    (tiny_opt, {}, QuantConfig(mode="rtn", wbits=4, group_size=16)),  # biases on every linear, LayerNorm
])
def test_bits_groups_symmetry_and_biases_round_trip(make, kw, cfg, tmp_path):
    fq = quantize_rtn(make(**kw), cfg)
    save_checkpoint(fq, cfg, tmp_path / "ck")
    export(tmp_path / "ck", tmp_path / "ct", say=lambda m: None)
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    # groups of 64 are whole rows of the K = 64 linears: per channel there, groups in down_proj (K = 128)
    assert len(groups) == (2 if cfg.group_size == 64 else 1)
    for group in groups.values():
        w = group["weights"]
        per_channel = cfg.group_size is None or (cfg.group_size == 64 and "down_proj" not in str(group["targets"]))
        assert (w["num_bits"], w["symmetric"], w["strategy"]) == (cfg.wbits, cfg.symmetric,
                                                                  "channel" if per_channel else "group")
    hf = _hf(tmp_path / "ct")
    assert _rel(_logits(hf), _logits(fq)) <= 1e-6  # same codes, scales and zeros: equal up to float ordering
    if kw.get("tie_word_embeddings"):
        assert hf.lm_head.weight is hf.model.embed_tokens.weight


def test_a_stored_diagonal_norm_transform_is_folded_into_the_norm(tmp_path):
    cfg = QuantConfig(mode="rtn", wbits=4, group_size=16)
    fq = quantize_rtn(tiny_opt(), cfg)  # LayerNorm: weight and bias both scaled
    lay = fq.model.decoder.layers[0]
    lay.self_attn_layer_norm = TransformedNorm(lay.self_attn_layer_norm, 1 + 0.3 * torch.rand(64))
    save_checkpoint(fq, cfg, tmp_path / "ck")
    export(tmp_path / "ck", tmp_path / "ct", say=lambda m: None)
    assert _rel(_logits(_hf(tmp_path / "ct")), _logits(fq)) <= 1e-5  # norm(x) * w * t vs norm(x) * (w * t)


def test_a_bias_the_config_can_give_is_added_with_zeros_elsewhere(tmp_path):
    """A LLaMA o_proj with a bias (what shifts leave): attention_bias is switched on and q/k/v get zero biases."""
    cfg = QuantConfig(mode="rtn", wbits=4, group_size=16)
    fq = quantize_rtn(tiny_llama(), cfg)
    for lay in fq.model.layers:
        lay.self_attn.o_proj.bias = torch.nn.Parameter(torch.randn(64) * 0.1, requires_grad=False)
    save_checkpoint(fq, cfg, tmp_path / "ck")
    export(tmp_path / "ck", tmp_path / "ct", say=lambda m: None)
    hf = _hf(tmp_path / "ct")
    assert hf.config.attention_bias is True and not hf.config.mlp_bias
    assert torch.count_nonzero(hf.model.layers[0].self_attn.q_proj.bias) == 0
    assert _rel(_logits(hf), _logits(fq)) <= 1e-6


def test_a_bias_the_config_cannot_give_is_refused(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    cfg = QuantConfig(mode="rtn", wbits=4, group_size=16)
    fq = quantize_rtn(m, cfg)
    fq.model.layers[0].self_attn.o_proj.bias = torch.nn.Parameter(torch.randn(64), requires_grad=False)
    save_checkpoint(fq, cfg, tmp_path / "ck")
    with pytest.raises(ExportError, match=r"o_proj carry a bias .* --shifts off"):
        export(tmp_path / "ck", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_block_norm_transform_run_is_refused_before_any_work(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"--norm-transform diagonal"):
        calibrate.main(["--model", str(tiny_model_dir), "--norm-transform", "block:64", "--out", str(out),
                        "--export-format", "compressed-tensors"])
    assert not out.exists() and "loaded" not in capsys.readouterr().out  # refused before the model was loaded
    with pytest.raises(SystemExit, match=r"--abits 16"):
        calibrate.main(["--model", str(tiny_model_dir), "--wbits", "4", "--abits", "8", "--out", str(out),
                        "--export-format", "compressed-tensors"])
    with pytest.raises(SystemExit, match=r"needs --out"):
        calibrate.main(["--model", str(tiny_model_dir), "--norm-transform", "diagonal",
                        "--export-format", "compressed-tensors"])


def test_checkpoints_with_block_transforms_or_quantized_activations_are_refused(tmp_path):
    cfg = QuantConfig(mode="rtn", wbits=4, group_size=16)
    fq = quantize_rtn(tiny_llama(), cfg)
    lay = fq.model.layers[1]
    lay.input_layernorm = TransformedNorm(lay.input_layernorm, torch.eye(64) + 0.1 * torch.randn(1, 64, 64))
    save_checkpoint(fq, cfg, tmp_path / "block")
    with pytest.raises(SystemExit, match=r"block(diag)? transforms after its norms.*--norm-transform diagonal"):
        main(["--checkpoint", str(tmp_path / "block"), "--out", str(tmp_path / "ct")])
    cfg = QuantConfig(mode="rtn", wbits=4, abits=4)
    save_checkpoint(quantize_rtn(tiny_llama(), cfg), cfg, tmp_path / "w4a4")
    with pytest.raises(ExportError, match=r"abits=4.*--abits 16"):
        export(tmp_path / "w4a4", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_export_cli_and_its_output_folder(tmp_path, capsys):
    cfg = QuantConfig(mode="rtn", wbits=4, group_size=32)
    save_checkpoint(quantize_rtn(tiny_llama(), cfg), cfg, tmp_path / "ck", tokenizer=make_tokenizer(tmp_path))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(SystemExit, match="not an empty folder"):
        main(["--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "busy")])
    with pytest.raises(SystemExit, match="is the checkpoint folder itself"):
        main(["--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "ck")])
    main(["--checkpoint", str(tmp_path / "ck"), "--format", "compressed-tensors", "--out", str(tmp_path / "ct"),
          "--dtype", "bfloat16"])
    assert "W4g32" in capsys.readouterr().out
    files = {p.name for p in (tmp_path / "ct").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and "quant_config.json" not in files
    hf = _hf(tmp_path / "ct")
    assert hf.dtype == torch.bfloat16  # scales rounded to bf16: close to aq's, not equal
    assert _rel(_logits(hf), _logits(load_checkpoint(tmp_path / "ck"))) < 0.05


def test_calibrate_exports_without_out(tiny_model_dir, data_dir, tmp_path):
    """--export-out alone: the aq checkpoint goes to a temporary folder, only the export stays."""
    ct = tmp_path / "ct"
    calibrate.main(["--model", str(tiny_model_dir), "--mode", "rtn", "--group-size", "32", "--seqlen", "32",
                    "--eval-windows", "1", "--skip-fp", "--no-progress", "--export-format", "compressed-tensors",
                    "--export-out", str(ct)])
    assert (ct / "config.json").is_file() and not (ct / "quant_config.json").exists()
    from transformers import AutoModelForCausalLM

    ref = quantize_rtn(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                       QuantConfig(mode="rtn", wbits=4, group_size=32))
    assert _rel(_logits(_hf(ct)), _logits(ref)) <= 1e-6
