"""Masked affine transforms (aq.kernels.affine): Triton kernels run interpreted on CPU against torch autograd on the
references; mask construction; dominance check and checked inverse."""
import math

import pytest
import torch

from aq import backend, primitives
from aq.kernels import affine as AF


def _grid_weight(N, d, dtype, g):
    return (torch.randint(-8, 9, (N, d), generator=g).float() / 8).to(dtype)


def _grid_transform(d, g):
    """A on a coarse dyadic grid: with a dyadic alpha every product and partial sum of W (A*M)^T is exact in fp32, so
    the kernels' transformed weight is bit-identical to the reference's and the fake quantization must agree exactly."""
    A = torch.randint(-4, 5, (d, d), generator=g).float() / 64
    A.diagonal().copy_(1 + torch.randint(-8, 9, (d,), generator=g).float() / 32)
    return A


def _close(got, ref, rtol):
    got, ref = got.detach(), ref.detach()
    scale = ref.float().abs().max().clamp_min(1e-12)
    return float((got.float() - ref.float()).abs().max() / scale) <= rtol


# ---------------------------------------------------------------------------------------------------------------------
# mask
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,band,block,alpha", [(7, 1, None, 0.5), (7, 3, None, 0.5), (8, None, None, 0.1),
                                                (12, 2, 4, 0.25), (12, None, 6, 1.0), (12, 99, 3, 0.3)])
def test_mask_matches_definition(d, band, block, alpha):
    M = AF.affine_mask(d, band, block, alpha)
    assert M.shape == (d, d) and M.dtype == torch.float32
    b = d if band is None else band
    h = d if block is None else block
    for i in range(d):
        for j in range(d):
            want = 1.0 if i == j else (alpha if abs(i - j) < b and i // h == j // h else 0.0)
            assert M[i, j].item() == pytest.approx(want)


def test_mask_rejects_bad_structure():
    with pytest.raises(ValueError, match="band"):
        AF.affine_mask(8, 0)
    with pytest.raises(ValueError, match="block"):
        AF.affine_mask(8, 2, 3)
    with pytest.raises(ValueError, match="A must be 8 x 8"):
        AF.masked_weight(torch.randn(3, 8), torch.eye(6))


# ---------------------------------------------------------------------------------------------------------------------
# dominance and inverse
# ---------------------------------------------------------------------------------------------------------------------

def test_dominance_margin_is_relative_and_checked_inverse_is_float64():
    A = torch.tensor([[4.0, 1.0, -1.0], [0.5, 2.0, 0.5], [0.0, -3.0, 5.0]])
    # row margins: (4-2)/4 = 0.5, (2-1)/2 = 0.5, (5-3)/5 = 0.4
    assert AF.dominance_margin(A) == pytest.approx(0.4)
    assert AF.dominance_margin(torch.eye(5) * 3) == 1.0
    g = torch.Generator().manual_seed(3)
    for d, block, band in [(48, None, None), (48, 16, None), (48, None, 1)]:
        A = torch.eye(d) * 2 + torch.rand(d, d, generator=g) / d
        A = A * AF.affine_mask(d, band, block, 1.0)
        inv, margin = AF.checked_inverse(A, "layers.0.A_qkv", block=block, band=band)
        assert inv.dtype == torch.float32 and margin == pytest.approx(AF.dominance_margin(A))
        ref = torch.linalg.inv(A.double()).float()
        assert torch.allclose(inv, ref, rtol=1e-6, atol=1e-7)


def test_unchecked_inverse_reports_failure_in_its_margin_without_raising():
    """inverse_with_margin (the calibration step's path: no host synchronization) returns the same inverse and margin
    as checked_inverse on a good matrix, and a margin <= 0 (never an exception) on bad ones."""
    g = torch.Generator().manual_seed(5)
    for d, block, band in [(40, None, None), (40, 8, None), (40, None, 1)]:
        A = (torch.eye(d) * 2 + torch.rand(d, d, generator=g) / d) * AF.affine_mask(d, band, block, 1.0)
        inv, margin = AF.inverse_with_margin(A, block, band)
        ref_inv, ref_margin = AF.checked_inverse(A, "x", block, band)
        assert torch.equal(inv, ref_inv) and torch.is_tensor(margin) and float(margin) == pytest.approx(ref_margin)
    assert float(AF.inverse_with_margin(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))[1]) <= 0  # not dominant
    assert float(AF.inverse_with_margin(torch.ones(3, 3))[1]) == float("-inf")             # singular
    assert float(AF.inverse_with_margin(torch.full((2, 2), float("nan")))[1]) == float("-inf")
    x = torch.randn(3, 8, generator=g)
    y, m = AF.masked_inverse_act(x, torch.eye(8) * 2 + 0.01 * torch.rand(8, 8, generator=g), band=3,
                                 return_margin=True, check=False)
    assert torch.is_tensor(m) and float(m) > 0 and torch.isfinite(y).all()


