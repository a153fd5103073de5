"""Config selection for untuned shapes and GPUs: the nearest tuned neighbour (log K, N, M), adapted."""
import math

from aq.kernels import tuned
from aq.kernels import w4a16 as W

H100 = "NVIDIA H100 80GB HBM3"


def _table():
    return tuned.tuned("w4a16", H100)


def test_shipped_h100_table_is_found_for_an_unknown_hopper():
    table, stem, sms = tuned.donor_table("w4a16", "Some Future GPU", 132)
    assert table == _table() and stem == "NVIDIA_H100_80GB_HBM3" and sms == 132


def test_nearest_shape_is_nearest_in_log_space():
    keys = ["4:128:4096:4096", "4:128:4096:14336", "4:128:14336:4096", "4:64:576:1536", "8:128:4096:4096"]
    b = lambda k: [1, 16, 128, 4096]  # noqa: E731
    assert tuned.nearest_shape(keys, 4, 128, 5120, 13824, 16, b) == ("4:128:4096:14336", 16)
    assert tuned.nearest_shape(keys, 4, 128, 3072, 8192, 100, b)[1] == 128
    assert tuned.nearest_shape(keys, 4, 64, 576, 1536, 3000, b) == ("4:64:576:1536", 4096)
    assert tuned.nearest_shape(keys, 8, 128, 4096, 4096, 1, b) == ("8:128:4096:4096", 1)
    assert tuned.nearest_shape(keys, 2, 128, 4096, 4096, 1, b) is None  # no 2-bit containers tuned


def test_fallback_on_a_tuned_shape_is_the_tuned_config_with_the_same_split():
    table = _table()
    key = "4:128:4096:14336"
    for b, cfg in table[key].items():
        got = W.fallback_config(int(b), 14336, 4096, 4, 128, H100, 132)
        assert got == {k: v for k, v in cfg.items() if k != "us"}, b


def test_fallback_hides_the_own_entry_and_rederives_split_k():
    got = W.fallback_config(1, 14336, 4096, 4, 128, H100, 132, exclude="4:128:4096:14336")
    assert got["kernel"] == "gemv"
    # half the SMs: about half the split (the grid fills the GPU as many times as on the tuned problem)
    full = W.fallback_config(1, 13824, 5120, 4, 128, H100, 132)
    half = W.fallback_config(1, 13824, 5120, 4, 128, H100, 66)
    assert full["kernel"] == half["kernel"] == "gemv"
    assert half["split_k"] <= math.ceil(full["split_k"] / 2) + 1 and half["split_k"] >= 1


def test_fallback_configs_run_and_are_correct_under_the_interpreter():
    import torch

    torch.manual_seed(0)
    for M, K, N in ((1, 256, 96), (5, 512, 72), (40, 256, 64)):
        cfg = W.fallback_config(M, N, K, 4, 64, H100, 2)  # a 2-SM "GPU": small splits the interpreter can run
        cfg = dict(cfg, num_stages=1)
        assert cfg["block_kw"] <= K // 8
        p = W.pack_weight(torch.randn(N, K) * 0.02, 4, 64, torch.float16)
        x = torch.randn(M, K).half()
        y = W.w4a16_linear_triton(x, p, None, cfg)
        ref = W.w4a16_linear_reference(x, p)
        assert ((y.float() - ref.float()).norm() / ref.float().norm()) < 1e-2, (M, cfg)
