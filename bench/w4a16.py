"""W4A16 on the GPU: correctness of the compiled kernels, and the benchmark against cuBLAS bf16 and torch's int4 kernel.

    python bench/w4a16.py --check                 # every kernel path vs the reference (bits, groups, dtypes, ragged)
    python bench/w4a16.py --bench --out DIR       # the table: do_bench medians and CUDA-graph times, roofline fractions
    python bench/w4a16.py --plot DIR/w4a16.json   # the PNG from a results file (needs matplotlib)

Timing: triton.testing.do_bench (median, L2 flushed before each call) and CUDA-graph replays over enough rotating weight
copies that weights stream from DRAM (bench/timing.py's graph_time). Roofline: the larger of bytes / copy bandwidth
and
flops / bf16 GEMM rate, both ceilings measured in the same run (bytes: the weight as stored, x, y; scales and zeros
counted for the int4 kernels).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 11008), (11008, 4096)]  # K x N
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 4096]
TARGETS = {1: 3.0, 16: 2.0, 4096: 0.9}  # x cuBLAS bf16, g128, bf16


# ------------------------------------------------------------------------------------------------------------ check
def _check_cases():
    """(bits, group, dtype, M, N, K, cfg) covering every kernel path; ragged M and N, K not a multiple of the block."""
    cases = []
    for bits in (2, 3, 4, 8):
        e = 32 // (2 if bits == 2 else 4 if bits <= 4 else 8)
        for dt in ("bfloat16", "float16"):
            for g in (32, 64, 128, None):
                K = 576 if g in (32, 64) else 768
                N = 200
                big = max(2, 128 // e)
                cfgs = [
                    (1, dict(kernel="gemv", block_n=64, block_kw=16, split_k=1)),
                    (3, dict(kernel="gemv", block_n=128, block_kw=8, split_k=3, prefetch=True)),
                    (16, dict(kernel="mma", block_m=16, block_n=64, block_kw=big, split_k=3, swap=True, join=True,
                              half_dq=True)),
                    (5, dict(kernel="mma", block_m=16, block_n=128, block_kw=max(16, big), split_k=2, swap=True,
                             join=False, half_dq=True)),
                    (33, dict(kernel="mma", block_m=32, block_n=64, block_kw=big, split_k=1, swap=False, join=True,
                              half_dq=True)),
                    (200, dict(kernel="mma", block_m=128, block_n=128, block_kw=max(2, 64 // e), split_k=1, swap=True,
                               join=True, half_dq=True, num_warps=8)),
                    (130, dict(kernel="dequant", block_n=32, block_kw=big, half_dq=True)),
                    (7, dict(kernel="mma", block_m=16, block_n=64, block_kw=big, split_k=1, swap=True, join=True,
                             half_dq=False)),
                    (9, dict(kernel="mma", block_m=16, block_n=64, block_kw=max(2, 32 // e), split_k=2, swap=True,
                             join=True, half_dq=True, fold=True)),
                    (1, dict(kernel="mma", block_m=16, block_n=128, block_kw=big, split_k=1, swap=True, join=True,
                             half_dq=True, fold=True)),
                ]
                for M, cfg in cfgs:
                    cases.append((bits, g, dt, M, N, K, cfg))
    return cases


def _run_checks(cases):
    from aq.kernels import w4a16 as W

    out = []
    for bits, g, dt, M, N, K, cfg in cases:
        dtype = getattr(torch, dt)
        gen = torch.Generator(device="cuda").manual_seed(1000 * bits + 10 * M + (g or 7) + len(dt))
        try:
            w = torch.randn(N, K, device="cuda", generator=gen) * 0.05
            p = W.pack_weight(w, bits, g, dtype)
            assert torch.equal(W.unpack_weight(W.pack_w4a16_codes(W.unpack_weight(p), p.scales.t().float(),
                                                            p.zeros.t().float(), bits, g, dtype)), W.unpack_weight(p))
            x = torch.randn(M, K, device="cuda", dtype=dtype, generator=gen)
            bias = torch.randn(N, device="cuda", dtype=dtype, generator=gen)
            ref = W.w4a16_linear_reference(x, p, bias).float()
            y = W.w4a16_linear_triton(x, p, bias, cfg)  # first call: Triton's launcher (compiles)
            y2 = W.w4a16_linear_triton(x, p, bias, cfg)  # later calls: the cached fast launch path
            torch.cuda.synchronize()
            err = float((y.float() - ref).norm() / ref.norm())
            finite = bool(torch.isfinite(y).all()) and bool(torch.equal(y, y2))
            for _ in range(3):  # the dispatcher's own choice; the later calls run the cached plan
                y3 = W.w4a16_linear(x, p, bias)
            torch.cuda.synchronize()
            err = max(err, float((y3.float() - ref).norm() / ref.norm()))
            exact = None
            if cfg["kernel"] == "dequant":  # the dequantized weight itself must be bit-identical to the reference
                exact = bool(torch.equal(W.dequantize_weight_triton(p, dtype, cfg), W.dequantize_weight(p, dtype)))
            ok = finite and err < (1e-2 if dt == "bfloat16" else 2e-3) and exact is not False
            out.append(dict(bits=bits, g=g, dt=dt, M=M, cfg=cfg, err=err, exact=exact, ok=ok))
        except Exception as e:  # noqa: BLE001
            out.append(dict(bits=bits, g=g, dt=dt, M=M, cfg=cfg, err=None, ok=False,
                            error=f"{type(e).__name__}: {e}"[:300]))
    return out


def check(jobs: int) -> bool:
    cases = _check_cases()
    t0 = time.time()
    ctx = mp.get_context("spawn")
    res = []
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as ex:
        for f in [ex.submit(_run_checks, cases[i::jobs]) for i in range(jobs)]:
            res += f.result()
    bad = [r for r in res if not r["ok"]]
    worst = {}
    for r in res:
        k = (r["cfg"]["kernel"], r["cfg"].get("swap"), r["cfg"].get("join"), r["cfg"].get("half_dq"),
             r["cfg"].get("fold"), r["dt"])
        if r["err"] is not None:
            worst[k] = max(worst.get(k, 0), r["err"])
    print(f"check: {len(res)} cases, {len(bad)} failed, {time.time() - t0:.0f}s")
    for k, v in sorted(worst.items(), key=str):
        print(f"   worst rel err {k}: {v:.2e}")
    for r in bad[:20]:
        print("   FAIL", json.dumps(r))
    return not bad


# ------------------------------------------------------------------------------------------------------------ bench
def ceilings() -> dict:
    import triton.testing as tt

    a = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = tt.do_bench(lambda: b.copy_(a), return_mode="median")
    bw = 2 * a.numel() / (t * 1e-3)
    a, b = None, None  # free the buffers (their closures have run)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = tt.do_bench(lambda: x @ y, return_mode="median")
    return dict(copy_bytes_per_s=bw, bf16_flops_per_s=2 * 8192**3 / (t * 1e-3))


def _tinygemm_pack(p, codes):
    """torch's int4 layout from aq's codes: uint8 [N, K/2] (even k in the high nibble), and scales_and_zeros
    [K/g, N, 2] with tinygemm's zero convention w = (q - 8) * s + zt, i.e. zt = (8 - z) * s."""
    w_u8 = ((codes[:, ::2].to(torch.int32) << 4) | codes[:, 1::2].to(torch.int32)).to(torch.uint8)
    packed = torch._convert_weight_to_int4pack(w_u8.contiguous(), 8)
    s = p.scales.float()
    zt = (8 - p.zeros.float()) * s
    sz = torch.stack([s, zt], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def bench(out_dir: Path, shapes, ms, reps: int) -> dict:
    import triton.testing as tt
    from bench.timing import copies_for, graph_time

    from aq.kernels import w4a16 as W

    ceil = ceilings()
    BW, PEAK = ceil["copy_bytes_per_s"], ceil["bf16_flops_per_s"]
    rows = []
    dt = torch.bfloat16
    for K, N in shapes:
        torch.manual_seed(0)
        w = torch.randn(N, K, device="cuda") * 0.02
        p = W.pack_weight(w, 4, 128, dt)
        codes = W.unpack_weight(p)
        wdq = W.dequantize_weight(p, dt)
        try:
            t_packed, t_sz = _tinygemm_pack(p, codes)
            tiny_ok = True
        except Exception as e:  # noqa: BLE001
            print("torch int4 unavailable:", e)
            tiny_ok = False
        n_b = copies_for(2 * N * K, cap=16)
        n_q = copies_for(p.nbytes(), cap=64)
        wb = [wdq.clone() for _ in range(n_b)]
        pq = [W.PackedWeight(p.qweight.clone(), p.scales.clone(), p.zeros.clone(), 4, 128, N, K) for _ in range(n_q)]
        tq = [(t_packed.clone(), t_sz.clone()) for _ in range(n_q)] if tiny_ok else []
        bytes_b = 2 * N * K
        bytes_q = p.nbytes()
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=dt)
            ref = W.w4a16_linear_reference(x, p).float()
            cfg = W.select_config(M, p, x)
            fns = {
                "cublas": (lambda: torch.nn.functional.linear(x, wb[0]),
                           [lambda w_=w_: torch.nn.functional.linear(x, w_) for w_ in wb], bytes_b),
                "aq": (lambda: W.w4a16_linear(x, pq[0]), [lambda q=q: W.w4a16_linear(x, q) for q in pq], bytes_q),
            }
            if tiny_ok:
                fns["torch_int4"] = (lambda: torch._weight_int4pack_mm(x, t_packed, 128, t_sz),
                                     [lambda a=a, b=b: torch._weight_int4pack_mm(x, a, 128, b) for a, b in tq], bytes_q)
            row = dict(K=K, N=N, M=M, cfg=cfg)
            for name, (fn, calls, wbytes) in fns.items():
                fn(), fn()  # the error is taken on a warm call (aq: the cached launch plan)
                err = float((fn().float() - ref).norm() / ref.norm())
                t_db = tt.do_bench(fn, warmup=10, rep=reps, return_mode="median") * 1e3
                t_g = graph_time(calls, reps=10)
                flops = 2 * M * N * K
                nbytes = wbytes + 2 * M * K + 2 * M * N
                roof = max(nbytes / BW, flops / PEAK) * 1e6
                row[name] = dict(do_bench_us=t_db, graph_us=t_g, err=err, roof_us=roof, roof_frac_db=roof / t_db,
                                 roof_frac_graph=roof / t_g)
            rows.append(row)
            c, a = row["cublas"], row["aq"]
            ti = row.get("torch_int4", {})
            print(f"{K:>6}x{N:<6} M={M:<5} cublas {c['do_bench_us']:8.1f} {c['graph_us']:8.1f} | "
                  f"int4 {ti.get('do_bench_us', float('nan')):8.1f} {ti.get('graph_us', float('nan')):8.1f} | "
                  f"aq {a['do_bench_us']:8.1f} {a['graph_us']:8.1f} x{c['do_bench_us'] / a['do_bench_us']:5.2f} "
                  f"roof {a['roof_frac_db']:.2f} err {a['err']:.1e} {cfg['kernel']}", flush=True)
        wb, pq, tq = None, None, None  # free the buffers (their closures have run)
        torch.cuda.empty_cache()
    res = dict(gpu=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
               triton=__import__("triton").__version__, ceilings=ceil, group=128, dtype="bfloat16", rows=rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "w4a16.json").write_text(json.dumps(res, indent=1) + "\n")
    (out_dir / "w4a16.md").write_text(markdown(res))
    try:
        plot(res, out_dir / "w4a16.png")
    except ImportError:
        print("matplotlib missing: run --plot on the results file elsewhere")
    return res


