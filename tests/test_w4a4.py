"""W4A4 kernels (aq.kernels.w4a4), run through Triton's interpreter on CPU, against the torch references.

Integer results (activation codes, zero points, code sums, the GEMM's int32 sums) must be exactly those of the
references built on aq.primitives; dequantized outputs match within float tolerance; ragged shapes everywhere.
"""
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py sets it too; it must precede triton.jit

import pytest  # noqa: E402
import torch  # noqa: E402

from aq import backend, primitives  # noqa: E402
from aq.kernels import act_quant  # noqa: E402
from aq.kernels import w4a4 as W  # noqa: E402


def _act(M, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2 + torch.randn(M, 1, generator=g)
    x[:, torch.randint(0, K, (max(1, K // 50),), generator=g)] *= 15  # outlier channels
    return x.to(dtype)


def _codes_ref(y, bits, symmetric):
    """The spec: aq.primitives' per-row quantization of the float32 row."""
    s, z = primitives.choose_qparams(y.float(), bits, None, symmetric)
    return primitives.quantize(y.float(), s, z, bits), s.squeeze(-1), z.squeeze(-1)


def _assert_close_codes(got, ref, frac=2e-3):
    """Fused norms/transforms differ from the reference by float rounding: codes may move by one near a tie."""
    d = (got.q.int() - ref.q.int()).abs()
    assert d.max() <= 1 and (d > 0).float().mean() <= frac, (d.max(), (d > 0).float().mean())
    torch.testing.assert_close(got.scale, ref.scale, rtol=1e-5, atol=0)
    assert torch.equal(got.code_sum, got.q.int().sum(-1, dtype=torch.int32))


def test_interpreter_is_on():
    assert backend.interpreting()


# ---------------------------------------------------------------------------------------------------------------------
# weight packing
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,K,sym", [(37, 203, False), (16, 64, True), (5, 1, False)])
def test_pack_weight_codes_are_primitives(N, K, sym):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N + K))
    wt = W.pack_w4a4_weight(w, 4, sym)
    q, s, z = _codes_ref(w, 4, sym)
    assert wt.packed.shape == (N, (K + 1) // 2) and wt.packed.dtype == torch.uint8
    assert torch.equal(wt.codes(), q)
    assert torch.equal(wt.scale, s) and torch.equal(wt.zero, z.to(torch.int32))
    assert torch.equal(wt.code_sum, q.int().sum(1, dtype=torch.int32))
    torch.testing.assert_close(wt.dequantize(), primitives.fake_quant(w, 4, None, sym))


def test_pack_weight_with_given_qparams_and_low_bits():
    w = torch.randn(8, 40)
    s, z = primitives.choose_qparams(w, 3, None, False)
    wt = W.pack_w4a4_weight(w, 3, scale=s * 0.9, zero=z)
    assert torch.equal(wt.codes(), primitives.quantize(w, s * 0.9, z, 3))
    assert int(wt.codes().max()) <= 7


# ---------------------------------------------------------------------------------------------------------------------
# activation quantization
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [False, True])
def test_plain_activation_codes_exact(dtype, sym):
    for i, (M, K) in enumerate([(37, 203), (1, 64), (5, 512)]):
        x = _act(M, K, dtype, 10 * i + sym)
        got = W.quantize_activation(x, 4, sym)
        q, s, z = _codes_ref(x, 4, sym)
        assert got.q.dtype == torch.int8 and got.q.shape == (M, K)
        assert torch.equal(got.q, q.to(torch.int8)), (M, K)
        assert torch.equal(got.scale, s) and torch.equal(got.zero, z.to(torch.int32))
        assert torch.equal(got.code_sum, q.int().sum(-1, dtype=torch.int32))


def test_activation_ties_round_half_to_even():
    # scale exactly 1 (range [-7.5, 7.5], 15 steps): every x = k + 0.5 is a tie
    x = torch.randint(-30, 31, (16, 96), generator=torch.Generator().manual_seed(3)).float() / 4
    x[:, 0], x[:, 1] = -7.5, 7.5
    got = W.quantize_activation(x, 4)
    q, _, _ = _codes_ref(x, 4, False)
    assert torch.equal(got.q, q.to(torch.int8))


def test_other_bits_and_3d_input():
    x = _act(6, 130, torch.float32, 4).reshape(2, 3, 130)
    for bits in (2, 3, 7):
        got = W.quantize_activation(x, bits)
        q, s, _ = _codes_ref(x, bits, False)
        assert got.q.shape == x.shape and got.scale.shape == (2, 3)
        assert torch.equal(got.q, q.to(torch.int8)) and torch.equal(got.scale, s)


def test_diagonal_transform_exact():
    x = _act(19, 200, torch.bfloat16, 5)
    d = torch.exp(0.3 * torch.randn(200))
    got = W.quantize_activation(x, 4, transform=d)
    q, s, _ = _codes_ref(x.float() * d, 4, False)
    assert torch.equal(got.q, q.to(torch.int8)) and torch.equal(got.scale, s)


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("transform", [None, "diag", "block"])
def test_fused_norm_and_transform(norm, transform):
    M, K, h = 21, 192, 32
    g = torch.Generator().manual_seed(6)
    x = _act(M, K, torch.bfloat16, 7)
    kw = dict(norm=norm, norm_weight=(1 + 0.2 * torch.randn(K, generator=g)).to(torch.bfloat16), norm_eps=1e-5)
    if norm == "layer":
        kw["norm_bias"] = 0.1 * torch.randn(K, generator=g)
    if transform == "diag":
        kw["transform"] = torch.exp(0.3 * torch.randn(K, generator=g))
    elif transform == "block":
        kw["transform"] = torch.eye(h) + torch.randn(K // h, h, h, generator=g) / h
    got = W.quantize_activation(x, 4, **kw)
    ref = W.quantize_activation_reference(x, 4, **kw)
    _assert_close_codes(got, ref)
    # and the reference is what the docstring says: primitives on norm(x) * w (+ b), then the transform
    y = x.float()
    if norm == "rms":
        y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * kw["norm_weight"].float()
    else:
        y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-5)
        y = y * kw["norm_weight"].float() + kw["norm_bias"]
    if transform == "diag":
        y = y * kw["transform"]
    elif transform == "block":
        y = y @ torch.block_diag(*kw["transform"])
    q, s, z = _codes_ref(y, 4, False)
    _assert_close_codes(got, W.QuantizedActivation(q.to(torch.int8), s, z.int(), q.int().sum(-1)))


def test_long_rows_take_the_chunked_kernel(monkeypatch):
    monkeypatch.setattr(act_quant, "_MAX_ROW_BLOCK", 64)  # rows of 200 now run chunk by chunk
    x = _act(9, 200, torch.float16, 8)
    got = W.quantize_activation(x, 4, symmetric=True)
    q, s, _ = _codes_ref(x, 4, True)
    assert torch.equal(got.q, q.to(torch.int8)) and torch.equal(got.scale, s)
    nw = 1 + 0.1 * torch.randn(192)
    T = torch.eye(32) + 0.05 * torch.randn(6, 32, 32)
    x = _act(9, 192, torch.float32, 9)
    kw = dict(norm="rms", norm_weight=nw, transform=T)
    _assert_close_codes(W.quantize_activation(x, 4, **kw), W.quantize_activation_reference(x, 4, **kw))


# ---------------------------------------------------------------------------------------------------------------------
# GEMM
# ---------------------------------------------------------------------------------------------------------------------
# every kernel path, small blocks so that ragged shapes cross block edges (K split over two programs, masks on K)
CONFIGS = [
    dict(kernel="swap", BLOCK_M=16, BLOCK_N=32, BLOCK_KH=64, GROUP_M=1, num_warps=4, num_stages=1),
    dict(kernel="swap", BLOCK_M=16, BLOCK_N=32, BLOCK_KH=32, GROUP_M=1, num_warps=4, num_stages=1, SPLIT=64, TMA=True),
    dict(kernel="tile", BLOCK_M=32, BLOCK_N=64, BLOCK_KH=64, GROUP_M=2, num_warps=4, num_stages=1),
    dict(kernel="tile", BLOCK_M=32, BLOCK_N=32, BLOCK_KH=32, GROUP_M=2, num_warps=4, num_stages=1, SPLIT=64),
    dict(kernel="tile", BLOCK_M=32, BLOCK_N=32, BLOCK_KH=32, GROUP_M=2, num_warps=4, num_stages=1, TMA=True, W8=True),
]
GEMM_SHAPES = [(37, 72, 203), (1, 40, 64), (64, 96, 256)]  # (M, N, K): odd K, single token, aligned (TMA eligible)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()
                                                                if k in ("kernel", "SPLIT", "TMA", "W8")))
def test_gemm_integer_sums_exact(cfg):
    for i, (M, N, K) in enumerate(GEMM_SHAPES):
        g = torch.Generator().manual_seed(i)
        wt = W.pack_w4a4_weight(torch.randn(N, K, generator=g), 4, symmetric=bool(i % 2))
        a = W.quantize_activation(_act(M, K, torch.float32, i), 4, symmetric=not i % 2)
        got = W.w4a4_matmul_triton(a, wt, None, torch.int32, config=cfg)
        ref = (a.q.long() - a.zero.long()[:, None]) @ (wt.codes().long() - wt.zero.long()[:, None]).T
        assert got.dtype == torch.int32 and torch.equal(got.long(), ref), (M, N, K)
        assert torch.equal(got, W.w4a4_matmul_reference(a, wt, None, torch.int32))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gemm_outputs_with_bias(out_dtype):
    M, N, K = 37, 72, 203
    wt = W.pack_w4a4_weight(torch.randn(N, K) * 0.05)
    a = W.quantize_activation(_act(M, K, torch.bfloat16, 1), 4)
    bias = torch.randn(N).to(torch.bfloat16)
    for cfg in (CONFIGS[0], CONFIGS[2]):
        y = W.w4a4_matmul_triton(a, wt, bias, out_dtype, config=cfg)
        ref = W.w4a4_matmul_reference(a, wt, bias, torch.float32)
        assert y.dtype == out_dtype and y.shape == (M, N)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[out_dtype]  # bf16 stores truncate
        torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
        # the dequantized product, computed the plain way
        deq = (a.q.float() - a.zero[:, None]) * a.scale[:, None] @ wt.dequantize().T + bias.float()
        torch.testing.assert_close(y.float(), deq, rtol=tol, atol=tol * deq.abs().max().item() + 1e-4)


def test_linear_end_to_end_and_dispatch_by_m():
    wt = W.pack_w4a4_weight(torch.randn(48, 128) * 0.05)
    nw = 1 + 0.1 * torch.randn(128)
    for M in (3, 40):  # one per interpreter bucket (swap, tile)
        assert W.pick_config(M, 48, 128)["kernel"] == ("swap" if M <= 16 else "tile")
        x = _act(M, 128, torch.bfloat16, M).reshape(1, M, 128)
        y = W.w4a4_linear(x, wt, norm="rms", norm_weight=nw)
        ref = W.w4a4_matmul_reference(W.quantize_activation_reference(x, norm="rms", norm_weight=nw), wt, None,
                                      torch.float32)
        assert y.shape == (1, M, 48) and y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_pick_config_reads_buckets():
    assert W.pick_config(1, 4096, 4096, "cpu")["max_m"] == 16
    assert W.pick_config(4096, 4096, 4096, "cpu")["max_m"] is None
    assert [c["max_m"] for c in W.DEFAULT_CONFIGS][-1] is None


def test_torch_path_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend.choose(torch.zeros(1)) == backend.TORCH
    x = _act(4, 64, torch.float32, 2)
    wt = W.pack_w4a4_weight(torch.randn(8, 64))
    a = W.quantize_activation(x)
    assert torch.equal(a.q, W.quantize_activation_reference(x).q)
    torch.testing.assert_close(W.w4a4_linear(x, wt), W.w4a4_matmul_reference(a, wt, None, torch.float32))


def test_empty_batch():
    wt = W.pack_w4a4_weight(torch.randn(8, 64))
    y = W.w4a4_linear(torch.randn(0, 64), wt)
    assert y.shape == (0, 8)


# ---------------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 64)
    wt = W.pack_w4a4_weight(torch.randn(8, 64))
    with pytest.raises(ValueError, match="wbits"):
        W.pack_w4a4_weight(torch.randn(8, 64), wbits=8)
    with pytest.raises(ValueError, match="2-D"):
        W.pack_w4a4_weight(torch.randn(64))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        W.pack_w4a4_weight(torch.randint(0, 3, (8, 64)))
    with pytest.raises(ValueError, match="scale and zero"):
        W.pack_w4a4_weight(torch.randn(8, 64), scale=torch.ones(8))
    with pytest.raises(ValueError, match="abits|bits"):
        W.quantize_activation(x, bits=8)
    with pytest.raises(ValueError, match="norm must be"):
        W.quantize_activation(x, norm="batch")
    with pytest.raises(ValueError, match="needs norm_weight"):
        W.quantize_activation(x, norm="rms")
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        W.quantize_activation(x, norm="rms", norm_weight=torch.ones(32))
    with pytest.raises(ValueError, match="only used with norm='layer'"):
        W.quantize_activation(x, norm="rms", norm_weight=torch.ones(64), norm_bias=torch.ones(64))
    with pytest.raises(ValueError, match="power of two"):
        W.quantize_activation(x, transform=torch.randn(8, 8, 8))
    with pytest.raises(ValueError, match=r"\[K // h, h, h\]"):
        W.quantize_activation(x, transform=torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="diagonal transform"):
        W.quantize_activation(x, transform=torch.randn(63))
    a = W.quantize_activation(x)
    with pytest.raises(ValueError, match="K=64"):
        W.w4a4_matmul(W.quantize_activation(torch.randn(4, 32)), wt)
    with pytest.raises(TypeError, match="W4A4Weight"):
        W.w4a4_matmul(a, torch.randn(8, 64))
    with pytest.raises(TypeError, match="QuantizedActivation"):
        W.w4a4_matmul((a.q, a.scale, a.zero), wt)
    with pytest.raises(ValueError, match="bias must have shape"):
        W.w4a4_matmul(a, wt, bias=torch.randn(7))
    with pytest.raises(ValueError, match="out_dtype"):
        W.w4a4_matmul(a, wt, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="unknown W4A4 kernel"):
        W.w4a4_matmul_triton(a, wt, config=dict(W.DEFAULT_CONFIGS[0], kernel="nope"))


def test_shipped_w4a4_configs_are_well_formed():
    from aq.kernels import tuned

    tables = [json.loads(p.read_text()).get(W.FAMILY) for p in tuned.CONFIG_DIR.glob("*.json")]
    tables = [t for t in tables if t]
    assert tables, "no tuned W4A4 configs shipped"
    for t in tables:
        assert t[-1]["max_m"] is None and all(c["kernel"] in ("swap", "tile") for c in t), t
