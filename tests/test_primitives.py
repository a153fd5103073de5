import pytest
import torch

from aq import primitives as P


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group", [None, 16, 48])
def test_asymmetric_roundtrip_error_is_at_most_half_a_step(bits, group):
    torch.manual_seed(bits)
    x = torch.randn(7, 96) * 2 + 0.3
    s, z = P.choose_qparams(x, bits, group)
    q = P.quantize(x, s, z, bits, group)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1
    err = (P.dequantize(q, s, z, group) - x).abs()
    g = group or 96
    step = s.repeat_interleave(g, dim=-1)
    assert (err <= step / 2 + 1e-6).all()


def test_range_includes_zero_and_zero_is_exact():
    x = torch.rand(4, 32) + 1.0  # all positive: min is extended to 0
    s, z = P.choose_qparams(x, 4, None)
    assert torch.equal(z, torch.zeros_like(z))
    x[:, 3] = 0.0
    assert (P.fake_quant(x, 4)[:, 3] == 0).all()


def test_symmetric_zero_point_and_range():
    x = torch.randn(5, 64)
    s, z = P.choose_qparams(x, 4, None, symmetric=True)
    assert torch.equal(z, torch.full_like(z, 8.0))
    assert s.shape == (5, 1) and torch.allclose(s[:, 0], x.abs().amax(-1) / 7)


def test_constant_group_does_not_divide_by_zero():
    x = torch.zeros(3, 64)
    x[1] = 5.0
    y = P.fake_quant(x, 3, 32)
    assert torch.isfinite(y).all() and torch.allclose(y, x, atol=1e-4)


def test_round_half_to_even_like_torch_round():
    # values landing exactly on .5 steps: scale 1 (range [0, 15] at 4 bits), codes 0.5, 1.5, 2.5 -> 0, 2, 2
    x = torch.tensor([[0.0, 15.0, 0.5, 1.5, 2.5, 3.5]])
    s, z = P.choose_qparams(x, 4, None)
    assert s.item() == 1.0
    assert P.quantize(x, s, z, 4).tolist() == [[0, 15, 0, 2, 2, 4]]


def test_clipping_factors_shrink_the_range():
    x = torch.randn(4, 64)
    s0, _ = P.choose_qparams(x, 4, 32)
    s1, _ = P.choose_qparams(x, 4, 32, clip_max=torch.full((4, 2), 0.5), clip_min=torch.full((4, 2), 0.5))
    assert torch.allclose(s1, s0 * 0.5)


@pytest.mark.parametrize("bits", [1, 9, 0, 16, 4.0])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="unsupported bits"):
        P.fake_quant(torch.randn(2, 8), bits)


def test_group_must_divide_k():
    with pytest.raises(ValueError, match="group size 48 does not divide the input dimension K=64"):
        P.fake_quant(torch.randn(2, 64), 4, 48)
