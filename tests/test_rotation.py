"""Residual-stream rotation (aq.calib.rotation) and the block-wise losses (aq.calib.loss)."""
import pytest
import torch

from aq import calibrate
from aq.calib.loss import layer_loss, position0_share
from aq.calib.rotation import hadamard, rotate_residual, rotation_matrix
from aq.checkpoint import load_checkpoint
from tests.conftest import tiny_llama, tiny_opt


@pytest.mark.parametrize("d", [1, 2, 4, 12, 20, 64, 72, 192, 576, 896, 1536])
def test_hadamard_is_hadamard(d):
    H = hadamard(d)
    assert H.shape == (d, d) and bool((H.abs() == 1).all())
    assert torch.equal(H @ H.T, d * torch.eye(d, dtype=torch.float64))


def test_hadamard_refuses_orders_it_cannot_build():
    with pytest.raises(ValueError, match="use --rotate random"):
        hadamard(36)  # 36 = 4 * 9 and 9 - 1 is not prime; 36 = 2 * 18 and 17 = 1 mod 4


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotation_is_orthogonal_and_seeded(kind):
    Q = rotation_matrix(192, kind, seed=3)
    torch.testing.assert_close(Q @ Q.T, torch.eye(192, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(Q, rotation_matrix(192, kind, seed=3))
    assert not torch.equal(Q, rotation_matrix(192, kind, seed=4))
    if kind == "hadamard":  # flat: every entry +-1/sqrt(d)
        torch.testing.assert_close(Q.abs(), torch.full_like(Q, 192 ** -0.5))


@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("tied", [False, True])
def test_rotated_model_computes_the_same_function(kind, tied):
    """Random norm weights (so that folding them matters), tied or untied lm_head: same logits within 1e-4."""
    torch.manual_seed(1)
    model = tiny_llama(tie_word_embeddings=tied).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.rand_like(p) + 0.5)
    ids = torch.randint(0, 300, (2, 37))
    ref = model(ids).logits
    Q = rotate_residual(model, kind, seed=0)
    out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert not model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is not model.model.embed_tokens.weight
    assert all(bool((p == 1).all()) for n, p in model.named_parameters() if "norm" in n)
    # and the stream really is rotated: the embedding moved
    assert (model.model.embed_tokens.weight - model.model.embed_tokens.weight @ Q.T).abs().max() > 1e-3


def test_rotation_refuses_layernorm_models():
    with pytest.raises(ValueError, match="--rotate none"):
        rotate_residual(tiny_opt())


def test_token_loss_weighs_tokens_by_their_own_size():
    torch.manual_seed(0)
    target = torch.randn(2, 5, 8)
    target[:, 0] *= 100  # a sink token
    out = target + 0.1 * torch.randn_like(target)
    out[:, 0] = target[:, 0] * 1.01
    mse = layer_loss(out, target, "mse")
    torch.testing.assert_close(mse, ((out - target) ** 2).mean())
    per_token = ((out - target) ** 2).mean(-1) / (target ** 2).mean(-1)
    torch.testing.assert_close(layer_loss(out, target, "token"), per_token.mean(), rtol=1e-5, atol=0)
    w = torch.tensor([3.0, 1, 1, 1, 1])
    torch.testing.assert_close(layer_loss(out, target, "token", sink_weight=3.0),
                               (per_token * w).sum(-1).mean() / w.sum(), rtol=1e-5, atol=0)
    assert position0_share(out, target) > 0.9  # under mse the sink dominates
    with pytest.raises(ValueError, match="unknown loss"):
        layer_loss(out, target, "l1")


def test_cli_rotated_token_loss_run_round_trips(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """--rotate hadamard --loss token through the CLI: the run says so, its checkpoint (untied lm_head, unit norms)
    loads back to the same perplexity."""
    monkeypatch.setenv("AQ_BACKEND", "torch")
    out = tmp_path / "run"
    res = calibrate.main(["--model", str(tiny_model_dir), "--eval-windows", "1", "--no-progress", "--skip-fp",
                          "--mode", "omniquant", "--epochs", "1", "--nsamples", "2", "--seqlen", "64",
                          "--rotate", "hadamard", "--loss", "token", "--sink-weight", "2", "--out", str(out)])
    assert res["config"]["rotate"] == "hadamard" and res["config"]["loss"] == "token"
    assert all(0 <= r["pos0_probe"] <= 1 for r in res["layers"])
    from aq import eval as aq_eval

    model = load_checkpoint(out)
    assert not model.config.tie_word_embeddings
    # --seqlen 64 sets the evaluation windows too
    toks = aq_eval.eval_token_sets(calibrate.models.load_model(str(tiny_model_dir))[1], ["wikitext2"], 64)
    ppl = aq_eval.perplexities(model, None, toks, 64, 1, 1, "x")["wikitext2"]
    assert ppl == pytest.approx(res["perplexity"]["OmniQuant W4A16g64"]["wikitext2"], rel=1e-5)
