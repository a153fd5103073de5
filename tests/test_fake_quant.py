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


# ---------------------------------------------------------------------------------------------------------------------
# fake_quant_ste: straight-through gradients and learned clipping (LWC), kernel vs autograd on the torch reference
# ---------------------------------------------------------------------------------------------------------------------
# (shape, group, dtype, lwc): per channel / per group / per token (3-D activation), ragged rows, one row longer than a
# kernel block; LWC on both ends, on one end, or off.
STE_CASES = [((37, 192), 64, torch.float32, "ul"), ((5, 96), None, torch.float16, "u"), ((2, 7, 64), None,
             torch.bfloat16, "l"), ((19, 384), 32, torch.float32, ""), ((3, 2560), None, torch.float32, "ul"),
             ((70, 40), 8, torch.bfloat16, "ul"), ((11, 96), 48, torch.float16, "ul")]


def _ste_run(fn, x, gy, bits, group, symmetric, u, l):
    xx = x.clone().requires_grad_()
    uu = None if u is None else u.clone().requires_grad_()
    ll = None if l is None else l.clone().requires_grad_()
    y = fn(xx, bits, group, symmetric, uu, ll)
    y.backward(gy)
    return y, xx.grad, (None if u is None else uu.grad), (None if l is None else ll.grad)


def _close(got, ref, rtol):
    """Max error within rtol of the reference's largest entry (gradients are sums with cancellation)."""
    scale = ref.float().abs().max().clamp_min(1e-12)
    return float((got.float() - ref.float()).abs().max() / scale) <= rtol


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_ste_kernel_matches_reference_autograd(bits, symmetric):
    """Values as primitives.fake_quant; grads of x, u, l as autograd on fake_quant_ste_reference (fresh random data)."""
    g = torch.Generator().manual_seed(100 * bits + symmetric)
    for i in range(2):
        shape, group, dtype, lwc = STE_CASES[(2 * bits + 3 * symmetric + i) % len(STE_CASES)]
        K = shape[-1]
        NG = K // (group or K)
        x = (torch.randn(*shape, generator=g) * 2 + torch.randn(*shape[:-1], 1, generator=g)).to(dtype)
        gy = torch.randn(*shape, generator=g).to(dtype)
        u = torch.randn(*shape[:-1], NG, generator=g) + 1.5 if "u" in lwc else None
        l = torch.randn(*shape[:-1], NG, generator=g) + 1.5 if "l" in lwc else None
        y, gx, gu, gl = _ste_run(FQ.fake_quant_ste, x, gy, bits, group, symmetric, u, l)
        yr, gxr, gur, glr = _ste_run(FQ.fake_quant_ste_reference, x, gy, bits, group, symmetric, u, l)
        assert y.dtype == dtype and gx.dtype == dtype and y.shape == x.shape
        if dtype == torch.bfloat16:  # interpreter bf16 stores truncate: one bf16 ulp
            assert ((y.float() - yr.float()).abs() <= yr.float().abs() * 2**-7 + 1e-30).all()
        else:
            assert torch.equal(y, yr), (shape, group, dtype)
        assert _close(gx, gxr, 1e-2 if dtype != torch.float32 else 1e-5), (shape, group, dtype)
        for got, ref in ((gu, gur), (gl, glr)):
            assert (got is None) == (ref is None)
            if got is not None:
                assert got.dtype == torch.float32 and _close(got, ref, 1e-4), (shape, group, dtype)


def test_ste_reference_forward_is_primitives():
    x = torch.randn(9, 128) * 4
    u, l = torch.randn(9, 2), torch.randn(9, 2)
    for bits in range(2, 9):
        for sym in (False, True):
            got = FQ.fake_quant_ste_reference(x, bits, 64, sym, u, l)
            ref = primitives.fake_quant(x, bits, 64, sym, torch.sigmoid(u), torch.sigmoid(l))
            assert torch.equal(got, ref)


def test_ste_ties_constant_groups_and_clipping():
    """Tied extremes (gradient split), a constant group (scale clamped to SCALE_EPS), an all-positive group (range
    extended to 0), strong clipping (zero gradient outside the clip range)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-3, 4, (6, 64), generator=g).float() / 2  # many tied maxima/minima
    x[1, :16] = 0.75                                               # constant group
    x[2, 16:32] = torch.rand(16, generator=g) + 0.5                # all positive
    gy = torch.randn(6, 64, generator=g)
    for sym in (False, True):
        u = torch.randn(6, 4, generator=g) - 1.0  # sigmoid ~0.27: most of the range clipped
        l = torch.randn(6, 4, generator=g) - 1.0
        y, gx, gu, gl = _ste_run(FQ.fake_quant_ste, x, gy, 3, 16, sym, u, l)
        yr, gxr, gur, glr = _ste_run(FQ.fake_quant_ste_reference, x, gy, 3, 16, sym, u, l)
        assert torch.equal(y, yr)
        assert _close(gx, gxr, 1e-5) and _close(gu, gur, 1e-4) and _close(gl, glr, 1e-4)
        assert (gxr == 0).any()  # clipped elements get no direct gradient


def test_ste_dispatch_and_errors(monkeypatch):
    x = torch.randn(4, 32, requires_grad=True)
    calls = []
    monkeypatch.setattr(FQ._FakeQuantSTE, "apply", lambda *a: calls.append(1) or FQ.fake_quant_ste_reference(
        a[0], a[3], a[4], a[5]))
    FQ.fake_quant_ste(x, 4, 16)
    assert calls == [1]
    monkeypatch.setenv("AQ_BACKEND", "torch")
    FQ.fake_quant_ste(x, 4, 16)
    assert calls == [1]
    with pytest.raises(ValueError, match="LWC logits u"):
        FQ.fake_quant_ste(x, 4, 16, u=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="unsupported bits"):
        FQ.fake_quant_ste(x, 1)
    with pytest.raises(ValueError, match="does not divide"):
        FQ.fake_quant_ste(x, 4, 24)
