"""Calibration kernels on the GPU: check compiled Triton against the torch reference, then time forward + backward of
the fused transform + fake-quant (the per-step hot path) against the same computation in eager torch and under
torch.compile, across mask band widths.

    python3 bench/calib_kernels.py [--out DIR] [--budget SECONDS] [--cases a,b,...] [--no-compile]

All matrix products run in the same precision on every side: fp32 inputs in tf32 (torch.set_float32_matmul_precision
("high"), which cuBLAS, inductor and aq's Triton kernels all follow), bf16 inputs in bf16 with fp32 accumulation.
The baselines take the mask as a precomputed tensor (as a calibration loop would cache it), so they do a dense product
at every band width; aq skips the zero part of A*M (band path) or calls cuBLAS (dense path) depending on the band.
Writes calib_kernels.json (every number) and calib_kernels.md (the table) under --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
import traceback

import torch
import triton
from triton.testing import do_bench


from aq.kernels import affine as AF
from aq.kernels import common
from aq.kernels import fake_quant as FQ

T0 = time.time()
DEV = "cuda"

# name: (N, d, group, dtype, block, bands, compile?)
CASES = {
    "llama_up_g128": (11008, 4096, 128, torch.float32, None, [1, 16, 128, 512, 1024, 2048, 4096], True),
    "llama_up_chan": (11008, 4096, None, torch.float32, None, [1, 128, 1024, 4096], True),
    "llama_up_g128_bf16": (11008, 4096, 128, torch.bfloat16, None, [1, 128, 1024, 4096], True),
    "smol_up_g64": (1536, 576, 64, torch.float32, None, [1, 8, 32, 128, 288, 576], True),
    "smol_k_g64": (192, 576, 64, torch.float32, None, [1, 32, 576], True),
    "smol_o_heads64": (576, 576, 64, torch.float32, 64, [1, 8, 32, 64], True),
}
BITS, ALPHA = 4, 0.1
ALPHA_EXACT = 0.125  # checks on grid inputs need a dyadic alpha for exact products


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def maxrel(a, b):
    """Largest error relative to the reference's largest entry (gradient sums with cancellation)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def grid_weight(N, d, dtype, gen):
    return (torch.randint(-8, 9, (N, d), generator=gen, device=DEV).float() / 8).to(dtype)


def grid_transform(d, gen):
    """Values on a coarse dyadic grid: every product and partial sum is exact in fp32/tf32/bf16, so the transformed
    weight is bit-identical on every path and rounding decisions cannot differ."""
    A = torch.randint(-4, 5, (d, d), generator=gen, device=DEV).float() / 64
    A.diagonal().copy_(1 + torch.randint(-8, 9, (d,), generator=gen, device=DEV).float() / 32)
    return A


# ---------------------------------------------------------------------------------------------------------------------
# correctness (compiled kernels vs reference)
# ---------------------------------------------------------------------------------------------------------------------