def test_checked_inverse_errors_name_the_layer():
    with pytest.raises(ValueError, match="layers.7.A_up.*not strictly diagonally dominant"):
        AF.checked_inverse(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), "layers.7.A_up")
    with pytest.raises(ValueError, match="layers.2.A_vo"):
        AF.checked_inverse(torch.zeros(3, 3), "layers.2.A_vo")  # zero diagonal: margin -inf
    with pytest.raises(ValueError, match="layers.1.A_qkv"):
        AF.checked_inverse(torch.full((2, 2), float("nan")), "layers.1.A_qkv")
    with pytest.raises(ValueError, match="layers.4.A_qkv"):
        AF.masked_inverse_act(torch.randn(3, 4), torch.ones(4, 4), band=2, name="layers.4.A_qkv")


# ---------------------------------------------------------------------------------------------------------------------
# masked transforms, forward and backward
# ---------------------------------------------------------------------------------------------------------------------

def _run(fn, leaves, gy, *args, **kw):
    leaves = [t.clone().requires_grad_() for t in leaves]
    y = fn(*leaves, *args, **kw)
    y.backward(gy)
    return (y,) + tuple(t.grad for t in leaves)


# (N, d, band, block, alpha, dtype): ragged rows, diagonal / narrow / full bands, per-head blocks, 16-bit weights
MW_CASES = [(37, 96, 1, None, 0.5, torch.float32), (29, 128, 7, None, 0.1, torch.float16),
            (20, 96, None, None, 0.3, torch.bfloat16), (33, 128, 9, 32, 0.25, torch.float32),
            (16, 64, None, 16, 1.0, torch.float32)]


@pytest.mark.parametrize("case", MW_CASES)
def test_masked_weight_and_grads(case):
    N, d, band, block, alpha, dtype = case
    g = torch.Generator().manual_seed(N * d)
    w = torch.randn(N, d, generator=g).to(dtype)
    A = torch.eye(d) + torch.randn(d, d, generator=g) / d
    gy = torch.randn(N, d, generator=g).to(dtype)
    ref = _run(AF.masked_weight_reference, [w, A], gy, band, block, alpha)
    for path in ("band", "dense"):
        got = _run(AF.masked_weight, [w, A], gy, band, block, alpha, gemm=path)
        assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for a, b in zip(got, ref):
            assert _close(a, b, tol), (case, path)
        M = AF.affine_mask(d, band, block, alpha)
        assert (got[2][M == 0] == 0).all()  # no gradient outside the mask


@pytest.mark.parametrize("case", [(23, 96, 1, None, 0.5), (31, 64, 5, None, 0.2), (17, 96, 6, 32, 0.5),
                                  (9, 64, None, None, 1.0)])
def test_masked_inverse_act_and_grads(case):
    N, d, band, block, alpha = case
    g = torch.Generator().manual_seed(N + d)
    x = torch.randn(2, N, d, generator=g)
    A = torch.eye(d) * 1.5 + torch.randn(d, d, generator=g) / (2 * d)
    gy = torch.randn(2, N, d, generator=g)
    ref = _run(AF.masked_inverse_act_reference, [x, A], gy, band, block, alpha)
    for path in ("band", "dense"):
        got = _run(AF.masked_inverse_act, [x, A], gy, band, block, alpha, name="t", gemm=path)
        for a, b in zip(got, ref):
            assert _close(a, b, 1e-5), (case, path)
    y, margin = AF.masked_inverse_act(x, A, band, block, alpha, name="t", return_margin=True)
    assert margin == pytest.approx(AF.dominance_margin(A * AF.affine_mask(d, band, block, alpha)))
    assert 0 < margin <= 1


# (N, d, group, band, block, dtype, symmetric, lwc): every bits 2..8 is paired with these in turn; groups of 16/32/64
# (fused into the product's epilogue), 48 (not a power of 2) and per channel (a second pass)
TFQ_CASES = [(37, 96, 32, 1, None, torch.float32, False, "ul"), (29, 128, None, 5, None, torch.float16, False, "u"),
             (20, 128, 64, None, None, torch.bfloat16, True, "ul"), (33, 128, 16, 7, 32, torch.float32, False, ""),
             (18, 96, 48, 20, 48, torch.float32, True, "l"), (41, 192, 64, 40, None, torch.float32, False, "ul"),
             (12, 64, None, None, 16, torch.float32, True, "ul")]


