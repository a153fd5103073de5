"""W4A4 on the GPU: compiled-kernel correctness, a GEMM config sweep, and the benchmark table and plot.

    python3 bench/w4a4.py check                  # compiled kernels vs the torch references, ragged shapes (exit 1
                                                 # on failure)
    python3 bench/w4a4.py sweep --out DIR --write  # candidate GEMM configs per M bucket, timed; the winners go to
                                                   # aq/kernels/configs/w4a4-<gpu>.json (and DIR/w4a4-<gpu>.json)
    python3 bench/w4a4.py bench --out DIR        # cuBLAS bf16, torch._int_mm, aq W4A4 with/without activation
                                                 # quantization

Timing: every call is captured in a CUDA graph together with copies of itself on other buffers (enough copies that the
weights they read total >= 200 MB, four times the H100's L2), so launch gaps and a warm L2 do not flatter anything; the
graph is replayed 30 times and the median per call is reported. Inputs are fresh random tensors (never zeros).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from aq.kernels import w4a4 as W
from bench.timing import copies_for, graph_time

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 4096]
ROTATE_BYTES = 200e6
FAILS = []
DEADLINE_ACT, DEADLINE_GEMM = 60, 80  # seconds: a check that runs out of time fails, it never eats the whole lease
# ragged shapes for the compiled-kernel checks: (M, K) and (M, N, K)
ACT_SHAPES = [(1, 64), (3, 203), (37, 4096), (300, 4096), (5, 14336), (2, 20000), (64, 11008)]
GEMM_SHAPES = [(1, 200, 203), (7, 4096, 4096), (16, 300, 4100), (33, 1000, 999), (64, 4096, 14336), (100, 520, 4096),
               (300, 4096, 1000), (1000, 200, 4096), (2048, 4096, 4096)]


def fail(msg):
    FAILS.append(msg)
    print("FAIL", msg, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
def rand_act(M, K, dtype, g, dev):
    x = torch.randn(M, K, generator=g, device=dev) * 2 + torch.randn(M, 1, generator=g, device=dev)
    cols = torch.randint(0, K, (max(1, K // 100),), generator=g, device=dev)
    x[:, cols] *= 20  # outlier channels, as in LLM activations
    return x.to(dtype)


def int_reference(a: W.QuantizedActivation, wt: W.W4A4Weight) -> torch.Tensor:
    """Exact sum_k (qa - za)(qw - zw) through torch._int_mm (cuBLAS int8; codes < 16 fit int8), int64 corrections."""
    q = a.q.reshape(-1, wt.K)
    M, K, N = q.shape[0], wt.K, wt.N
    Mp, Kp, Np = max(32, -(-M // 8) * 8), -(-K // 8) * 8, -(-N // 8) * 8
    qa = torch.zeros(Mp, Kp, dtype=torch.int8, device=q.device)
    qa[:M, :K] = q
    qw = torch.zeros(Np, Kp, dtype=torch.int8, device=q.device)
    qw[:N, :K] = wt.codes().to(torch.int8)
    acc = torch._int_mm(qa, qw.t())[:M, :N].long()
    za = a.zero.reshape(-1).long()[:, None]
    ra = a.code_sum.reshape(-1).long()[:, None]
    zw = wt.zero.long()[None, :]
    rw = wt.code_sum.long()[None, :]
    return (acc - za * rw - ra * zw + K * za * zw).to(torch.int32)


def time_graph(make_call, n_sets, trials=30):
    """Median us per call of make_call(i)() over n_sets buffers, all captured in one CUDA graph."""
    return graph_time([make_call(i) for i in range(n_sets)], reps=trials)


def n_sets_for(nbytes):
    return copies_for(nbytes, cap=48, target=ROTATE_BYTES, least=1)


def gpu_info():
    p = torch.cuda.get_device_properties(0)
    import triton
    return dict(gpu=torch.cuda.get_device_name(0), sms=p.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


# ----------------------------------------------------------------------------------------------------------------------
# check
# ----------------------------------------------------------------------------------------------------------------------
def check_act(dev):
    g = torch.Generator(device=dev).manual_seed(1)
    n = 0
    cases = []
    for M, K in ACT_SHAPES:
        full = (M, K) in ACT_SHAPES[1:4:2]  # every dtype x symmetry on two shapes, bf16 asymmetric elsewhere
        for dtype in (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16,):
            for sym in (False, True) if full else (False,):
                cases.append((M, K, dtype, sym, None, None))
        cases.append((M, K, torch.bfloat16, False, None, "diag"))
        cases.append((M, K, torch.bfloat16, False, "rms", None))
        cases.append((M, K, torch.bfloat16, True, "layer", "diag"))
        if K % 64 == 0:
            cases.append((M, K, torch.bfloat16, False, "rms", "block64"))
        if K % 128 == 0:
            cases.append((M, K, torch.float16, False, "layer", "block128"))
    cases += [(M, 4096, torch.float32, sym, None, "ties") for M in (64, 300) for sym in (False, True)]
    t0 = time.time()
    for M, K, dtype, sym, norm, tr in cases:
        if time.time() - t0 > DEADLINE_ACT:
            fail(f"act check out of time after {n} of {len(cases)} cases")
            break
        x = rand_act(M, K, dtype, g, dev)
        if tr == "ties":
            # values on a grid of quarter steps with the range forced to [-7.5, 7.5]: scale 1, many exact ties
            x = torch.randint(-30, 31, (M, K), generator=g, device=dev).float() / 4
            x[:, 0], x[:, 1] = -7.5, 7.5
            if M > 64:  # and rows whose scale is not a power of two: near ties after the division
                x[64:] *= 1.7
            tr = None
        kw = dict(bits=4, symmetric=sym, norm=norm)
        if norm:
            kw["norm_weight"] = (1 + 0.2 * torch.randn(K, generator=g, device=dev)).to(dtype)
            kw["norm_eps"] = 1e-5
        if norm == "layer":
            kw["norm_bias"] = (0.1 * torch.randn(K, generator=g, device=dev)).to(dtype)
        if tr == "diag":
            kw["transform"] = torch.exp(0.3 * torch.randn(K, generator=g, device=dev))
        elif tr:
            h = int(tr[5:])
            kw["transform"] = (torch.eye(h, device=dev) + torch.randn(K // h, h, h, generator=g, device=dev) / h)
        got = W.quantize_activation(x, **kw)
        # the ground truth is the reference on the CPU (torch on CUDA divides by a scalar through its reciprocal)
        ref = W.quantize_activation_reference(x.cpu(), **{k: (v.cpu() if torch.is_tensor(v) else v)
                                                          for k, v in kw.items()})
        got = W.QuantizedActivation(*(t.cpu() for t in got))
        tag = f"act M={M} K={K} {dtype} sym={sym} norm={norm} tr={tr}"
        if norm is None and tr in (None, "diag"):
            for name, u, v in zip(got._fields, got, ref):
                if not torch.equal(u, v):
                    fail(f"{tag}: {name} differs ({(u != v).sum().item()} of {u.numel()})")
        else:
            dq = (got.q.int() - ref.q.int()).abs()
            frac = (dq > 0).float().mean().item()
            srel = ((got.scale - ref.scale).abs() / ref.scale).max().item()
            if dq.max().item() > 1 or frac > 2e-3 or srel > 1e-4:
                fail(f"{tag}: max code diff {dq.max().item()}, mismatches {frac:.2e}, scale rel {srel:.1e}")
            if not torch.equal(got.code_sum, got.q.int().sum(-1, dtype=torch.int32)):
                fail(f"{tag}: code_sum is not the sum of the codes")
        n += 1
    print(f"check act: {n} cases in {time.time() - t0:.0f} s", flush=True)


def gemm_configs():
    """The default and shipped configs, plus the first default without the inline-asm unpacking."""
    seen, out = set(), []
    first = {k: v for k, v in W.DEFAULT_CONFIGS[0].items() if k != "max_m"}
    last = {k: v for k, v in W.DEFAULT_CONFIGS[-1].items() if k != "max_m"}
    variants = [dict(first, SPLIT=528), dict(first, SPLIT=528, TMA=True), dict(first, USE_ASM=False),
                dict(last, SPLIT=264), dict(last, TMA=True), dict(last, TMA=True, W8=True), dict(last, W8=True)]
    for c in variants + list(W.configs_for(torch.cuda.get_device_name(0))) + list(W.DEFAULT_CONFIGS):
        c2 = {k: v for k, v in c.items() if k != "max_m"}
        key = json.dumps(c2, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(c2)
    return out


def check_gemm(dev):
    g = torch.Generator(device=dev).manual_seed(2)
    data = []
    t0 = time.time()
    for M, N, K in GEMM_SHAPES:
        w = torch.randn(N, K, generator=g, device=dev) * 0.02
        for sym_w, sym_a in ((False, False), (True, True), (False, True)):
            wt = W.pack_w4a4_weight(w, 4, sym_w)
            a = W.quantize_activation(rand_act(M, K, torch.bfloat16, g, dev), 4, sym_a)
            bias = torch.randn(N, generator=g, device=dev).to(torch.bfloat16)
            data.append(((M, N, K, sym_w, sym_a), wt, a, bias, int_reference(a, wt)))
    print(f"  gemm data ready [{time.time() - t0:.0f} s]", flush=True)
    # the float64 reference on small shapes confirms int_reference itself
    for (M, N, K, *_), wt, a, _bias, sref in data[:6]:
        if not torch.equal(W.w4a4_matmul_reference(a, wt, None, torch.int32), sref):
            fail(f"int_reference disagrees with the float64 reference at {(M, N, K)}")
    n = 0
    t0 = time.time()
    for ci, cfg in enumerate(gemm_configs()):
        if time.time() - t0 > DEADLINE_GEMM:
            fail(f"gemm check out of time at config {ci}")
            break
        for (shape, wt, a, bias, sref) in data:
            M, N, K = shape[:3]
            cfg_run = dict(cfg)
            ragged = K % 2 or ((K + 1) // 2) % cfg["BLOCK_KH"]
            if ragged or ci == 0:  # exact integers on every ragged shape; outputs in bf16/fp16 on the others
                s = W.w4a4_matmul_triton(a, wt, None, torch.int32, config=dict(cfg_run))
                if not torch.equal(s, sref):
                    fail(f"gemm {cfg} {shape}: int32 differs at {(s != sref).sum().item()} of {s.numel()}")
                if not ragged:
                    continue
            for odt in (torch.bfloat16, torch.float16) if ci == 0 else (torch.bfloat16,):
                y = W.w4a4_matmul_triton(a, wt, bias, odt, config=dict(cfg_run))
                yref = (sref.double() * a.scale.double()[:, None] * wt.scale.double()[None, :] + bias.double())
                err = ((y.double() - yref).abs() / (yref.abs() + 1e-3)).max().item()
                if not torch.isfinite(y).all() or err > 1e-2:
                    fail(f"gemm {cfg} {shape} {odt}: max rel err {err:.2e}")
            n += 1
        print(f"  gemm config {ci} checked [{time.time() - t0:.0f} s]: {cfg}", flush=True)
    # the public entry with its own dispatch, 3-D input
    x = torch.randn(2, 9, 4096, device=dev, dtype=torch.bfloat16)
    wt = W.pack_w4a4_weight(torch.randn(512, 4096, device=dev) * 0.02)
    y = W.w4a4_linear(x, wt)
    wc = wt.to("cpu")
    yr = W.w4a4_matmul_reference(W.quantize_activation_reference(x.cpu()), wc, None, torch.float32).double().to(dev)
    err = ((y.double() - yr).abs().max() / yr.abs().max()).item()
    if y.shape != (2, 9, 512) or y.dtype != torch.bfloat16 or err > 1e-2:
        fail(f"w4a4_linear 3-D: shape {tuple(y.shape)} dtype {y.dtype} err {err:.1e}")
    print(f"check gemm: {n} config x shape cases", flush=True)


def cmd_check(args):
    dev = torch.device("cuda")
    t0 = time.time()
    if args.only in (None, "act"):
        check_act(dev)
    if args.only in (None, "gemm"):
        check_gemm(dev)
    print(f"check: {'FAILED ' + str(len(FAILS)) if FAILS else 'all passed'} in {time.time() - t0:.0f} s", flush=True)
    return 1 if FAILS else 0


# ----------------------------------------------------------------------------------------------------------------------
# sweep
# ----------------------------------------------------------------------------------------------------------------------
def candidates():
    """(bucket max_m, config) pairs; every config is checked against the reference before it is timed."""
    C = []
    sw = dict(kernel="swap", GROUP_M=1, num_warps=4)
    for bn in (32, 64):
        for split in (0, 264, 528):
            for tma in (False, True):
                C.append((16, dict(sw, BLOCK_M=16, BLOCK_N=bn, BLOCK_KH=256, num_stages=5, SPLIT=split, TMA=tma)))
    C += [(16, dict(sw, BLOCK_M=16, BLOCK_N=128, BLOCK_KH=256, num_stages=4, SPLIT=528, TMA=True)),
          (16, dict(sw, BLOCK_M=16, BLOCK_N=64, BLOCK_KH=256, num_stages=4, SPLIT=1056, TMA=True)),
          (16, dict(sw, BLOCK_M=16, BLOCK_N=64, BLOCK_KH=128, num_stages=6, SPLIT=528, TMA=True)),
          (16, dict(sw, BLOCK_M=16, BLOCK_N=64, BLOCK_KH=256, num_stages=5, SPLIT=528, TMA=True, num_warps=8))]
    for split in (0, 264, 528):
        for tma in (False, True):
            C.append((32, dict(sw, BLOCK_M=32, BLOCK_N=64, BLOCK_KH=256, num_stages=4, SPLIT=split, TMA=tma)))
            C.append((64, dict(sw, BLOCK_M=64, BLOCK_N=64, BLOCK_KH=128, num_stages=4, SPLIT=split, TMA=tma)))
    ti = dict(kernel="tile", GROUP_M=8)
    C += [(128, dict(ti, BLOCK_M=128, BLOCK_N=64, BLOCK_KH=128, num_warps=4, num_stages=4, TMA=True)),
          (128, dict(ti, BLOCK_M=64, BLOCK_N=128, BLOCK_KH=128, num_warps=4, num_stages=3, SPLIT=264, TMA=True)),
          (128, dict(sw, BLOCK_M=128, BLOCK_N=64, BLOCK_KH=128, num_stages=4, SPLIT=264, TMA=True)),
          (128, dict(ti, BLOCK_M=128, BLOCK_N=64, BLOCK_KH=128, num_warps=4, num_stages=4, SPLIT=264, TMA=True)),
          (512, dict(ti, BLOCK_M=128, BLOCK_N=128, BLOCK_KH=128, num_warps=8, num_stages=3, TMA=True)),
          (512, dict(ti, BLOCK_M=128, BLOCK_N=128, BLOCK_KH=128, num_warps=8, num_stages=3, SPLIT=264, TMA=True)),
          (512, dict(ti, BLOCK_M=128, BLOCK_N=256, BLOCK_KH=64, num_warps=8, num_stages=3, TMA=True, W8=True))]
    C += [(None, dict(ti, BLOCK_M=128, BLOCK_N=128, BLOCK_KH=128, num_warps=8, num_stages=3, TMA=True, W8=True)),
          (None, dict(ti, BLOCK_M=128, BLOCK_N=256, BLOCK_KH=64, num_warps=8, num_stages=3, TMA=True, W8=True)),
          (None, dict(ti, BLOCK_M=128, BLOCK_N=256, BLOCK_KH=64, num_warps=8, num_stages=4, TMA=True, W8=True)),
          (None, dict(ti, BLOCK_M=128, BLOCK_N=256, BLOCK_KH=128, num_warps=8, num_stages=2, TMA=True, W8=True)),
          (None, dict(ti, BLOCK_M=256, BLOCK_N=128, BLOCK_KH=64, num_warps=8, num_stages=4, TMA=True, W8=True)),
          (None, dict(ti, BLOCK_M=128, BLOCK_N=256, BLOCK_KH=64, num_warps=8, num_stages=3, TMA=True, W8=True,
                      GROUP_M=16))]
    return C


BUCKET_M = {16: 8, 32: 32, 64: 64, 128: 128, 512: 512, None: 4096}
SWEEP_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]


def make_problem(M, K, N, dev, g, n_sets=1):
    """n_sets independent (activation, weight) pairs of one shape."""
    sets = []
    for _ in range(n_sets):
        w = torch.randn(N, K, generator=g, device=dev) * 0.02
        wt = W.pack_w4a4_weight(w)
        x = rand_act(M, K, torch.bfloat16, g, dev)
        sets.append((x, W.quantize_activation(x), wt, w))
    return sets


def cmd_sweep(args):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    t0 = time.time()
    by_bucket = {}
    for bucket, cfg in candidates():
        by_bucket.setdefault(bucket, []).append(cfg)
    best_table = []
    for bucket, cfgs in by_bucket.items():
        M = BUCKET_M[bucket]
        if time.time() - t0 > args.budget:
            dflt = next(c for c in W.DEFAULT_CONFIGS if c["max_m"] == bucket)
            best_table.append(dict(dflt))
            print(f"bucket max_m={bucket}: out of time, default kept", flush=True)
            continue
        scores = {}
        for K, N in SWEEP_SHAPES:
            n_sets = n_sets_for(N * K // 2 + M * K)
            sets = make_problem(M, K, N, dev, g, n_sets)
            sref = int_reference(sets[0][1], sets[0][2])
            yref = sref.float() * (sets[0][1].scale[:, None] * sets[0][2].scale[None, :])
            for i, cfg in enumerate(cfgs):
                try:
                    y = W.w4a4_matmul_triton(sets[0][1], sets[0][2], None, torch.bfloat16, config=dict(cfg))
                    if not ((y.float() - yref).abs() <= 1e-2 * yref.abs() + 1e-6).all():
                        fail(f"sweep {cfg} M={M} K={K} N={N}: wrong result")
                        scores.setdefault(i, []).append(float("inf"))
                        continue
                    us = time_graph(lambda j: (lambda: W.w4a4_matmul_triton(sets[j][1], sets[j][2], None,
                                                                            torch.bfloat16, config=dict(cfg))),
                                    n_sets, trials=15)
                except Exception as e:
                    print(f"sweep {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    us = float("inf")
                scores.setdefault(i, []).append(us)
                results.append(dict(bucket=bucket, M=M, K=K, N=N, config=cfg, us=us))
                print(f"sweep M={M:5d} K={K:5d} N={N:5d} {us:9.2f} us  {cfg}", flush=True)
            sets = None  # free the buffers (the timing closures that use them have run)
            torch.cuda.empty_cache()
        geo = {i: math.exp(sum(math.log(t) for t in ts) / len(ts)) for i, ts in scores.items()}
        best = min(geo, key=geo.get)
        best_table.append(dict(max_m=bucket, **cfgs[best]))
        print(f"bucket max_m={bucket}: best {cfgs[best]} (geomean {geo[best]:.2f} us) in {time.time() - t0:.0f} s",
              flush=True)
    info = gpu_info()
    (out / "sweep.json").write_text(json.dumps(dict(info=info, results=results), indent=1))
    best_table.sort(key=lambda c: float("inf") if c["max_m"] is None else c["max_m"])
    (out / "w4a4-configs.json").write_text(json.dumps(best_table, indent=1))
    if args.write:
        from aq.kernels import tuned

        meta = dict(note="W4A4 GEMM configs per M bucket, from bench/w4a4.py sweep", gpu=info["gpu"], date=info["date"])
        print("wrote", tuned.write_tuned(W.FAMILY, torch.cuda.get_device_name(0), best_table, meta))
    print("\n".join(json.dumps(c) for c in best_table))
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------------------------
METHODS = ["cublas_bf16", "int8_mm", "aq_gemm", "aq_quant_gemm", "aq_quant"]


def bench_point(M, K, N, dev, g):
    row = dict(M=M, K=K, N=N)
    # cuBLAS bf16
    n = n_sets_for(2 * N * K + 2 * M * K)
    ws = [torch.randn(N, K, generator=g, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(n)]
    xs = [rand_act(M, K, torch.bfloat16, g, dev) for _ in range(n)]
    row["cublas_bf16"] = time_graph(lambda i: (lambda: F.linear(xs[i], ws[i])), n)
    ws = None  # free the buffers (the timing closures that use them have run)
    # torch._int_mm on int8 (cuBLAS needs M > 16: smaller M runs as M = 32)
    Mi = M if M > 16 else 32
    n = n_sets_for(N * K + Mi * K)
    wi = [torch.randint(-8, 8, (N, K), generator=g, device=dev, dtype=torch.int8) for _ in range(n)]
    ai = [torch.randint(-8, 8, (Mi, K), generator=g, device=dev, dtype=torch.int8) for _ in range(n)]
    row["int8_mm"] = time_graph(lambda i: (lambda: torch._int_mm(ai[i], wi[i].t())), n)
    wi, ai = None, None  # free the buffers (their closures have run)
    # aq
    n = n_sets_for(N * K // 2 + 2 * M * K)
    sets = [(xs[i % len(xs)], None, W.pack_w4a4_weight(torch.randn(N, K, generator=g, device=dev) * 0.02))
            for i in range(n)]
    sets = [(x, W.quantize_activation(x), wt) for x, _, wt in sets]
    s = W.w4a4_matmul(sets[0][1], sets[0][2], out_dtype=torch.int32)
    if not torch.equal(s, int_reference(sets[0][1], sets[0][2])):
        fail(f"bench M={M} K={K} N={N}: aq result differs from the int8 reference")
    row["config"] = W.pick_config(M, N, K, dev)
    row["aq_gemm"] = time_graph(lambda i: (lambda: W.w4a4_matmul(sets[i][1], sets[i][2],
                                                                  out_dtype=torch.bfloat16)), n)
    row["aq_quant_gemm"] = time_graph(lambda i: (lambda: W.w4a4_linear(sets[i][0], sets[i][2])), n)
    n2 = n_sets_for(3 * M * K)
    xq = [rand_act(M, K, torch.bfloat16, g, dev) for _ in range(n2)]
    row["aq_quant"] = time_graph(lambda i: (lambda: W.quantize_activation(xq[i])), n2)
    sets, xs, xq = None, None, None  # free the buffers (their closures have run)
    torch.cuda.empty_cache()
    # the two numbers: bytes over copy bandwidth, int8 operations over cuBLAS int8's best rate seen on this GPU
    row["floor_bytes_us"] = (N * K / 2 + M * K + 2 * M * N) / 3.0e12 * 1e6
    row["floor_ops_us"] = 2 * M * N * K / 940e12 * 1e6
    return row


def bench_act(dev, g):
    rows = []
    for K in (4096, 14336):
        for M in (1, 16, 512, 4096):
            r = dict(M=M, K=K)
            n = n_sets_for(3 * M * K)
            xs = [rand_act(M, K, torch.bfloat16, g, dev) for _ in range(n)]
            nw = (1 + 0.1 * torch.randn(K, generator=g, device=dev)).to(torch.bfloat16)
            d = torch.exp(0.3 * torch.randn(K, generator=g, device=dev))
            T = torch.eye(64, device=dev) + torch.randn(K // 64, 64, 64, generator=g, device=dev) / 64
            r["torch_rmsnorm"] = time_graph(lambda i: (lambda: F.rms_norm(xs[i], (K,), nw, 1e-6)), n)
            r["plain"] = time_graph(lambda i: (lambda: W.quantize_activation(xs[i])), n)
            r["rms"] = time_graph(lambda i: (lambda: W.quantize_activation(xs[i], norm="rms", norm_weight=nw)), n)
            r["rms_diag"] = time_graph(lambda i: (lambda: W.quantize_activation(
                xs[i], norm="rms", norm_weight=nw, transform=d)), n)
            r["rms_block64"] = time_graph(lambda i: (lambda: W.quantize_activation(
                xs[i], norm="rms", norm_weight=nw, transform=T)), n)
            r["floor_us"] = 3 * M * K / 3.0e12 * 1e6
            rows.append(r)
            print("act", json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}),
                  flush=True)
            xs = None  # free the buffers (the timing closures that use them have run)
    return rows


def write_report(out: Path, info, rows, act_rows):
    (out / "w4a4.json").write_text(json.dumps(dict(info=info, gemm=rows, act=act_rows), indent=1))
    L = [f"# W4A4 GEMM on {info['gpu']} ({info['date']})", "",
         f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}; bf16 activations and outputs; "
         "median us per call, CUDA graphs with rotating buffers (>= 200 MB of weights per replay, so L2 starts cold). "
         "int8_mm is torch._int_mm (cuBLAS int8, M <= 16 run as M = 32). aq_gemm: W4A4 GEMM on pre-quantized "
         "activations; aq_q+gemm: per-token activation quantization (bf16 -> int8 codes) + GEMM. x = speed-up over "
         "cuBLAS bf16. floor: max(bytes / 3.0 TB/s, int8 ops / 940 TOPS) for the aq GEMM.", ""]
    for K, N in SHAPES:
        L += [f"## K x N = {K} x {N}", "",
              "| M | cuBLAS bf16 | int8_mm | aq_gemm | aq_q+gemm | aq quant | floor | int8_mm x | aq_gemm x "
              "| aq_q+gemm x |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if (r["K"], r["N"]) != (K, N):
                continue
            b = r["cublas_bf16"]
            fl = max(r["floor_bytes_us"], r["floor_ops_us"])
            L.append(f"| {r['M']} | {b:.1f} | {r['int8_mm']:.1f} | {r['aq_gemm']:.1f} | {r['aq_quant_gemm']:.1f} | "
                     f"{r['aq_quant']:.1f} | {fl:.1f} | {b / r['int8_mm']:.2f} | {b / r['aq_gemm']:.2f} | "
                     f"{b / r['aq_quant_gemm']:.2f} |")
        L.append("")
    L += ["## Targets", "", "| target | shape | M | aq_q+gemm x | met |", "|---|---|---:|---:|---|"]
    for r in rows:
        x = r["cublas_bf16"] / r["aq_quant_gemm"]
        if r["M"] >= 2048:
            ok = "yes" if x >= 1.2 else "NO"
            L.append(f"| >= 1.2x incl. quant | {r['K']}x{r['N']} | {r['M']} | {x:.2f} | {ok} |")
        elif r["M"] <= 16:
            L.append(f"| >= 3x | {r['K']}x{r['N']} | {r['M']} | {x:.2f} (gemm alone "
                     f"{r['cublas_bf16'] / r['aq_gemm']:.2f}) | {'yes' if x >= 3 else 'NO'} |")
    L += ["", "## Activation quantization alone (us; bf16 in, int8 codes + scale/zero/code sums out)", "",
          "| M | K | torch F.rms_norm (no quant) | plain | rms | rms+diag | rms+block64 | floor (3 B/elem) |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in act_rows:
        L.append(f"| {r['M']} | {r['K']} | {r['torch_rmsnorm']:.1f} | {r['plain']:.1f} | {r['rms']:.1f} | "
                 f"{r['rms_diag']:.1f} | {r['rms_block64']:.1f} | {r['floor_us']:.1f} |")
    L += ["", "Configs used (pick_config):", ""]
    seen = set()
    for r in rows:
        k = json.dumps(r["config"], sort_keys=True)
        if k not in seen:
            seen.add(k)
            L.append(f"- `{k}`")
    (out / "w4a4.md").write_text("\n".join(L) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(SHAPES), figsize=(4.2 * len(SHAPES), 3.8), sharey=True)
        for ax, (K, N) in zip(axes, SHAPES):
            rs = [r for r in rows if (r["K"], r["N"]) == (K, N)]
            Ms = [r["M"] for r in rs]
            for key, lab in (("int8_mm", "torch._int_mm (int8)"), ("aq_gemm", "aq W4A4 GEMM"),
                             ("aq_quant_gemm", "aq W4A4 quant+GEMM")):
                ax.plot(Ms, [r["cublas_bf16"] / r[key] for r in rs], marker="o", label=lab)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.axhline(3.0, color="red", ls=":", lw=0.8)
            ax.axhline(1.2, color="red", ls="--", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"K x N = {K} x {N}", fontsize=9)
            ax.set_xlabel("M (tokens)")
        axes[0].set_ylabel("speed-up over cuBLAS bf16")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"W4A4 on {info['gpu']}, {info['date']} (targets: 3x at M<=16, 1.2x at M>=2048)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "w4a4.png", dpi=110)
    except Exception as e:
        print(f"plot skipped: {e}", flush=True)


def cmd_bench(args):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = gpu_info()
    rows = []
    t0 = time.time()
    shapes = SHAPES if not args.quick else SHAPES[:1]
    for K, N in shapes:
        for M in MS:
            r = bench_point(M, K, N, dev, g)
            rows.append(r)
            write_report(out, info, rows, [])
            print(f"bench K={K:5d} N={N:5d} M={M:5d} bf16 {r['cublas_bf16']:8.1f} int8 {r['int8_mm']:8.1f} "
                  f"aq {r['aq_gemm']:8.1f} aq+q {r['aq_quant_gemm']:8.1f} q {r['aq_quant']:6.1f}  "
                  f"x {r['cublas_bf16'] / r['aq_quant_gemm']:.2f}  [{time.time() - t0:.0f} s]", flush=True)
    act_rows = bench_act(dev, g) if not args.no_act else []
    write_report(out, info, rows, act_rows)
    print((out / "w4a4.md").read_text())
    return 1 if FAILS else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("check")
    p.add_argument("--only", choices=["act", "gemm"])
    p.add_argument("--deadline", type=float, default=80, help="seconds per part (act, gemm)")
    p = sub.add_parser("sweep")
    p.add_argument("--out", default="bench/results/w4a4-sweep")
    p.add_argument("--write", action="store_true", help="write the winners to aq/kernels/configs/w4a4-<gpu>.json")
    p.add_argument("--budget", type=float, default=240, help="seconds; buckets not reached keep the defaults")
    p = sub.add_parser("bench")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--quick", action="store_true", help="first shape only")
    p.add_argument("--no-act", action="store_true", help="skip the activation-quantization table")
    args = ap.parse_args()
    global DEADLINE_ACT, DEADLINE_GEMM
    if args.cmd == "check":
        DEADLINE_ACT = DEADLINE_GEMM = args.deadline
    if not torch.cuda.is_available():
        sys.exit("bench/w4a4.py needs a CUDA GPU (the CPU tests live in tests/test_w4a4.py)")
    sys.exit({"check": cmd_check, "sweep": cmd_sweep, "bench": cmd_bench}[args.cmd](args))


if __name__ == "__main__":
    main()
