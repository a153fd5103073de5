"""GPTQ: the blocked Cholesky algorithm against a naive column-by-column OBS reference, its error against RTN, and
--mode gptq through the CLI."""
import json

import pytest
import torch

from aq import calibrate
from aq.calib.gptq import DAMP, Hessian, gptq_linear, gptq_quantize
from aq.qmodel import FakeQuantLinear
from aq.config import QuantConfig
from aq.primitives import choose_qparams, dequantize, fake_quant
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_gptq(W, H, bits, g, symmetric, act_order=False, static=False):
    """Column by column, no Cholesky: after rounding column i, update the other free columns by the OBS rule
    dW = -err * Hinv[i, :] / Hinv[i, i], then eliminate i from the inverse Hessian."""
    W, H = W.clone().double(), H.clone().double()
    N, K = W.shape
    g = g or K
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += DAMP * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    order = torch.argsort(torch.diag(H), descending=True).tolist() if act_order else list(range(K))
    static = static or act_order or g == K
    scale = torch.zeros(N, K // g, dtype=W.dtype)
    zero = torch.zeros_like(scale)
    if static:
        scale, zero = (t.double() for t in choose_qparams(W, bits, g, symmetric))
    Q = torch.zeros_like(W)
    for col in order:
        if not static and col % g == 0:
            s, z = choose_qparams(W[:, col:col + g], bits, None, symmetric)
            scale[:, col // g], zero[:, col // g] = s[:, 0], z[:, 0]
        s, z = scale[:, col // g], zero[:, col // g]
        q = torch.clamp(torch.round(W[:, col] / s) + z, 0, 2**bits - 1)
        Q[:, col] = q
        err = (W[:, col] - (q - z) * s) / Hinv[col, col]
        W -= err[:, None] * Hinv[col][None, :]
        W[:, col] = (q - z) * s
        Hinv -= Hinv[:, col:col + 1] @ Hinv[col:col + 1, :] / Hinv[col, col]
    return Q, scale, zero


def correlated(n, k, gen):
    """Inputs with correlated channels and uneven channel scales (so that GPTQ has something to exploit)."""
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    return (torch.randn(n, k, generator=gen) @ mix) * (0.2 + 3 * torch.rand(k, generator=gen))


@pytest.mark.parametrize("bits,g,symmetric,act_order,groups", [
    (4, 16, False, False, "dynamic"), (3, 32, True, False, "dynamic"), (4, None, False, False, "dynamic"),
    (2, 16, False, True, "dynamic"), (4, 16, False, False, "static"), (4, 48, False, False, "dynamic")])
def test_blocked_gptq_equals_naive_reference(bits, g, symmetric, act_order, groups):
    gen = torch.Generator().manual_seed(bits * 7 + (g or 0))
    N, K = 24, 96  # K not a multiple of the block used below: ragged last block
    W = torch.randn(N, K, generator=gen, dtype=torch.float64)
    X = correlated(400, K, gen).double()
    X[:, 5] = 0  # a dead input
    h = Hessian(K, "cpu", torch.float64)
    h.add(X[:150])
    h.add(X[150:])  # the running mean is the one-shot mean
    assert torch.allclose(h.H, 2 * X.T @ X / 400)
    Q, s, z = gptq_quantize(W, h.H, bits, g, symmetric, act_order=act_order, groups=groups, block=40)
    Qr, sr, zr = naive_gptq(W, h.H, bits, g, symmetric, act_order, groups == "static")
    assert torch.allclose(s, sr) and torch.allclose(z, zr)
    # rounding ties can flip a code in principle; none here, and the result is then exact to fp tolerance
    assert torch.equal(Q, Qr)
    assert int(Q.max()) <= 2**bits - 1 and int(Q.min()) >= 0
    assert torch.all(Q[:, 5] == z.repeat_interleave(g or K, 1)[:, 5])


@pytest.mark.parametrize("bits,g", [(4, 32), (3, None), (2, 16)])
def test_gptq_output_error_below_rtn(bits, g):
    gen = torch.Generator().manual_seed(bits)
    K, N = 128, 64
    lin = torch.nn.Linear(K, N)
    X, Xt = correlated(3072, K, gen).split([2048, 1024])  # Xt: held-out inputs of the same distribution
    h = Hessian(K, "cpu")
    h.add(X)
    cfg = QuantConfig(wbits=bits, group_size=g, mode="gptq")
    fq = gptq_linear(lin, h.H, cfg)
    rtn = FakeQuantLinear.from_linear(lin, bits, g)
    ref = lin(Xt)
    e_gptq, e_rtn = ((fq(Xt) - ref) ** 2).mean(), ((rtn(Xt) - ref) ** 2).mean()
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    # FakeQuantLinear invariants: the weight is exactly its codes dequantized
    assert torch.equal(dequantize(fq.codes(), fq.scale, fq.zero, g), fq.weight)


def test_gptq_identity_hessian_is_rtn():
    """With H = I nothing is correlated: GPTQ's updates vanish and it rounds to nearest (static qparams)."""
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    Q, s, z = gptq_quantize(W, torch.eye(64), 4, 16, groups="static")
    assert torch.equal(dequantize(Q, s, z, 16), fake_quant(W, 4, 16))


def test_mode_gptq_quantizes_every_layer_linear():
    from aq.calib.gptq import quantize_gptq

    model = tiny_llama()
    segs = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_gptq(model, segs, QuantConfig(mode="gptq", wbits=3, group_size=16), batch=2, progress=False,
                  say=lambda _m: None)
    fq = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    assert len(fq) == 2 * 7 and isinstance(model.lm_head, torch.nn.Linear)
    with pytest.raises(ValueError, match="weight-only"):
        quantize_gptq(tiny_llama(), segs, QuantConfig(mode="gptq", abits=8, group_size=None))


def test_cli_gptq_end_to_end(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    res = calibrate.main(["--model", str(tiny_model_dir), "--mode", "gptq", "--wbits", "3", "--group-size", "16",
                          "--act-order", "--nsamples", "4", "--seqlen", "64", "--eval-windows", "2", "--out", str(out),
                          "--no-progress"])
    assert "| GPTQ W3A16g16 |" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["mode"] == "gptq" and saved["config"]["act_order"] is True
    q = res["perplexity"]["GPTQ W3A16g16"]
    assert q["wikitext2"] != res["perplexity"]["FP"]["wikitext2"]
    from aq import data, load_checkpoint
    from aq.eval import perplexity
    from transformers import AutoTokenizer

    loaded = load_checkpoint(out)
    toks = data.eval_tokens(AutoTokenizer.from_pretrained(str(out)), "wikitext2")
    assert perplexity(loaded, toks, 64, 2) == pytest.approx(q["wikitext2"], rel=1e-5)
    with pytest.raises(SystemExit, match="weight-only"):
        calibrate.main(["--model", str(tiny_model_dir), "--mode", "gptq", "--abits", "8", "--nsamples", "2",
                        "--seqlen", "64", "--eval-windows", "1"])


@pytest.mark.parametrize("mode,extra", [("omniquant", []), ("affinequant", ["--abits", "8"])])
def test_cli_rounding_gptq(mode, extra, tiny_model_dir, data_dir, tmp_path, capsys):
    """Learned transforms and clipping, then GPTQ: the checkpoint holds codes on the learned clipping's qparams,
    loads back to the same perplexity, and differs from the round-to-nearest run of the same training."""
    from aq import data, load_checkpoint
    from aq.eval import perplexity
    from transformers import AutoTokenizer

    common = ["--model", str(tiny_model_dir), "--mode", mode, "--wbits", "3", "--nsamples", "2", "--seqlen", "64",
              "--epochs", "1", "--eval-windows", "2", "--no-progress", "--skip-fp", *extra]
    runs = {}
    for r in ("rtn", "gptq"):
        out = tmp_path / r
        res = calibrate.main(common + ["--rounding", r, "--out", str(out)])
        runs[r] = (out, res)
    (out, res), (out_rtn, _) = runs["gptq"], runs["rtn"]
    assert res["config"]["rounding"] == "gptq"
    loaded, ref = load_checkpoint(out), load_checkpoint(out_rtn)
    fq = {n: m for n, m in loaded.named_modules() if isinstance(m, FakeQuantLinear)}
    fq_rtn = {n: m for n, m in ref.named_modules() if isinstance(m, FakeQuantLinear)}
    assert fq and fq.keys() == fq_rtn.keys()
    # layer 0 trained on the same inputs (same seed): same clipping qparams, other codes; later layers see other inputs
    first = [n for n in fq if ".layers.0." in n]
    assert first and all(torch.equal(fq[n].scale, fq_rtn[n].scale) for n in first)
    assert any(not torch.equal(fq[n].weight, fq_rtn[n].weight) for n in fq)
    label = next(k for k in res["perplexity"])
    toks = data.eval_tokens(AutoTokenizer.from_pretrained(str(out)), "wikitext2")
    assert perplexity(loaded, toks, 64, 2) == pytest.approx(res["perplexity"][label]["wikitext2"], rel=1e-5)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="rounding"):
        calibrate.main(["--model", str(tiny_model_dir), "--mode", "rtn", "--rounding", "gptq", "--eval-windows", "1"])


def test_normalized_hessian_weighs_every_token_once():
    """gptq_hessian "normalized": H is that of the unit-norm rows, so a token with massive activations counts as much
    as any other (scaling it changes nothing), while the raw H follows it."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 37, 24, generator=g)
    big = x.clone()
    big[:, 0] *= 1000.0  # an attention-sink-like token
    raw, norm, norm_big, raw_big = (Hessian(24, "cpu", normalized=n) for n in (False, True, True, False))
    raw.add(x)
    norm.add(x)
    norm_big.add(big)
    raw_big.add(big)
    unit = x.reshape(-1, 24) / x.reshape(-1, 24).norm(dim=-1, keepdim=True)
    assert torch.allclose(norm.H, 2 * unit.T @ unit / unit.shape[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(norm_big.H, norm.H, rtol=1e-5, atol=1e-6)
    assert torch.allclose(raw.H, 2 * x.reshape(-1, 24).T @ x.reshape(-1, 24) / 74, rtol=1e-5, atol=1e-5)
    assert (raw_big.H - raw.H).abs().max() > 100 * raw.H.abs().max()
    with pytest.raises(ValueError, match="unknown GPTQ Hessian"):
        QuantConfig(mode="gptq", gptq_hessian="sqrt")


def test_cli_gptq_hessian_reaches_the_run(tiny_model_dir, data_dir, tmp_path):
    common = ["--model", str(tiny_model_dir), "--mode", "gptq", "--wbits", "3", "--group-size", "16", "--nsamples",
              "4", "--seqlen", "64", "--eval-windows", "1", "--no-progress", "--skip-fp"]
    res = {h: calibrate.main(common + ["--gptq-hessian", h, "--out", str(tmp_path / h)]) for h in ("raw", "normalized")}
    assert res["normalized"]["config"]["gptq_hessian"] == "normalized"
    saved = json.loads((tmp_path / "normalized" / "results.json").read_text())
    assert saved["config"]["gptq_hessian"] == "normalized"
    ppl = [r["perplexity"]["GPTQ W3A16g16"]["wikitext2"] for r in res.values()]
    assert ppl[0] != ppl[1]  # another Hessian, other codes