@pytest.mark.parametrize("bits", range(2, 9))
def test_transform_fake_quant_values_and_grads(bits, monkeypatch):
    """Fused transform + fake quant on all three product paths vs autograd on the reference (grid inputs: the
    transformed weight is exact, so values must agree bit for bit; gradients to fp32 rounding)."""
    monkeypatch.setattr(AF, "CHUNK", 32)  # several column chunks: clipped windows and batched interior windows
    g = torch.Generator().manual_seed(bits)
    for k in range(2):
        N, d, group, band, block, dtype, sym, lwc = TFQ_CASES[(2 * bits + k) % len(TFQ_CASES)]
        alpha = 0.25
        w = _grid_weight(N, d, dtype, g)
        A = _grid_transform(d, g)
        NG = d // (group or d)
        u = torch.randn(N, NG, generator=g) + 1.5
        l = torch.randn(N, NG, generator=g) + 1.5
        gy = torch.randn(N, d, generator=g).to(dtype)
        U = u if "u" in lwc else None
        L = l if "l" in lwc else None

        def ref_fn(w, A, *ul):
            it = iter(ul)
            return AF.transform_fake_quant_reference(w, A, bits, group, band, block, alpha,
                                                     next(it) if U is not None else None,
                                                     next(it) if L is not None else None, sym)

        leaves = [w, A] + [t for t in (U, L) if t is not None]
        ref = _run(ref_fn, leaves, gy)
        paths = ("band", "blocked", "dense") if k == 0 else ("band",)
        for path in paths:
            def fn(w, A, *ul):
                it = iter(ul)
                return AF.transform_fake_quant(w, A, bits, group, band, block, alpha,
                                               next(it) if U is not None else None,
                                               next(it) if L is not None else None, sym, gemm=path)
            got = _run(fn, leaves, gy)
            y, yr = got[0], ref[0]
            assert y.dtype == dtype and got[1].dtype == dtype
            if dtype == torch.bfloat16:  # interpreter bf16 stores truncate: one bf16 ulp
                assert ((y.float() - yr.float()).abs() <= yr.float().abs() * 2**-7).all()
            else:
                assert torch.equal(y, yr), (bits, N, d, group, band, block, path)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            for a, b in zip(got[1:], ref[1:]):
                assert _close(a, b, tol), (bits, N, d, group, band, block, path)


def test_transform_fake_quant_random_inputs_and_clipping():
    """Fresh normal inputs (products not exact, summation orders differ): values within one quantization step of the
    reference everywhere, under strong clipping."""
    g = torch.Generator().manual_seed(11)
    N, d, group = 24, 128, 32
    w = torch.randn(N, d, generator=g)
    A = torch.eye(d) + 0.05 * torch.randn(d, d, generator=g)
    u = torch.full((N, d // group), -1.0)  # clip the range to ~27%
    l = torch.full((N, d // group), -1.0)
    y = AF.transform_fake_quant(w, A, 4, group, 9, None, 0.1, u, l)
    yr = AF.transform_fake_quant_reference(w, A, 4, group, 9, None, 0.1, u, l)
    wt = w @ (A * AF.affine_mask(d, 9, None, 0.1)).T
    scale, _ = primitives.choose_qparams(wt, 4, group, False, torch.sigmoid(u), torch.sigmoid(l))
    step = scale.repeat_interleave(group, dim=1)
    assert ((y - yr).abs() <= step * 1.001).all()
    assert float((y - yr).norm() / yr.norm()) < 1e-2


def test_dispatch_and_errors(monkeypatch):
    assert backend.interpreting()
    w, A = torch.randn(4, 32), torch.eye(32)
    with pytest.raises(ValueError, match="gemm must be"):
        AF.transform_fake_quant(w, A, 4, 16, gemm="fast")
    with pytest.raises(ValueError, match="LWC logits u"):
        AF.transform_fake_quant(w, A, 4, 16, u=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="does not divide"):
        AF.transform_fake_quant(w, A, 4, 24)
    with pytest.raises(ValueError, match="unsupported bits"):
        AF.transform_fake_quant(w, A, 9, 16)
    monkeypatch.setenv("AQ_BACKEND", "torch")  # reference path: same values
    assert torch.equal(AF.transform_fake_quant(w, A, 4, 16, band=3, alpha=0.5),
                       AF.transform_fake_quant_reference(w, A, 4, 16, 3, None, 0.5))
    # path choice on a GPU (no launch): narrow bands -> band kernels, middle -> blocked, wide -> dense
    cuda = torch.device("cuda")
    assert AF.gemm_path(11008, 4096, 1, 4096, cuda, None) == "band"
    assert AF.gemm_path(11008, 4096, 128, 4096, cuda, None) == "band"
    assert AF.gemm_path(11008, 4096, 1024, 4096, cuda, None) == "dense"
    assert AF.gemm_path(11008, 4096, 4096, 4096, cuda, None) == "dense"
    assert AF.gemm_path(1536, 576, 576, 576, cuda, None) == "band"  # small products: fewer launches wins
    assert AF.gemm_path(576, 576, 8, 64, cuda, None) == "band"
    assert math.isfinite(AF.dominance_margin(torch.eye(3)))
