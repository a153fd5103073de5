"""GPU timing shared by the bench scripts: CUDA-graph replays over rotating buffers, so that weights stream from DRAM
as in a real forward pass rather than from L2, and decode-sized calls are not bound by Python launch time.

Run the scripts with the package importable (`PYTHONPATH=$PWD python bench/<script>.py ...` from the checkout root, or
an installed aq); they import this module as `bench.timing`.
"""
from __future__ import annotations

import statistics

import torch

L2_ROTATE_BYTES = 160 << 20  # rotate buffer copies until this many bytes: ~3x the H100's 50 MB L2 (2.7x the H200's)


def copies_for(nbytes: int, cap: int = 64, target: float = L2_ROTATE_BYTES, least: int = 2) -> int:
    """How many copies of a buffer of nbytes to rotate through so that together they exceed `target` bytes."""
    return int(max(least, min(cap, -(-target // max(nbytes, 1)))))


def graph_time(calls: list, reps: int = 10, warmup: int = 2) -> float:
    """Median time in microseconds of one call, calls being closures over distinct buffers, all captured into one CUDA
    graph (one replay runs each once, so the buffers rotate through more bytes than L2 holds). Each closure runs once
    outside the capture (compilation), then on a side stream (CUDA-graph warm-up), then `warmup` replays."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    for _ in range(warmup):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    del g
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read and write (1 GiB buffers, under a CUDA graph)."""
    src = torch.empty(1 << 29, device="cuda", dtype=torch.int16)
    dst = torch.empty_like(src)
    us = graph_time([lambda: dst.copy_(src)] * 4, 10)
    return 2 * (1 << 30) / (us * 1e-6)
