import pytest
import torch

from aq.kernels.norm import norm_transform, norm_transform_reference, norm_transform_triton


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("form", [None, "diagonal", "blockdiag"])
@pytest.mark.parametrize("M", [1, 19])
def test_norm_transform_kernel_matches_reference(norm, form, M):
    g = torch.Generator().manual_seed(M)
    K = 96 if form != "blockdiag" else 64  # ragged chunk for the plain / diagonal paths
    x = torch.randn(M, K, generator=g) * 3 + 1
    w = torch.randn(K, generator=g)
    b = torch.randn(K, generator=g) if norm == "layer" else None
    t = None if form is None else (torch.rand(K, generator=g) + 0.5 if form == "diagonal"
                                   else torch.randn(K // 16, 16, 16, generator=g))
    got = norm_transform_triton(x, norm, w, b, 1e-5, t)
    ref = norm_transform_reference(x, norm, w, b, 1e-5, t)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    if form == "blockdiag":  # the block structure: block j of the output only sees block j of the input
        full = torch.block_diag(*t)
        y = norm_transform_reference(x, norm, w, b, 1e-5, None)
        assert torch.allclose(ref, y @ full, atol=1e-4)


def test_norm_transform_bf16_and_3d_inputs():
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    w = torch.rand(64).to(torch.bfloat16)
    t = torch.randn(4, 16, 16)
    got = norm_transform(x, "rms", w, None, 1e-6, t)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    ref = norm_transform_reference(x, "rms", w, None, 1e-6, t)
    assert torch.allclose(got.float(), ref.float(), rtol=2**-7, atol=1e-2)


def test_norm_transform_errors():
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="norm weight"):
        norm_transform(x, "rms", torch.ones(32))
    with pytest.raises(ValueError, match="power of two"):
        norm_transform(x, "rms", torch.ones(64), transform=torch.randn(8, 8, 8))
    with pytest.raises(ValueError, match="norm='layer'"):
        norm_transform(x, "rms", torch.ones(64), bias=torch.ones(64))
    with pytest.raises(ValueError, match="'rms' or 'layer'"):
        norm_transform(x, "batch", torch.ones(64))