def markdown(res: dict) -> str:
    c = res["ceilings"]
    lines = [
        f"# W4A16 benchmark: {res['gpu']}, {res['date']}",
        "",
        f"torch {res['torch']}, triton {res['triton']}; weights 4-bit, g = {res['group']}, bf16 activations, no bias. "
        "Times in us: do_bench median (L2 flushed) / CUDA-graph replay over rotating weight copies (weights from "
        "DRAM). Speed-up = cuBLAS time / aq time (do_bench). "
        f"Roofline fraction = max(bytes / {c['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"flops / {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s) / time (both ceilings measured in this run).",
        "",
        "| K x N | M | cuBLAS bf16 | torch int4 | aq | aq kernel | aq / cuBLAS | aq / int4 "
        "| roofline cuBLAS / int4 / aq |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        cb, aq, ti = r["cublas"], r["aq"], r.get("torch_int4")
        tis = f"{ti['do_bench_us']:.1f} / {ti['graph_us']:.1f}" if ti else "n/a"
        vs_ti = f"{ti['do_bench_us'] / aq['do_bench_us']:.2f}x" if ti else "n/a"
        rf = (f"{cb['roof_frac_db']:.2f} / {ti['roof_frac_db'] if ti else float('nan'):.2f} / "
              f"{aq['roof_frac_db']:.2f}")
        kern = r["cfg"]["kernel"]
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {cb['do_bench_us']:.1f} / {cb['graph_us']:.1f} | {tis} | "
                     f"{aq['do_bench_us']:.1f} / {aq['graph_us']:.1f} | {kern} | "
                     f"{cb['do_bench_us'] / aq['do_bench_us']:.2f}x | {vs_ti} | {rf} |")
    lines += ["", "Targets (g128, bf16): M = 1 >= 3.0x cuBLAS on 4096x14336 and 14336x4096; M = 16 >= 2.0x; "
              "M = 4096 >= 0.9x; faster than torch int4 at every M.", ""]
    for M, tgt in TARGETS.items():
        for r in res["rows"]:
            if r["M"] == M:
                sp = r["cublas"]["do_bench_us"] / r["aq"]["do_bench_us"]
                lines.append(f"- M={M} {r['K']}x{r['N']}: {sp:.2f}x (target {tgt}x) {'met' if sp >= tgt else 'MISSED'}")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["K"], r["N"]) for r in res["rows"]}, key=lambda s: SHAPES.index(s) if s in SHAPES else 99)
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.8), sharey=True)
    axes = axes if len(shapes) > 1 else [axes]
    for ax, (K, N) in zip(axes, shapes):
        rows = [r for r in res["rows"] if (r["K"], r["N"]) == (K, N)]
        ms = [r["M"] for r in rows]
        for name, style in (("aq", "o-"), ("torch_int4", "s--")):
            if all(name in r for r in rows):
                ax.plot(ms, [r["cublas"]["do_bench_us"] / r[name]["do_bench_us"] for r in rows], style,
                        label=f"{name} (do_bench)")
                ax.plot(ms, [r["cublas"]["graph_us"] / r[name]["graph_us"] for r in rows], style, alpha=0.4,
                        label=f"{name} (graph)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"K x N = {K} x {N}")
        ax.set_xlabel("M (tokens)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("speed-up over cuBLAS bf16")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"W4A16 g128 bf16 on {res['gpu']} ({res['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def overhead(shapes, ms) -> None:
    """Host time per call (no synchronization inside the loop) and a profile of the aq call: what do_bench sees when
    a call's CPU time exceeds its L2 flush."""
    import cProfile
    import pstats

    from aq.kernels import common
    from aq.kernels import w4a16 as W

    for K, N in shapes:
        p = W.pack_weight(torch.randn(N, K, device="cuda") * 0.02, 4, 128, torch.bfloat16)
        w = W.dequantize_weight(p)
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            res = {}
            for name, fn in (("cublas", lambda: torch.nn.functional.linear(x, w)),
                             ("aq", lambda: W.w4a16_linear(x, p))):
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(500):
                    fn()
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                res[name] = (t1 - t0) / 500 * 1e6
            print(f"host us/call {K}x{N} M={M}: cublas {res['cublas']:.1f} aq {res['aq']:.1f} "
                  f"(cached launches: {len(common.COMPILED)}) cfg {W.select_config(M, p, x)}", flush=True)
        if (K, N) == shapes[0]:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(300):
                W.w4a16_linear(x, p)
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(12)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--plot", default="")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--shapes", default="", help="e.g. 4096x14336,14336x4096 (K x N)")
    ap.add_argument("--ms", default="")
    ap.add_argument("--reps", type=int, default=50, help="do_bench rep (ms)")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1))
    args = ap.parse_args()
    ok = True
    if args.check:
        ok = check(args.jobs)
    if args.overhead:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
        overhead(shapes, [int(m) for m in args.ms.split(",")] if args.ms else [1, 16])
    if args.bench:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
        ms = [int(m) for m in args.ms.split(",")] if args.ms else MS
        bench(Path(args.out), shapes, ms, args.reps)
    if args.plot:
        res = json.loads(Path(args.plot).read_text())
        Path(args.plot).with_suffix(".md").write_text(markdown(res))
        plot(res, Path(args.plot).with_suffix(".png"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
