"""W4A16 configs: the one place that picks the kernel strategy and its launch parameters for a call, by M (the batch
size): this GPU's tuned table (aq/kernels/configs/<gpu>.json, written by bench/autotune.py; bucket = next power of two
of M), else the nearest tuned neighbour (fallback_config), else heuristic_config. Strategies: "gemv"
(aq.kernels.w4a16_gemv), "mma" (aq.kernels.w4a16_mma), "dequant" (aq.kernels.w4a16_dequant, then cuBLAS).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import functools
import os

import torch
import triton

from aq import backend
from aq.kernels import tuned
from aq.packing import container_bits

FAMILY = "w4a16"  # key of this kernel family in the per-GPU config files

if TYPE_CHECKING:
    from aq.kernels.w4a16 import PackedWeight


def m_bucket(M: int) -> int:
    """The M bucket configs are tuned for: the next power of two, capped at 16384."""
    return min(1 << max(M - 1, 0).bit_length(), 16384)


def shape_key(bits: int, group_size: int, K: int, N: int) -> str:
    return f"{container_bits(bits)}:{group_size}:{K}:{N}"


def tuned_table(device_index: int) -> dict:
    return tuned.tuned(FAMILY, torch.cuda.get_device_name(device_index)) or {}


def heuristic_config(M: int, N: int, K: int, bits: int, group_size: int, num_sms: int = 132,
                     interpreting: bool = False) -> dict:
    """A sound config without tuning (also what the interpreter runs, with few large programs there)."""
    e = 32 // container_bits(bits)
    kw = K // e
    if interpreting:
        if M <= 4:
            return dict(kernel="gemv", block_n=64, block_kw=min(64, triton.next_power_of_2(kw)), split_k=1)
        return dict(kernel="mma", block_m=min(64, max(16, triton.next_power_of_2(M))), block_n=64,
                    block_kw=max(16, min(64, triton.next_power_of_2(kw))), split_k=1, swap=False, join=True)

    def split_for(tiles: int, bkw: int, waves: int) -> int:
        return max(1, min(triton.cdiv(waves * num_sms, tiles), triton.cdiv(kw, 2 * bkw)))

    if M == 1:  # what the H100 tuning picked on every LLaMA shape
        bn, bkw = 64, max(16, 256 // e)
        return dict(kernel="gemv", block_n=bn, block_kw=bkw, split_k=split_for(triton.cdiv(N, bn), bkw, 2),
                    prefetch=True, num_warps=4, num_stages=1)
    if M <= 64:
        bm, bn, bkw = max(16, triton.next_power_of_2(M)), 64, max(2, 128 // e)
        return dict(kernel="mma", block_m=bm, block_n=bn, block_kw=bkw, swap=True, join=True, half_dq=True,
                    split_k=split_for(triton.cdiv(N, bn) * triton.cdiv(M, bm), bkw, 2), num_warps=4, num_stages=3)
    if M <= 256:
        return dict(kernel="mma", block_m=128 if M <= 128 else 256, block_n=128, block_kw=max(2, 64 // e),
                    split_k=1, swap=True, join=True, half_dq=True, group_m=8, num_warps=8, num_stages=3)
    return dict(kernel="dequant", block_n=16, block_kw=max(2, 512 // e), half_dq=True, num_warps=4)


def adapt_config(cfg: dict, src_key: str, src_bucket: int, M: int, N: int, K: int, bits: int, group_size: int,
                 num_sms: int, donor_sms: int) -> dict:
    """A tuned config moved to a neighbouring problem: block shapes kept (they are what transfers between shapes), the
    split-K count re-derived so the grid fills the GPU as many times over as it did on the tuned problem, and options
    the new shape cannot take dropped (K step over K, folding across a group boundary)."""
    _, _, sK, sN = (int(v) for v in src_key.split(":"))
    e = 32 // container_bits(bits)
    kw = K // e
    out = {k: v for k, v in cfg.items() if k != "us"}
    if out["kernel"] == "dequant":
        out["block_kw"] = min(out["block_kw"], 1 << max(kw.bit_length() - 1, 1))
        return out
    bkw = min(out["block_kw"], 1 << max(kw.bit_length() - 1, 1))
    if out["kernel"] == "mma" and not out.get("join", True):
        bkw = max(bkw, 16)
    out["block_kw"] = bkw
    bm, bn = out.get("block_m", 1), out["block_n"]
    tiles = lambda m, n: (triton.cdiv(m, bm) if out["kernel"] == "mma" else m) * triton.cdiv(n, bn)  # noqa: E731
    waves = tiles(src_bucket, sN) * cfg.get("split_k", 1) / donor_sms  # how often the tuned grid filled the GPU
    split = round(waves * num_sms / tiles(M, N))
    out["split_k"] = max(1, min(split, triton.cdiv(kw, 2 * bkw)))
    if out.get("fold") and group_size % (bkw * e):
        out["fold"] = False
    return out


def fallback_config(M: int, N: int, K: int, bits: int, group_size: int, device_name: str, num_sms: int,
                    exclude: str | None = None) -> dict:
    """The config for an untuned (shape, M) or GPU: the nearest tuned shape and M bucket of this GPU's table (or the
    closest shipped GPU's), by K, N and M in log space, adapted to this problem (adapt_config); heuristic_config only
    when no table holds this container width. See aq.kernels.tuned for why there is no tuning at first call."""
    donor = tuned.donor_table(FAMILY, device_name, num_sms)
    if donor:
        table, _, donor_sms = donor
        hit = tuned.nearest_shape([k for k in table if k != exclude], container_bits(bits), group_size, K, N,
                                  m_bucket(M), lambda k: [int(b) for b in table[k]])
        if hit:
            key, b = hit
            return adapt_config(table[key][str(b)], key, b, M, N, K, bits, group_size, num_sms, donor_sms)
    return heuristic_config(M, N, K, bits, group_size, num_sms)


@functools.lru_cache(maxsize=4096)
def select_cached(device_index: int, bits: int, group_size: int, K: int, N: int, M: int) -> dict:
    # AQ_FALLBACK (read once per problem, for measurements): "nearest" hides the problem's own tuned entry, so the
    # fallback is timed on tuned shapes; "heuristic" also bypasses the neighbour search (the generic rule)
    mode = os.environ.get("AQ_FALLBACK", "").lower()
    key = shape_key(bits, group_size, K, N)
    entry = tuned_table(device_index).get(key) if mode not in ("nearest", "heuristic") else None
    cfg = entry.get(str(m_bucket(M))) if entry else None
    if cfg:
        return cfg
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    if mode == "heuristic":
        return heuristic_config(M, N, K, bits, group_size, sms)
    return fallback_config(M, N, K, bits, group_size, torch.cuda.get_device_name(device_index), sms,
                           exclude=key if mode == "nearest" else None)


def select_config(M: int, p: PackedWeight, x: torch.Tensor) -> dict:
    """The one place that picks the kernel and its config for a call (by M): the tuned table of this GPU
    (aq/kernels/configs/<gpu>.json, bucket = next power of two of M), else fallback_config (nearest tuned neighbour).
    Do not mutate the result."""
    if x.device.type == "cuda":
        idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
        return select_cached(idx, p.bits, p.group_size, p.K, p.N, M)
    return heuristic_config(M, p.N, p.K, p.bits, p.group_size, interpreting=backend.interpreting())

