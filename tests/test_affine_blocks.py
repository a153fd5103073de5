"""The "blocks" path of the affine kernels (batched products over the diagonal blocks of a block-diagonal transform)
against the dense path and the torch reference: values and gradients, on random ragged shapes."""
import pytest
import torch

from aq.kernels import affine as AF


def _dominant(d, g, scale=0.3):
    return torch.diag(1 + 0.5 * torch.rand(d, generator=g)) + scale / d * torch.randn(d, d, generator=g)


def _grads(fn, *ts):
    ts = [t.detach().clone().requires_grad_(True) for t in ts]
    y = fn(*ts)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * gy).sum().backward()
    return [y.detach()] + [t.grad for t in ts]


def _close(a, b, tol=2e-5):
    for x, y in zip(a, b):
        assert float((x - y).abs().max() / y.abs().max().clamp(min=1e-12)) < tol


@pytest.mark.parametrize("d,block,band", [(96, 32, 32), (96, 32, 5), (48, 16, 1), (64, 64, 64)])
def test_blocks_path_matches_dense_and_reference(d, block, band):
    g = torch.Generator().manual_seed(d + band)
    A = _dominant(d, g)
    w = torch.randn(37, d, generator=g)           # ragged row count
    x = torch.randn(3, 11, d, generator=g)
    alpha = 0.7
    for path in ("dense", "blocks", "deterministic"):
        _close(_grads(lambda w_, A_, path=path: AF.masked_weight(w_, A_, band, block, alpha, gemm=path), w, A),
               _grads(lambda w_, A_: AF.masked_weight_reference(w_, A_, band, block, alpha), w, A))
        _close(_grads(lambda x_, A_, path=path: AF.masked_inverse_act(x_, A_, band, block, alpha, gemm=path), x, A),
               _grads(lambda x_, A_: AF.masked_inverse_act_reference(x_, A_, band, block, alpha), x, A))
        u = torch.randn(37, d // 16, generator=g) + 3
        got = _grads(lambda w_, A_, u_, path=path: AF.transform_fake_quant(w_, A_, 4, 16, band, block, alpha, u_,
                                                                           None, gemm=path), w, A, u)
        ref = _grads(lambda w_, A_, u_: AF.transform_fake_quant(w_, A_, 4, 16, band, block, alpha, u_, None,
                                                                gemm="dense"), w, A, u)
        _close(got[:3], ref[:3], 1e-4)  # values, dW, dA (the LWC gradient is a sum of rounding residuals)
    # a transposed transform (HeadTransform passes A.T) and its margin
    y, m = AF.masked_inverse_act(x, A.T, band, block, alpha, gemm="blocks", return_margin=True)
    y0, m0 = AF.masked_inverse_act(x, A.T, band, block, alpha, gemm="dense", return_margin=True)
    _close([y], [y0])
    assert abs(m - m0) < 1e-12


def test_blocks_inverse_checks_dominance():
    A = torch.eye(32)
    A[0, 1] = 2.0  # row 0 not dominant
    with pytest.raises(ValueError, match="T: transform is not strictly diagonally dominant"):
        AF.masked_inverse_act(torch.randn(4, 32), A, None, 16, 1.0, name="T", gemm="blocks")
    _, m = AF.masked_inverse_act(torch.randn(4, 32), A, None, 16, 1.0, gemm="blocks", check=False, return_margin=True)
    assert float(m) < 0
    with pytest.raises(ValueError, match="gemm must be one of"):
        AF.masked_weight(torch.randn(4, 32), A, None, 16, gemm="fast")


def test_newton_schulz_inverse_matches_lu_at_the_dominance_floor():
    """Rows at exactly the training's dominance floor (off-diagonal mass 0.95 |a_ii|, MIN_MARGIN = 0.05) and a
    smaller margin (0.01): the Newton-Schulz inverse agrees with LU to float64 rounding."""
    g = torch.Generator().manual_seed(3)
    for margin in (0.05, 0.01):
        a = torch.randn(5, 48, 48, generator=g, dtype=torch.float64)
        diag = 0.5 + torch.rand(5, 48, generator=g, dtype=torch.float64)
        a.diagonal(dim1=1, dim2=2).zero_()
        a *= ((1 - margin) * diag / a.abs().sum(2)).unsqueeze(2)
        a += torch.diag_embed(diag * torch.sign(torch.randn(5, 48, generator=g, dtype=torch.float64)))
        assert abs(float(AF._margin_blocks(a)) - margin) < 1e-9
        ns, lu = AF.newton_schulz_inverse(a), torch.linalg.inv(a)
        assert float((ns - lu).abs().max() / lu.abs().max()) < 1e-12
