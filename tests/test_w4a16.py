"""W4A16 packing and the fused dequantize-matmul kernels, run interpreted on CPU, against the torch reference."""
import json

import pytest
import torch

from aq import backend, primitives
from aq.kernels import tuned, w4a16 as W

DTYPES = [torch.float16, torch.bfloat16]
GROUPS = [32, 64, 128, None]


def _tol(dtype):
    # the interpreter truncates fp32 -> bf16 (weights and outputs): allow a few bf16 ulps in the relative norm
    return 1.5e-2 if dtype == torch.bfloat16 else 2e-3


def _rel(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def _weight(N, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.05 + torch.randn(N, 1, generator=g) * 0.01


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group", GROUPS)
def test_pack_unpack_round_trip(bits, group):
    N, K = 37, 256  # N not a multiple of the 16-row interleave
    g = torch.Generator().manual_seed(bits * 100 + (group or 1))
    codes = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.uint8)
    G = K // (group or K)
    scale = torch.rand(N, G, generator=g) + 0.01
    zero = torch.randint(0, 2**bits, (N, G), generator=g).float()
    p = W.pack_w4a16_codes(codes, scale, zero, bits, group, torch.float16)
    assert p.qweight.dtype == torch.int32 and p.qweight.shape == (3, K // p.elems_per_word, 16)
    assert p.scales.shape == (G, N) and p.zeros.shape == (G, N)
    assert torch.equal(W.unpack_weight(p), codes)
    assert torch.equal(p.zeros.t().float(), zero)
    ref = primitives.dequantize(codes, scale.half().float(), zero, group, torch.float16)
    assert torch.equal(W.dequantize_weight(p), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_weight_quantizes_like_primitives(dtype):
    w = _weight(24, 128, 0)
    p = W.pack_weight(w, 4, 32, dtype)
    scale, zero = primitives.choose_qparams(w, 4, 32)
    s = scale.to(dtype).float()
    assert torch.equal(p.scales.t().float(), s) and torch.equal(p.zeros.t().float(), zero)
    assert torch.equal(W.unpack_weight(p), primitives.quantize(w, s, zero, 4, 32))
    # per output channel, 3-bit codes in 4-bit slots
    p3 = W.pack_weight(w, 3, None, dtype)
    assert p3.group_size == 128 and p3.per_channel and p3.container_bits == 4
    assert int(W.unpack_weight(p3).max()) <= 7


CONFIGS = {  # one of each kernel path; block sizes large so the interpreter runs few programs
    "gemv": lambda e: dict(kernel="gemv", block_n=32, block_kw=8, split_k=2),
    "mma_join_swap": lambda e: dict(kernel="mma", block_m=16, block_n=32, block_kw=max(2, 64 // e), split_k=2,
                                    swap=True, join=True),
    "mma_split": lambda e: dict(kernel="mma", block_m=16, block_n=32, block_kw=16, split_k=1, swap=False,
                                join=False),
    "mma_fold": lambda e: dict(kernel="mma", block_m=16, block_n=32, block_kw=max(2, 32 // e), split_k=2, swap=True,
                               join=True, fold=True),
    "dequant": lambda e: dict(kernel="dequant", block_n=32, block_kw=max(2, 128 // e)),
}
# ragged M: never a multiple of a block
M_OF = {"gemv": 2, "mma_join_swap": 5, "mma_split": 19, "mma_fold": 7, "dequant": 3}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_match_reference_every_bits_group_dtype(bits, dtype):
    """Every group size for each (bits, dtype), each through one kernel path, rotating so that over the matrix every
    path meets every group size and bit width."""
    assert backend.interpreting()
    names = list(CONFIGS)
    for gi, group in enumerate(GROUPS):
        name = names[(gi + bits + DTYPES.index(dtype)) % len(names)]
        N, K = 40, 256  # ragged N (not a multiple of 16 or of the block)
        p = W.pack_weight(_weight(N, K, bits + gi), bits, group, dtype)
        gen = torch.Generator().manual_seed(7 * bits + gi)
        x = torch.randn(M_OF[name], K, generator=gen).to(dtype)
        bias = torch.randn(N, generator=gen).to(dtype) if gi % 2 else None
        cfg = CONFIGS[name](p.elems_per_word)
        y = W.w4a16_linear(x, p, bias, config=cfg)
        ref = W.w4a16_linear_reference(x, p, bias)
        assert y.dtype == dtype and y.shape == ref.shape
        assert _rel(y, ref) < _tol(dtype), (name, group, _rel(y, ref))


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_paths_ragged_bias_and_leading_dims(dtype):
    N, K = 72, 384  # K = 3 groups of 128, not a multiple of some blocks; N ragged
    p = W.pack_weight(_weight(N, K, 11), 4, 128, dtype)
    gen = torch.Generator().manual_seed(12)
    bias = torch.randn(N, generator=gen).to(dtype)
    for name, make in CONFIGS.items():
        x = torch.randn(1, M_OF[name], K, generator=gen).to(dtype)  # a leading batch dim
        y = W.w4a16_linear(x, p, bias, config=make(8))
        ref = W.w4a16_linear_reference(x, p, bias)
        assert y.shape == (1, M_OF[name], N)
        assert _rel(y, ref) < _tol(dtype), name
    # the dispatcher's own choice (heuristic in the interpreter), M = 1 and a larger M
    for M in (1, 33):
        x = torch.randn(M, K, generator=gen).to(dtype)
        assert _rel(W.w4a16_linear(x, p, bias), W.w4a16_linear_reference(x, p, bias)) < _tol(dtype)


def test_dequantize_kernel_matches_reference():
    p = W.pack_weight(_weight(40, 192, 3), 4, 64, torch.float16)
    assert torch.equal(W.dequantize_weight_triton(p, torch.float16), W.dequantize_weight(p, torch.float16))
    pb = W.pack_weight(_weight(40, 192, 4), 2, 32, torch.bfloat16)
    got, ref = W.dequantize_weight_triton(pb, torch.bfloat16).float(), W.dequantize_weight(pb).float()
    assert ((got - ref).abs() <= ref.abs() * 2**-7 + 1e-30).all()  # interpreter's truncating bf16 store


def test_dispatch_triton_interpreted_and_torch_otherwise(monkeypatch):
    p = W.pack_weight(_weight(16, 64, 5), 4, 32, torch.float16)
    x = torch.randn(2, 64).half()
    calls = []
    monkeypatch.setattr(W, "w4a16_linear_triton", lambda *a, **k: calls.append(1) or W.w4a16_linear_reference(*a[:3]))
    W.w4a16_linear(x, p)
    assert calls == [1]
    monkeypatch.setenv("AQ_BACKEND", "torch")
    W.w4a16_linear(x, p)
    monkeypatch.delenv("AQ_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # plain CPU: the reference
    W.w4a16_linear(x, p)
    assert calls == [1]


def test_select_config_by_m():
    for M in (1, 2, 16, 64, 300, 4096):
        cfg = W.heuristic_config(M, 4096, 4096, 4, 128)
        assert cfg["kernel"] in ("gemv", "mma", "dequant")
    assert W.heuristic_config(1, 4096, 4096, 4, 128)["kernel"] == "gemv"
    assert W.heuristic_config(4096, 4096, 4096, 4, 128)["kernel"] == "dequant"
    assert [W.m_bucket(m) for m in (1, 2, 3, 16, 17, 5000, 10**6)] == [1, 2, 4, 16, 32, 8192, 16384]
    assert tuned.config_file("NVIDIA H100 80GB HBM3").name == "NVIDIA_H100_80GB_HBM3.json"


def test_shipped_config_files_are_well_formed():
    paths = list(tuned.CONFIG_DIR.glob("*.json"))
    assert paths, "no tuned configs shipped"
    for path in paths:
        table = json.loads(path.read_text()).get(W.FAMILY, {})
        for key, buckets in table.items():
            cb, g, K, N = (int(v) for v in key.split(":"))
            assert cb in (2, 4, 8) and K % g == 0
            for m, cfg in buckets.items():
                assert int(m) >= 1 and cfg["kernel"] in ("gemv", "mma", "dequant"), (path.name, key, m)


def test_bad_inputs_raise_clear_errors():
    w = _weight(16, 96, 6)
    with pytest.raises(ValueError, match="does not divide"):
        W.pack_weight(w, 4, 64)  # K = 96 is not a multiple of g = 64
    with pytest.raises(ValueError, match="multiple of 8"):
        W.pack_weight(_weight(16, 12, 0), 4, None)  # per channel, K = 12 not a multiple of 8 codes per word
    with pytest.raises(ValueError, match="multiple of 16"):
        W.pack_weight(_weight(16, 64, 0), 2, 8)  # 2-bit: 16 codes per word
    with pytest.raises(ValueError, match="bits"):
        W.pack_weight(w, 1, 32)
    with pytest.raises(ValueError, match="bits"):
        W.pack_weight(w, 9, 32)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        W.pack_weight(w[None], 4, 32)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        W.pack_weight(w, 4, 32, torch.float32)
    codes = torch.full((16, 96), 16, dtype=torch.uint8)
    s, z = torch.ones(16, 3), torch.zeros(16, 3)
    with pytest.raises(ValueError, match="out of range"):
        W.pack_w4a16_codes(codes, s, z, 4, 32)
    with pytest.raises(ValueError, match="zero points"):
        W.pack_w4a16_codes(codes.clamp(max=15), s, z + 0.5, 4, 32)
    with pytest.raises(ValueError, match=r"\[N, K // g\]"):
        W.pack_w4a16_codes(codes.clamp(max=15), s[:, :2], z[:, :2], 4, 32)
    p = W.pack_weight(w, 4, 32, torch.float16)
    with pytest.raises(ValueError, match="K=96"):
        W.w4a16_linear(torch.randn(2, 64).half(), p)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        W.w4a16_linear(torch.randn(2, 96), p)
    with pytest.raises(ValueError, match="bias"):
        W.w4a16_linear(torch.randn(2, 96).half(), p, torch.zeros(15).half())
    with pytest.raises(ValueError, match="unknown"):
        W.w4a16_linear(torch.randn(2, 96).half(), p, config=dict(kernel="nope", block_kw=4))
