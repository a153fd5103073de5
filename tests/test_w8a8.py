"""aq.kernels.w8a8 under the Triton interpreter against its plain-torch reference, on random ragged shapes."""
import random

import pytest
import torch

from aq import primitives
from aq.kernels import act_quant as A
from aq.kernels import w4a4 as Q
from aq.kernels import w8a8 as W

# (M, K, N, wbits, abits, group, symmetric weights): ragged K / N, per channel and groups (also a group that no
# power-of-two K step divides: masked steps), 8-bit and 6-bit codes, small M (one row block) and larger M
CASES = [
    (1, 200, 70, 8, 8, None, False),
    (5, 333, 45, 8, 8, None, True),
    (33, 256, 50, 6, 6, 64, False),
    (17, 96, 40, 8, 8, 32, True),
    (20, 96, 33, 8, 8, 24, False),
    (70, 130, 129, 6, 6, None, False),
    (3, 192, 31, 4, 8, 64, False),
    (9, 512, 40, 8, 8, 256, False),  # two K steps per group
]


def _inputs(M, K, N, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2 + 0.3  # not centred: asymmetric activation codes use the zero point
    w = torch.randn(N, K, generator=g) * 0.05
    return x, w, torch.randn(N, generator=g)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}K{}N{}W{}A{}g{}{}".format(*c[:6], "s" if c[6] else ""))
def test_matmul_matches_reference_and_fake_quant(case):
    M, K, N, wbits, abits, group, sym = case
    x, w, bias = _inputs(M, K, N, sum(case[:5]))
    wt = W.pack_w8a8_weight(w, wbits, group, sym)
    # the int8 layout holds exactly the fake-quantized weight of aq.primitives
    assert torch.equal(wt.dequantize(), primitives.fake_quant(w, wbits, group, sym))
    assert wt.codes.dtype == torch.int8 and int(wt.codes.min()) >= -(2 ** (wbits - 1))
    a = A.quantize_activation_triton(x, abits, signed=True)  # the Triton kernels, interpreted
    ra = A.quantize_activation_reference(x, abits, signed=True)
    for got, ref in zip(a, ra):
        assert torch.equal(got, ref)
    y = W.w8a8_matmul_triton(a, wt, bias, torch.float32)
    ref = W.w8a8_matmul_reference(ra, wt, bias, torch.float32)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-6  # fp32 epilogue on exact integer sums
    fq = torch.nn.functional.linear(primitives.fake_quant(x, abits), primitives.fake_quant(w, wbits, group, sym), bias)
    assert ((y - fq).norm() / fq.norm()).item() < 1e-5
    if wt.per_channel:  # the integer sum itself, exactly
        exact = W.w8a8_matmul_reference(ra, wt, None, torch.int32)
        assert torch.equal(W.w8a8_matmul_triton(a, wt, None, torch.int32), exact)


def test_signed_activation_codes_are_the_unsigned_ones_shifted():
    rng = random.Random(1)
    for _ in range(3):
        M, K, bits = rng.randrange(1, 40), rng.randrange(16, 300), rng.choice([3, 6, 7])
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(rng.randrange(99))) * 3
        u = A.quantize_activation_triton(x, bits)
        s = A.quantize_activation_triton(x, bits, signed=True)
        off = 2 ** (bits - 1)
        assert torch.equal(s.q.int() + off, u.q.int()) and torch.equal(s.zero + off, u.zero)
        assert torch.equal(s.scale, u.scale) and torch.equal(s.code_sum, u.code_sum - off * K)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_linear_with_a_fused_norm_matches_the_reference(norm):
    M, K, N = 9, 160, 48
    x, w, bias = _inputs(M, K, N, 7)
    g = torch.Generator().manual_seed(3)
    kw = dict(norm=norm, norm_weight=torch.rand(K, generator=g) + 0.5, norm_eps=1e-5,
              norm_bias=torch.randn(K, generator=g) if norm == "layer" else None,
              transform=torch.rand(K, generator=g) + 0.5)
    wt = W.pack_w8a8_weight(w, 8, None)
    y = W.w8a8_linear(x, wt, bias, abits=8, **kw)
    ref = W.w8a8_matmul_reference(A.quantize_activation_reference(x, 8, signed=True, **kw), wt, bias, torch.float32)
    # the fused norm rounds differently from the float32 reference: a near-tie may move one code by one step
    assert ((y - ref).norm() / ref.norm()).item() < 1e-3


def test_pick_config_caps_the_k_step_to_the_group_and_narrows_grouped_tiles():
    assert W.pick_config(1, 64, 4096, 4096, "cpu")["BLOCK_K"] == 128
    assert W.pick_config(100, 64, 4096, 64, "cuda")["BLOCK_K"] == 64
    assert W.pick_config(100, 64, 96, 96, "cuda")["BLOCK_K"] == 32
    assert W.pick_config(100, 64, 120, 24, "cuda")["BLOCK_K"] == 32  # masked steps
    assert W.pick_config(2048, 4096, 4096, 4096, "cuda")["BLOCK_N"] == 128
    assert W.pick_config(2048, 4096, 4096, 128, "cuda")["BLOCK_N"] == 64  # two accumulators: registers


def test_bad_input_is_refused_with_a_clear_error():
    w = torch.randn(8, 64)
    scale, zero = primitives.choose_qparams(w, 8, None)
    codes = primitives.quantize(w, scale, zero, 8)
    with pytest.raises(ValueError, match="codes out of range for 6 bits"):
        W.pack_w8a8_codes(codes.clamp(min=64), scale, zero.clamp(max=63), 6, None)
    with pytest.raises(ValueError, match="must be \\[N, K // g\\]"):
        W.pack_w8a8_codes(codes, scale, zero, 8, 32)
    with pytest.raises(ValueError, match="does not divide"):
        W.pack_w8a8_weight(w, 8, 48)
    with pytest.raises(ValueError, match="<= 7 bits"):
        A.quantize_activation(torch.randn(2, 64), 8)  # unsigned 8-bit codes do not fit an int8 operand
    wt = W.pack_w8a8_weight(w, 8, 32)
    a = A.quantize_activation(torch.randn(2, 64), 8, signed=True)
    with pytest.raises(ValueError, match="needs a per-channel weight"):
        W.w8a8_matmul(a, wt, None, torch.int32)
    with pytest.raises(ValueError, match="K=32"):
        W.w8a8_matmul(A.quantize_activation(torch.randn(2, 32), 8, signed=True), wt)
    with pytest.raises(TypeError, match="W8A8Weight"):
        W.w8a8_matmul(a, Q.pack_w4a4_weight(w))


def test_signed_codes_of_rows_longer_than_one_block():
    x = torch.randn(3, A._MAX_ROW_BLOCK + 100, generator=torch.Generator().manual_seed(5)) + 0.2
    got = A.quantize_activation_triton(x, 8, signed=True)  # the chunked kernel
    for g, r in zip(got, A.quantize_activation_reference(x, 8, signed=True)):
        assert torch.equal(g, r)