def check_all(results, small=False):
    gen = torch.Generator(device=DEV).manual_seed(int(time.time()))
    fails = []
    n = 0
    # fake_quant_ste: values exact, gradients vs autograd on the reference
    shapes = [(37, 192, 64), (5, 96, None), (19, 384, 32), (70, 40, 8)] + ([] if small else [(2048, 4096, None)])
    for R, K, g in shapes:
        for bits in (2, 4, 8):
            for sym in (False, True):
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    lwc = (bits + sym) % 2 == 0 or R == 2048
                    x = (torch.randn(R, K, generator=gen, device=DEV) * 3
                         + torch.randn(R, 1, generator=gen, device=DEV)).to(dtype)
                    NG = K // (g or K)
                    u = torch.randn(R, NG, generator=gen, device=DEV) + 2 if lwc else None
                    l = torch.randn(R, NG, generator=gen, device=DEV) + 2 if lwc else None
                    gy = torch.randn(R, K, generator=gen, device=DEV).to(dtype)
                    outs = []
                    for fn in (FQ.fake_quant_ste, FQ.fake_quant_ste_reference):
                        xx = x.clone().requires_grad_()
                        uu = u.clone().requires_grad_() if lwc else None
                        ll = l.clone().requires_grad_() if lwc else None
                        y = fn(xx, bits, g, sym, uu, ll)
                        y.backward(gy)
                        outs.append((y, xx.grad, uu.grad if lwc else None, ll.grad if lwc else None))
                    (y, gx, gu, gl), (yr, gxr, gur, glr) = outs
                    errs = dict(y=float((y.float() != yr.float()).float().mean()), gx=maxrel(gx, gxr))
                    if lwc:
                        errs.update(gu=maxrel(gu, gur), gl=maxrel(gl, glr))
                    tol_g = 1e-4 if dtype == torch.float32 else 1e-2
                    ok = errs["y"] == 0 and all(v <= tol_g for k, v in errs.items() if k != "y")
                    n += 1
                    if not ok:
                        fails.append(("fake_quant_ste", R, K, g, bits, sym, str(dtype), errs))
    log(f"fake_quant_ste: {n} cases, {len(fails)} failures")
    # transform_fake_quant: exact-grid inputs (bit-identical transformed weights), both GEMM paths
    m = 0
    tcases = [(300, 384, 128, 1, None, torch.float32, False),
              (300, 384, 64, 17, None, torch.float32, True),
              (300, 384, None, None, None, torch.float32, False),
              (77, 384, 32, 40, 64, torch.float32, False),
              (300, 384, 128, 17, None, torch.bfloat16, False),
              (130, 576, 64, 9, 64, torch.bfloat16, True),
              (130, 576, 96, 200, None, torch.float16, False)]
    AF.CHUNK, chunk = 128, AF.CHUNK  # several chunks (windows clipped and interior) at these sizes
    for N, d, g, band, block, dtype, sym in (tcases[:1] + tcases[3:4] if small else tcases):
        w = grid_weight(N, d, dtype, gen)
        A = grid_transform(d, gen)
        NG = d // (g or d)
        u = torch.randn(N, NG, generator=gen, device=DEV) + 2
        l = torch.randn(N, NG, generator=gen, device=DEV) + 2
        gy = torch.randn(N, d, generator=gen, device=DEV).to(dtype)
        for path in ("band", "blocked", "dense"):
            outs = []
            for fn in ("kernel", "ref"):
                ww, AA, uu, ll = (t.clone().requires_grad_() for t in (w, A, u, l))
                if fn == "kernel":
                    y = AF.transform_fake_quant(ww, AA, BITS, g, band, block, ALPHA_EXACT, uu, ll, sym, gemm=path)
                else:
                    y = AF.transform_fake_quant_reference(ww, AA, BITS, g, band, block, ALPHA_EXACT, uu, ll, sym)
                y.backward(gy)
                outs.append((y, ww.grad, AA.grad, uu.grad, ll.grad))
            (y, gw, gA, gu, gl), (yr, gwr, gAr, gur, glr) = outs
            errs = dict(y=float((y.float() != yr.float()).float().mean()), gw=rel(gw, gwr), gA=rel(gA, gAr),
                        gu=maxrel(gu, gur), gl=maxrel(gl, glr))
            tol = 1e-4 if dtype == torch.float32 else 1e-2  # grid inputs: tf32 products are exact; 16-bit gy/gw round
            tol_A = 5e-3 if dtype == torch.float32 else 2e-2  # gA = (gW'^T W) * M: tf32 / bf16 rounding of gW'
            ok = errs["y"] == 0 and errs["gw"] <= tol_A and errs["gA"] <= tol_A and errs["gu"] <= tol \
                and errs["gl"] <= tol
            m += 1
            if not ok:
                fails.append(("transform_fake_quant", N, d, g, band, block, str(dtype), path, errs))
    AF.CHUNK = chunk
    log(f"transform_fake_quant: {m} cases, {len(fails)} failures so far")
    # masked_weight / masked_inverse_act on random inputs: relative error (tf32)
    k = 0
    for N, d, band, block in [(300, 384, 1, None), (300, 384, 33, None), (300, 384, None, None), (130, 576, 20, 64)]:
        w = torch.randn(N, d, generator=gen, device=DEV)
        A = torch.eye(d, device=DEV) + 0.3 * torch.randn(d, d, generator=gen, device=DEV) / d
        gy = torch.randn(N, d, generator=gen, device=DEV)
        for path in ("band", "dense"):
            for op in ("weight", "inverse"):
                outs = []
                for fn in ("kernel", "ref"):
                    ww, AA = w.clone().requires_grad_(), A.clone().requires_grad_()
                    if op == "weight":
                        f = AF.masked_weight if fn == "kernel" else AF.masked_weight_reference
                        y = f(ww, AA, band, block, ALPHA, **({"gemm": path} if fn == "kernel" else {}))
                    else:
                        f = AF.masked_inverse_act if fn == "kernel" else AF.masked_inverse_act_reference
                        y = f(ww, AA, band, block, ALPHA, **({"gemm": path} if fn == "kernel" else {}))
                    y.backward(gy)
                    outs.append((y, ww.grad, AA.grad))
                errs = dict(y=rel(outs[0][0], outs[1][0]), gx=rel(outs[0][1], outs[1][1]),
                            gA=rel(outs[0][2], outs[1][2]))
                k += 1
                if not all(v <= 5e-3 for v in errs.values()):
                    fails.append((op, N, d, band, block, path, errs))
    log(f"masked_weight/inverse: {k} cases; total failures {len(fails)}")
    for f in fails[:30]:
        log("FAIL", f)
    results["checks"] = dict(cases=n + m + k, failures=[repr(f) for f in fails])
    return not fails


