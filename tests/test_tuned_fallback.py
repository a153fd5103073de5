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


def test_autotune_budget_prunes_around_the_seed():
    import argparse
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("autotune", Path(__file__).parents[1] / "bench" / "autotune.py")
    at = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(at)
    fam = at.W4A16()
    fam.seed = lambda p, M: W.fallback_config(M, p["N"], p["K"], p["bits"], p["group"], H100, 132)
    args = argparse.Namespace(shapes="", models=",".join(at.MODELS), groups="128", bits=4, buckets="1,16,128,4096")
    problems, buckets = fam.problems(args), fam.buckets(args)
    assert {(p["K"], p["N"]) for p in problems} >= {(896, 4864), (4864, 896), (576, 1536), (14336, 4096)}
    full = at.prune(fam, problems, buckets, 0, 0.5)
    small = at.prune(fam, problems, buckets, 60, 0.5)
    n = len(problems) * len(buckets)
    assert sum(map(len, small.values())) <= max(2, 60 // (n * 0.5)) * n < sum(map(len, full.values()))
    for (key, M), cands in small.items():
        p = next(p for p in problems if fam.key(p) == key)
        seed = fam.seed(p, M)
        assert cands[0] == seed  # the seed is always timed, so tuning never ends worse than the fallback
        d = [at.config_distance(c, seed) for c in cands]
        assert d == sorted(d)


def test_wide_gemv_steps_the_tuner_may_pick_are_correct():
    import torch

    torch.manual_seed(1)
    for M, K, N, bn, split in ((1, 1024, 200, 64, 2), (3, 1536, 130, 128, 1)):
        p = W.pack_weight(torch.randn(N, K) * 0.02, 4, 128, torch.bfloat16)
        x = torch.randn(M, K).bfloat16()
        cfg = dict(kernel="gemv", block_n=bn, block_kw=64, split_k=split, prefetch=M == 1, num_warps=8, num_stages=1)
        y = W.w4a16_linear_triton(x, p, None, cfg)
        ref = W.w4a16_linear_reference(x, p)
        assert ((y.float() - ref.float()).norm() / ref.float().norm()) < 1e-2, cfg
