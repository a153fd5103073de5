"""The Triton fake-quant kernel, run interpreted on CPU, against the torch reference."""
import pytest
import torch

from aq import backend, primitives
from aq.kernels import fake_quant as FQ

# (rows, K, group): ragged row counts, per-channel/per-token (None) and groups, a row longer than one block (5000)
SHAPES = [(37, 192, 64), (5, 96, None), (3, 5000, None), (19, 384, 32), (1, 64, 64), (70, 40, 8)]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_reference(bits, symmetric, dtype):
    assert backend.interpreting()
    g = torch.Generator().manual_seed(1000 * bits + symmetric)
    for R, K, group in SHAPES:
        x = (torch.randn(R, K, generator=g) * 3 + torch.randn(R, 1, generator=g)).to(dtype)
        got = FQ.fake_quant_triton(x, bits, group, symmetric)
        assert got.dtype == dtype and got.shape == x.shape
        ref = primitives.fake_quant(x.float(), bits, group, symmetric)
        if dtype == torch.bfloat16:
            # the interpreter truncates fp32 -> bf16 stores: allow one bf16 ulp
            assert ((got.float() - ref).abs() <= ref.abs() * 2**-7 + 1e-30).all(), (R, K, group)
        else:
            assert torch.equal(got.float(), ref.to(dtype).float()), (R, K, group)


def test_dispatch_runs_triton_under_interpreter_and_torch_otherwise(monkeypatch):
    x = torch.randn(4, 32)
    calls = []
    monkeypatch.setattr(FQ, "fake_quant_triton", lambda *a, **k: calls.append(1) or primitives.fake_quant(*a, **k))
    FQ.fake_quant(x, 4, 16)
    assert calls == [1]
    monkeypatch.setenv("AQ_BACKEND", "torch")
    FQ.fake_quant(x, 4, 16)
    assert calls == [1]


def test_3d_activation_is_per_token():
    x = torch.randn(2, 5, 64)
    assert torch.equal(FQ.fake_quant_triton(x, 4), primitives.fake_quant(x.reshape(10, 64), 4).reshape(2, 5, 64))


def test_bad_input_fails_before_the_kernel():
    with pytest.raises(ValueError, match="does not divide"):
        FQ.fake_quant(torch.randn(4, 100), 4, 64)
    with pytest.raises(ValueError, match="unsupported bits"):
        FQ.fake_quant(torch.randn(4, 64), 9)