# ---------------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------------

def eager_tfq(w, A, M, u, l, bits, g, sym):
    """The same computation in plain torch: mask, product (in w's dtype, fp32 -> tf32), STE/LWC fake quant."""
    Am = A * M
    wt = torch.matmul(w, Am.to(w.dtype).T).float()
    return FQ.fake_quant_ste_reference(wt, bits, g, sym, u, l).to(w.dtype)


def bench(fn, args):
    def step():
        y = fn()
        y.backward(args["gy"])
    step()
    torch.cuda.synchronize()
    return do_bench(step, warmup=10, rep=60, grad_to_none=args["leaves"], return_mode="median")


def time_case(name, spec, results, use_compile, budget):
    N, d, g, dtype, block, bands, want_compile = spec
    gen = torch.Generator(device=DEV).manual_seed(1234)
    w = (torch.randn(N, d, generator=gen, device=DEV) * 0.02).to(dtype).requires_grad_()
    NG = d // (g or d)
    u = torch.full((N, NG), 4.0, device=DEV).add_(0.1 * torch.randn(N, NG, generator=gen, device=DEV)).requires_grad_()
    l = torch.full((N, NG), 4.0, device=DEV).add_(0.1 * torch.randn(N, NG, generator=gen, device=DEV)).requires_grad_()
    gy = torch.randn(N, d, generator=gen, device=DEV).to(dtype) * 1e-3
    compiled = torch.compile(eager_tfq, dynamic=False) if (use_compile and want_compile) else None
    rows = []
    for band in bands:
        if time.time() - T0 > budget:
            log(f"budget reached: skipping {name} band {band}+")
            break
        A = (torch.eye(d, device=DEV) + 0.01 * torch.randn(d, d, generator=gen, device=DEV)).requires_grad_()
        M = AF.affine_mask(d, band, block, ALPHA, device=DEV)
        args = dict(gy=gy, leaves=[w, A, u, l])
        row = dict(case=name, N=N, d=d, group=g or d, dtype=str(dtype).replace("torch.", ""), block=block, band=band)
        t_auto = bench(lambda: AF.transform_fake_quant(w, A, BITS, g, band, block, ALPHA, u, l), args)
        row["aq_ms"] = t_auto
        row["aq_path"] = AF.gemm_path(N, d, *AF.norm_structure(d, band, block), w.device, None)
        for path in ("band", "blocked", "dense"):
            row[f"aq_{path}_ms"] = bench(
                lambda: AF.transform_fake_quant(w, A, BITS, g, band, block, ALPHA, u, l, gemm=path), args)
        row["eager_ms"] = bench(lambda: eager_tfq(w, A, M, u, l, BITS, g, False), args)
        if compiled is not None:
            t = time.time()
            compiled(w, A, M, u, l, BITS, g, False).backward(gy)  # compile fwd + bwd outside the timing
            row["compile_s"] = round(time.time() - t, 1)
            row["compile_ms"] = bench(lambda: compiled(w, A, M, u, l, BITS, g, False), args)
        # agreement with eager at this size (random data: rounding flips allowed, few)
        outs = []
        for f in (lambda: AF.transform_fake_quant(w, A, BITS, g, band, block, ALPHA, u, l),
                  lambda: eager_tfq(w, A, M, u, l, BITS, g, False)):
            for t in args["leaves"]:
                t.grad = None
            y = f()
            y.backward(gy)
            outs.append((y.detach().float(), w.grad.clone(), A.grad.clone(), u.grad.clone()))
        (y1, gw1, gA1, gu1), (y2, gw2, gA2, gu2) = outs
        row["rel_y"] = rel(y1, y2)
        row["rel_gw"], row["rel_gA"], row["rel_gu"] = rel(gw1, gw2), rel(gA1, gA2), rel(gu1, gu2)
        rows.append(row)
        log(json.dumps(row))
    results["timings"].extend(rows)


def time_act_quant(results):
    """Per-token activation fake quant (W4A4 setting), LLaMA-7B: 2048 tokens x 4096, fwd + bwd."""
    gen = torch.Generator(device=DEV).manual_seed(7)
    for dtype in (torch.bfloat16,):
        x = (torch.randn(2048, 4096, generator=gen, device=DEV)).to(dtype).requires_grad_()
        gy = torch.randn(2048, 4096, generator=gen, device=DEV).to(dtype)
        args = dict(gy=gy, leaves=[x])
        row = dict(case="act_pertoken_2048x4096", dtype=str(dtype).replace("torch.", ""))
        row["aq_ms"] = bench(lambda: FQ.fake_quant_ste(x, 4), args)
        row["eager_ms"] = bench(lambda: FQ.fake_quant_ste_reference(x, 4), args)
        results["timings_other"].append(row)
        log(json.dumps(row))
    # masked inverse on activations (inverse in float64 + dominance check every call), LLaMA sizes
    x = torch.randn(2048, 4096, generator=gen, device=DEV).requires_grad_()
    gy = torch.randn(2048, 4096, generator=gen, device=DEV)
    for band, block in [(1, None), (64, None), (4096, None), (64, 128)]:
        A = (torch.eye(4096, device=DEV) + 1e-5 * torch.randn(4096, 4096, generator=gen, device=DEV)).requires_grad_()
        args = dict(gy=gy, leaves=[x, A])
        row = dict(case="act_inverse_2048x4096", band=band, block=block)
        row["aq_ms"] = bench(lambda: AF.masked_inverse_act(x, A, band, block, ALPHA, name="bench"), args)
        Am = A.detach() * AF.affine_mask(4096, band, block, ALPHA, device=DEV)
        torch.cuda.synchronize()
        row["checked_inverse_ms"] = do_bench(lambda: AF.checked_inverse(Am, "bench", block), warmup=5, rep=30,
                                             return_mode="median")
        results["timings_other"].append(row)
        log(json.dumps(row))


def table(results) -> str:
    env = results["env"]
    lines = ["# Calibration kernels: fused transform + fake-quant, forward + backward", "",
             f"GPU: {env['gpu']}; torch {env['torch']}, triton {env['triton']}; {env['date']}. "
             f"W{BITS} asymmetric, LWC (u, l learned), alpha {ALPHA}; fp32 products in tf32 everywhere; "
             "do_bench median (ms), fwd + bwd (grads of W, A, u, l).", "",
             "| case | N x d | group | dtype | block | band | aq (path) | aq band | aq blocked | aq dense | eager | "
             "compile | vs eager | vs compile |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["timings"]:
        c = r.get("compile_ms")
        aq = r["aq_ms"]
        cs = "-" if c is None else "%.3f" % c
        cx = "-" if c is None else "%.2fx" % (c / aq)
        lines.append(
            f"| {r['case']} | {r['N']}x{r['d']} | {r['group']} | {r['dtype']} | {r['block'] or '-'} | {r['band']} | "
            f"{aq:.3f} ({r['aq_path']}) | {r['aq_band_ms']:.3f} | {r['aq_blocked_ms']:.3f} | {r['aq_dense_ms']:.3f} | "
            f"{r['eager_ms']:.3f} | {cs} | {r['eager_ms'] / aq:.2f}x | {cx} |")
    lines += ["", "| other | setting | aq ms | eager ms | checked_inverse ms |", "|---|---|---|---|---|"]
    for r in results["timings_other"]:
        lines.append(f"| {r['case']} | {r.get('dtype', '')} band={r.get('band', '-')} block={r.get('block', '-')} | "
                     f"{r['aq_ms']:.3f} | {r.get('eager_ms', float('nan')):.3f} | "
                     f"{r.get('checked_inverse_ms', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def diag():
    """Division and fake-quant forward variants, compiled, against torch (one small launch each)."""
    import triton.language as tl

    @triton.jit
    def divk(x_ptr, s_ptr, o_ptr, R: tl.constexpr, C: tl.constexpr):
        r = tl.arange(0, R)
        c = tl.arange(0, C)
        x = tl.load(x_ptr + r[:, None] * C + c[None, :])
        sv = tl.load(s_ptr + r)
        RC: tl.constexpr = R * C
        offs = r[:, None] * C + c[None, :]
        tl.store(o_ptr + offs, x / sv[:, None])
        tl.store(o_ptr + RC + offs, common.div_rn(x, sv[:, None]))
        tl.store(o_ptr + 2 * RC + offs, tl.math.div_rn(x, tl.broadcast_to(sv[:, None], (R, C))))
        tl.store(o_ptr + 3 * RC + offs, tl.fdiv(x, sv[:, None], ieee_rounding=True))
        tl.store(o_ptr + 4 * RC + offs, common.round_half_even(common.div_rn(x, sv[:, None])))

    R, C = 64, 128
    x = torch.randn(R, C, device=DEV) * 3
    sv = torch.rand(R, device=DEV) * 0.3 + 0.01
    o = torch.empty(5, R, C, device=DEV)
    divk[(1,)](x, sv, o, R, C)
    ref = x / sv[:, None]
    for i, name in enumerate(["slash", "_div", "div_rn(broadcast_to)", "fdiv(ieee)"]):
        log("diag", name, "mismatch", float((o[i] != ref).float().mean()), "maxdiff", float((o[i] - ref).abs().max()))
    log("diag round(_div) vs torch.round", float((o[4] != torch.round(ref)).float().mean()))
    from aq import primitives
    for g in (64, None):
        for sym in (False, True):
            xx = torch.randn(37, 192, device=DEV) * 3
            ref = primitives.fake_quant(xx, 4, g, sym)
            got = FQ.fake_quant_triton(xx, 4, g, sym)
            out = torch.empty_like(xx)
            FQ.fake_quant_fwd_kernel[(37 // 8 + 1, 192 // (g or 192))](
                xx, out, xx, xx, xx, 37, 192, g or 192, 192 // (g or 192), BITS=4, SYMMETRIC=sym,
                EPS=primitives.SCALE_EPS, HAS_CMAX=False, HAS_CMIN=False, SAVE_STATS=False, BLOCK_R=8, BLOCK_G=32,
                SINGLE=False)
            log("diag fq g", g, "sym", sym, "single-pass mismatch", float((got != ref).float().mean()),
                "two-pass mismatch", float((out != ref).float().mean()))
            ste_ref = FQ.fake_quant_ste_reference(xx, 4, g, sym)
            ste = FQ.fake_quant_ste(xx, 4, g, sym)
            y2, st = FQ.fake_quant_fwd(xx, 4, g or 192, sym, save_stats=True)
            log("diag   ste_ref vs prim", float((ste_ref != ref).float().mean()), "ste vs prim",
                float((ste != ref).float().mean()), "fwd(save_stats) vs prim", float((y2 != ref).float().mean()),
                "maxdiff ste_ref", float((ste_ref - ref).abs().max()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--budget", type=float, default=480.0, help="stop starting new measurements after this many s")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-other", action="store_true")
    ap.add_argument("--diag", action="store_true")
    a = ap.parse_args()
    if a.diag:
        diag()
        return
    torch.set_float32_matmul_precision("high")
    os.makedirs(a.out, exist_ok=True)
    results = dict(env=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
                   timings=[], timings_other=[])
    log(results["env"])

    def save():
        with open(os.path.join(a.out, "calib_kernels.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(a.out, "calib_kernels.md"), "w") as f:
            f.write(table(results))

    if not a.no_check:
        os.environ["AQ_FAST_TUNE"] = "1"  # checks: first fitting config, no autotuning (saves compile time)
        try:
            ok = check_all(results)
            log("checks", "PASS" if ok else "FAIL")
        except Exception:
            log("checks crashed:\n" + traceback.format_exc())
            results["checks"] = dict(crashed=traceback.format_exc())
        os.environ.pop("AQ_FAST_TUNE")
        save()
    for name in filter(None, a.cases.split(",")):
        try:
            time_case(name, CASES[name], results, not a.no_compile, a.budget)
        except Exception:
            log(f"case {name} crashed:\n" + traceback.format_exc())
        save()
    if not a.no_other and time.time() - T0 < a.budget:
        try:
            time_act_quant(results)
        except Exception:
            log("other timings crashed:\n" + traceback.format_exc())
    save()
    print(table(results))


if __name__ == "__main__":
    main()
