"""One correctness check of every aq kernel family on the GPU in hand, against plain-torch references computed on
the CPU, on random ragged shapes.

    python bench/check_gpu.py --out /tmp/check            # several hundred cases, < 3 min on an H100/H200
    TRITON_INTERPRET=1 python bench/check_gpu.py --quick  # a handful of small cases on the CPU (interpreter)

Families: fake_quant (forward, STE backward, LWC clipping gradients), affine (masked weight / inverse activation /
fused transform + fake quant, forward and backward), norm (rms / layer norm with diagonal and block-diagonal
transforms), w4a16 (every kernel path - gemv, mma swapped / plain / folded, split-K, dequant + cuBLAS - over the M
buckets, and the dispatcher's own pick), w4a4 (activation quantization with fused norm, the int GEMM per M bucket),
w8a8 (signed activation codes of 4..8 bits, the int8-container GEMM per channel and per group, with fused norms),
patch (W4A16Linear / W4A4Linear / W8A8Linear modules and patched tiny LLaMAs against their CPU twins).

The kernel runs on the device (cuda, or cpu under TRITON_INTERPRET=1); the reference is the same public function on
CPU copies of the inputs with AQ_BACKEND=torch (aq.backend then runs the plain-torch reference). Each case compares
a relative error (Frobenius norm of the difference over the reference's) with a tolerance chosen per dtype and op:
quantizers may flip a rare rounding tie by one step, which moves that error by ~1e-3, while a wrong kernel moves it
by ~1. Exit code 1 on any mismatch or crash; a JSON summary (every case, its error and time) goes to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import traceback
from pathlib import Path

import torch

HALF = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def torch_backend():
    """aq's dispatch reads AQ_BACKEND at every call: force the plain-torch reference inside."""
    old = os.environ.get("AQ_BACKEND")
    os.environ["AQ_BACKEND"] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("AQ_BACKEND")
        else:
            os.environ["AQ_BACKEND"] = old


def cpu(t):
    if isinstance(t, torch.Tensor):
        return t.detach().cpu()
    if isinstance(t, tuple) and hasattr(t, "_fields"):  # NamedTuple
        return type(t)(*(cpu(v) for v in t))
    if isinstance(t, (list, tuple)):
        return type(t)(cpu(v) for v in t)
    return t


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.shape != ref.shape:
        return math.inf
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def off_frac(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of elements of a quantizer's output that differ beyond float noise (rounding-tie flips: one step)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.shape != ref.shape or not torch.isfinite(got).all():
        return math.inf
    return float(((got - ref).abs() > 1e-2 * ref.abs() + 1e-6 * ref.abs().max()).double().mean())


def flip_tol(t: torch.Tensor, frac: float = 2e-3) -> float:
    """A few flipped ties allowed: frac of the elements, at least 2 of them."""
    return max(frac, 2.0 / t.numel())


def grads(fn, leaves: list, gy: torch.Tensor | None = None) -> list:
    """Output and the gradients of the leaves (None-safe) for a random upstream gradient."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in leaves]
    y = fn(*leaves)
    if gy is None:
        gy = torch.ones_like(y)
    y.backward(gy.to(y.device, y.dtype))
    return [y] + [None if t is None else t.grad for t in leaves]


class Checker:
    def __init__(self, device: str, quick: bool, seed: int):
        self.device, self.quick = device, quick
        self.rng = random.Random(seed)
        self.cases: list[dict] = []
        self.deadline = math.inf  # per family, set by main from --budget-s

    def out_of_time(self) -> bool:
        return time.time() > self.deadline

    def gen(self):
        return torch.Generator().manual_seed(self.rng.randrange(1 << 30))

    def dev(self, t):
        return t.to(self.device) if isinstance(t, torch.Tensor) else t

    def record(self, family: str, name: str, errs: dict, tol: float | dict, t0: float, **info):
        tols = tol if isinstance(tol, dict) else {k: tol for k in errs}
        bad = {k: e for k, e in errs.items() if not e <= tols[k]}
        case = dict(family=family, name=name, ok=not bad, errs={k: (None if math.isinf(e) or math.isnan(e) else
                                                                    float(f"{e:.3g}")) for k, e in errs.items()},
                    tol=tols, s=round(time.time() - t0, 3), **info)
        self.cases.append(case)
        if bad:
            print(f"  MISMATCH {family}/{name} {info} errs={case['errs']} tol={tols}", flush=True)

    def run(self, family: str, name: str, fn, **info):
        t0 = time.time()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a crash is a failed case, reported with its trace
            self.cases.append(dict(family=family, name=name, ok=False, error=f"{type(e).__name__}: {e}"[:500],
                                   trace=traceback.format_exc()[-2000:], s=round(time.time() - t0, 3), **info))
            print(f"  ERROR {family}/{name} {info}: {type(e).__name__}: {str(e)[:300]}", flush=True)


def _ragged(rng, lo, hi, mult=1):
    """A random size in [lo, hi], a multiple of mult, biased to odd-looking values."""
    return max(mult, rng.randrange(lo, hi + 1) // mult * mult)


def _dtype(rng, choices=(torch.float32, torch.float16, torch.bfloat16)):
    return rng.choice(choices)


def _tol(dtype, fp32=2e-3, half=3e-2):
    return fp32 if dtype == torch.float32 else half


# ------------------------------------------------------------------------------------------------------------ families
def check_fake_quant(c: Checker, n: int):
    from aq.kernels import fake_quant as FQ

    for i in range(n):
        if i and c.out_of_time():
            break
        rng = c.rng
        g = c.gen()
        group = rng.choice([None, 16, 32, 64, 128])
        K = _ragged(rng, 16, 160 if c.quick else 1100, group or 1)
        R = _ragged(rng, 1, 9 if c.quick else 300)
        lead = (R,) if rng.random() < 0.7 else (2, R)
        bits, sym, dtype = rng.choice([2, 3, 4, 8]), rng.random() < 0.4, _dtype(rng)
        lwc = rng.choice(["", "u", "ul"])
        x = (torch.randn(*lead, K, generator=g) * rng.choice([0.02, 1.0, 30.0])).to(dtype)
        ng = K // (group or K)
        u = torch.randn(*lead, ng, generator=g) * 2 + 2 if "u" in lwc else None
        l_ = torch.randn(*lead, ng, generator=g) * 2 + 2 if "l" in lwc else None
        gy = torch.randn(*lead, K, generator=g)
        info = dict(shape=list(x.shape), group=group, bits=bits, sym=sym, dtype=str(dtype)[6:], lwc=lwc)

        def fwd():
            t0 = time.time()
            got = FQ.fake_quant(c.dev(x), bits, group, sym)
            with torch_backend():
                ref = FQ.fake_quant(x, bits, group, sym)
            c.record("fake_quant", "forward", dict(y_off=off_frac(got, ref)), flip_tol(ref), t0, **info)

        def ste():
            t0 = time.time()
            f = lambda x_, u_, l_: FQ.fake_quant_ste(x_, bits, group, sym, u_, l_)  # noqa: E731
            got = grads(f, [c.dev(x), c.dev(u), c.dev(l_)], c.dev(gy))
            with torch_backend():
                ref = grads(f, [x, u, l_], gy)
            errs = {k: rel(a, b) for k, a, b in zip(("y", "gx", "gu", "gl"), got, ref) if b is not None}
            errs["y"] = off_frac(got[0], ref[0])
            # LWC gradients sum over a group: a flipped tie moves them more than the values
            c.record("fake_quant", "ste_backward", errs, dict(y=flip_tol(ref[0]), gx=_tol(dtype, 1e-4, 2e-2),
                                                             gu=_tol(dtype, 2e-2, 5e-2), gl=_tol(dtype, 2e-2, 5e-2)),
                     t0, **info)

        c.run("fake_quant", "forward", fwd, **info)
        c.run("fake_quant", "ste_backward", ste, **info)


def _transform(d, band, g, rng):
    return torch.eye(d) * 1.5 + torch.randn(d, d, generator=g) / (2 * d)


def check_affine(c: Checker, n: int):
    from aq.kernels import affine as AF

    for i in range(n):
        if i and c.out_of_time():
            break
        rng, g = c.rng, c.gen()
        d = rng.choice([64, 96, 128] if c.quick else [64, 96, 128, 192, 256, 384])
        band = rng.choice([None, 1, 5, 17, d // 2])
        block = rng.choice([None, None, 32]) if d % 32 == 0 else None
        alpha = rng.choice([1.0, 0.5, 0.1])
        N = _ragged(rng, 3, 40 if c.quick else 400)
        dtype = _dtype(rng)
        w = torch.randn(N, d, generator=g).to(dtype)
        A = _transform(d, band, g, rng)
        info = dict(N=N, d=d, band=band, block=block, alpha=alpha, dtype=str(dtype)[6:])
        tol = dict(y=_tol(dtype, 1e-4), gw=_tol(dtype, 1e-4), gA=_tol(dtype, 1e-4, 3e-2))

        def mw():
            t0 = time.time()
            f = lambda w_, A_: AF.masked_weight(w_, A_, band, block, alpha)  # noqa: E731
            gy = torch.randn(N, d, generator=g)
            got = grads(f, [c.dev(w), c.dev(A)], c.dev(gy))
            with torch_backend():
                ref = grads(f, [w, A], gy)
            c.record("affine", "masked_weight", {k: rel(a, b) for k, a, b in zip(("y", "gw", "gA"), got, ref)},
                     tol, t0, **info)

        def mi():
            t0 = time.time()
            x = torch.randn(2, N, d, generator=g)
            f = lambda x_, A_: AF.masked_inverse_act(x_, A_, band, block, alpha, name="check")  # noqa: E731
            gy = torch.randn(2, N, d, generator=g)
            got = grads(f, [c.dev(x), c.dev(A)], c.dev(gy))
            with torch_backend():
                ref = grads(f, [x, A], gy)
            c.record("affine", "masked_inverse_act", {k: rel(a, b) for k, a, b in zip(("y", "gx", "gA"), got, ref)},
                     1e-4, t0, **info)

        def tfq():
            t0 = time.time()
            group = rng.choice([None] + [gs for gs in (16, 32, 48, 64) if d % gs == 0])
            bits, sym = rng.choice([2, 3, 4, 8]), rng.random() < 0.3
            ng = d // (group or d)
            u = torch.randn(N, ng, generator=g) + 3
            l_ = torch.randn(N, ng, generator=g) + 3 if rng.random() < 0.5 else None
            f = lambda w_, A_, u_, l2: AF.transform_fake_quant(w_, A_, bits, group, band, block, alpha,  # noqa: E731
                                                              u_, l2, sym)
            gy = torch.randn(N, d, generator=g)
            got = grads(f, [c.dev(w), c.dev(A), c.dev(u), c.dev(l_)], c.dev(gy))
            with torch_backend():
                ref = grads(f, [w, A, u, l_], gy)
            errs = {k: rel(a, b) for k, a, b in zip(("y", "gw", "gA", "gu", "gl"), got, ref) if b is not None}
            errs["y"] = off_frac(got[0], ref[0])
            # the transform's float rounding can move a code by one step: looser than the plain products
            c.record("affine", "transform_fake_quant", errs, dict(y=flip_tol(ref[0], 1e-2), gw=_tol(dtype, 1e-2, 5e-2),
                                                                 gA=_tol(dtype, 2e-2, 6e-2), gu=6e-2, gl=6e-2),
                     t0, group=group, bits=bits, sym=sym, **info)

        c.run("affine", "masked_weight", mw, **info)
        c.run("affine", "masked_inverse_act", mi, **info)
        c.run("affine", "transform_fake_quant", tfq, **info)


def check_norm(c: Checker, n: int):
    from aq.kernels.norm import norm_transform

    for i in range(n):
        if i and c.out_of_time():
            break
        rng, g = c.rng, c.gen()
        norm, form = rng.choice(["rms", "layer"]), rng.choice([None, "diagonal", "blockdiag"])
        h = rng.choice([16, 32, 64])
        K = _ragged(rng, 16, 200 if c.quick else 5000, h if form == "blockdiag" else 1)
        M = _ragged(rng, 1, 9 if c.quick else 600)
        dtype = _dtype(rng)
        x = (torch.randn(M, K, generator=g) * 3 + 1).to(dtype)
        w = torch.randn(K, generator=g).to(dtype)
        b = torch.randn(K, generator=g).to(dtype) if norm == "layer" else None
        t = None if form is None else (torch.rand(K, generator=g) + 0.5 if form == "diagonal"
                                       else torch.randn(K // h, h, h, generator=g) / math.sqrt(h))
        info = dict(M=M, K=K, norm=norm, form=form, dtype=str(dtype)[6:])

        def one():
            t0 = time.time()
            got = norm_transform(c.dev(x), norm, c.dev(w), c.dev(b), 1e-5, c.dev(t))
            with torch_backend():
                ref = norm_transform(x, norm, w, b, 1e-5, t)
            c.record("norm", "norm_transform", dict(y=rel(got, ref)), _tol(dtype, 1e-4, 2e-2), t0, **info)

        c.run("norm", "norm_transform", one, **info)


W4A16_BUCKETS = [1, 2, 3, 4, 7, 16, 33, 64, 100, 128, 200, 256, 512, 1000, 2048, 4096]


def _w4a16_configs(W, M, K, N, bits, group, quick):
    """Every kernel path this problem admits: None (the dispatcher's pick) and explicit configs of each kind."""
    e = 32 // W.container_bits(bits)
    kw = K // e
    out = [None]
    if quick:  # the interpreter: few, big programs
        out.append(dict(kernel="gemv", block_n=64, block_kw=min(16, kw), split_k=2, prefetch=True))
        out.append(dict(kernel="mma", block_m=16, block_n=64, block_kw=max(2, min(16, kw)), split_k=2, swap=True,
                        join=True, half_dq=True))
        out.append(dict(kernel="mma", block_m=32, block_n=32, block_kw=max(16, min(16, kw)), split_k=1, swap=False,
                        join=False))
        out.append(dict(kernel="dequant", block_n=16, block_kw=min(64, 1 << (kw.bit_length() - 1)), half_dq=True))
        return out
    if M <= 8:
        out += [dict(kernel="gemv", block_n=64, block_kw=16, split_k=s, prefetch=pf, num_warps=4, num_stages=1)
                for s, pf in ((1, False), (4, True))]
        if kw >= 64:
            out.append(dict(kernel="gemv", block_n=128, block_kw=64, split_k=2, prefetch=True, num_warps=8,
                            num_stages=1))
    if M <= 256:
        bm = 16 if M <= 16 else 64 if M <= 64 else 128
        bkw = max(2, 128 // e)
        out += [dict(kernel="mma", block_m=bm, block_n=64, block_kw=bkw, split_k=s, swap=sw, join=True,
                     half_dq=True, fold=fold, num_warps=4, num_stages=3)
                for s, sw, fold in ((1, True, False), (3, True, True), (2, False, False))
                if not (fold and group % (bkw * e))]
        if kw >= 16:
            out.append(dict(kernel="mma", block_m=bm, block_n=64, block_kw=16, split_k=1, swap=False, join=False,
                            num_warps=4, num_stages=3))
    if M >= 64:
        out.append(dict(kernel="dequant", block_n=16, block_kw=max(2, 512 // e), half_dq=True, num_warps=4))
    return out


def check_w4a16(c: Checker, n: int):
    from aq.kernels import w4a16 as W

    for i in range(n):
        if i and c.out_of_time():
            break
        rng, g = c.rng, c.gen()
        bits = rng.choice([4, 4, 4, 2, 3, 8])
        group = rng.choice([32, 64, 128, 128, None])
        e = 32 // W.container_bits(bits)
        mult = max(group or 1, e)
        K = _ragged(rng, 64, 256 if c.quick else 3000, mult)
        N = _ragged(rng, 8, 100 if c.quick else 2100)
        M = rng.choice([1, 2, 5, 17, 40] if c.quick else W4A16_BUCKETS)
        dtype = rng.choice(HALF)
        w = torch.randn(N, K, generator=g) * 0.02
        p = W.pack_weight(w, bits, group, dtype)
        x = torch.randn(M, K, generator=g).to(dtype)
        bias = torch.randn(N, generator=g).to(dtype) if rng.random() < 0.4 else None
        with torch_backend():
            ref = W.w4a16_linear_reference(x, p, bias)
        pd = p.to(c.device)
        xd, bd = c.dev(x), c.dev(bias)
        for cfg in _w4a16_configs(W, M, K, N, bits, group or K, c.quick):
            info = dict(M=M, K=K, N=N, bits=bits, group=group, bias=bias is not None, dtype=str(dtype)[6:],
                        cfg=cfg or "dispatch")

            def one(cfg=cfg, info=info):
                t0 = time.time()
                got = W.w4a16_linear(xd, pd, bd, cfg)
                c.record("w4a16", cfg["kernel"] if cfg else "dispatch", dict(y=rel(got, ref)), 1.5e-2, t0, **info)

            c.run("w4a16", cfg["kernel"] if cfg else "dispatch", one, **info)


# the integer-GEMM families: weight / activation bits drawn, weight groups, signed (int8-container) activation codes
_INT_GEMMS = dict(w4a4=dict(wbits=[4, 4, 3, 2], abits=[4, 4, 3, 7], groups=[None], signed=False),
                  w8a8=dict(wbits=[8, 8, 6, 5, 4], abits=[8, 8, 6, 4], groups=[None, None, 32, 64, 128, 256, 48],
                            signed=True))


def check_w4a4(c: Checker, n: int):
    _check_int_gemm(c, n, "w4a4")


def check_w8a8(c: Checker, n: int):
    _check_int_gemm(c, n, "w8a8")


def _check_int_gemm(c: Checker, n: int, family: str):
    from aq.kernels import w4a4 as Q
    from aq.kernels import w8a8 as W

    spec = _INT_GEMMS[family]
    signed = spec["signed"]
    if family == "w4a4":
        pack, matmul, linear = (lambda w, b, group, sym: Q.pack_w4a4_weight(w, b, sym)), Q.w4a4_matmul, Q.w4a4_linear
    else:
        pack, matmul, linear = W.pack_w8a8_weight, W.w8a8_matmul, W.w8a8_linear
    for i in range(n):
        if i and c.out_of_time():
            break
        rng, g = c.rng, c.gen()
        group = rng.choice(spec["groups"])
        K = _ragged(rng, 32, 256 if c.quick else 4200, group or (2 if rng.random() < 0.8 else 1))
        N = _ragged(rng, 8, 100 if c.quick else 2100)
        M = rng.choice([1, 3, 17, 40] if c.quick else [1, 2, 5, 16, 31, 64, 100, 128, 300, 512, 1024, 2048])
        wbits, abits = rng.choice(spec["wbits"]), rng.choice(spec["abits"])
        wsym, asym = rng.random() < 0.3, rng.random() < 0.3
        dtype = rng.choice(HALF + (torch.float32,))
        fuse = rng.choice([None, "rms", "layer"])
        h = 16
        form = rng.choice([None, "diagonal", "blockdiag"]) if fuse else None
        if form == "blockdiag":
            step = math.lcm(h, group or 1)
            K = max(step, K // step * step)
        N = max(8, min(N, int(1.5e9 // (M * K))))  # the float64 CPU reference: at most ~1.5 GFLOP a product
        x = (torch.randn(M, K, generator=g) * 2 + 0.3).to(dtype)  # off-centre: the zero points matter
        wt = pack(torch.randn(N, K, generator=g) * 0.05, wbits, group, wsym)
        bias = torch.randn(N, generator=g).to(dtype) if rng.random() < 0.4 else None
        nkw = {}
        if fuse:
            nkw = dict(norm=fuse, norm_weight=torch.randn(K, generator=g).to(dtype),
                       norm_bias=torch.randn(K, generator=g).to(dtype) if fuse == "layer" else None, norm_eps=1e-5,
                       transform=None if form is None else (torch.rand(K, generator=g) + 0.5 if form == "diagonal"
                                                            else torch.randn(K // h, h, h, generator=g) / 4))
        info = dict(M=M, K=K, N=N, wbits=wbits, abits=abits, group=group, wsym=wsym, asym=asym, norm=fuse, form=form,
                    dtype=str(dtype)[6:], bias=bias is not None)
        dkw = {k: c.dev(v) for k, v in nkw.items()}
        wd = wt.to(c.device)

        def act():
            t0 = time.time()
            got = Q.quantize_activation(c.dev(x), abits, asym, signed=signed, **dkw)
            with torch_backend():
                ref = Q.quantize_activation(x, abits, asym, signed=signed, **nkw)
            dq = lambda a: ((a.q.double() - a.zero.double().unsqueeze(-1)) * a.scale.double().unsqueeze(-1))  # noqa
            codes = (got.q.cpu().int() - ref.q.int()).abs()
            errs = dict(codes_off=float((codes > 0).float().mean()), codes_max=float(codes.max()),
                        scale=rel(got.scale, ref.scale), values=rel(dq(cpu(got)), dq(ref)),
                        code_sum=float((got.code_sum.cpu() != got.q.cpu().int().sum(-1)).any()))
            # fused norm/transform in fp32 on either side: a rare tie may flip one code by one step
            tol = dict(codes_off=flip_tol(ref.q, 5e-3 if fuse else 1e-3), codes_max=1.0,
                       scale=1e-5 if not fuse else 1e-4, values=5e-2, code_sum=0.0)
            c.record(family, "quantize_activation", errs, tol, t0, **info)

        def mm():
            t0 = time.time()
            a = Q.quantize_activation_reference(x.float(), abits, asym, signed=signed)
            ad = Q.QuantizedActivation(*(c.dev(v) for v in a))  # a NamedTuple
            errs, tol = {}, {}
            if group is None:  # the exact integer sum
                got = matmul(ad, wd, None, torch.int32)
                with torch_backend():
                    ref = matmul(a, wt, None, torch.int32)
                errs["int_mismatch"], tol["int_mismatch"] = float((got.cpu() != ref).float().mean()), 0.0
            gy = matmul(ad, wd, c.dev(bias), dtype)
            with torch_backend():
                ry = matmul(a, wt, bias, dtype)
            errs["y"], tol["y"] = rel(gy, ry), _tol(dtype, 1e-5, 1.6e-2)
            c.record(family, "matmul", errs, tol, t0, **info)

        def lin():
            t0 = time.time()
            got = linear(c.dev(x), wd, c.dev(bias), abits=abits, a_symmetric=asym, **dkw)
            with torch_backend():
                ref = linear(x, wt, bias, abits=abits, a_symmetric=asym, **nkw)
            # a flipped activation code (fused norm in fp32 on either side) moves whole output rows by one step
            c.record(family, "linear", dict(y=rel(got, ref)), 5e-2 if fuse else _tol(dtype, 1e-5, 1.6e-2), t0, **info)

        c.run(family, "quantize_activation", act, **info)
        c.run(family, "matmul", mm, **info)
        c.run(family, "linear", lin, **info)


def _tiny_llama(hidden, inter, layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=inter,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256, tie_word_embeddings=False)).eval()


def check_patch(c: Checker, n: int):
    import copy

    from aq.calib.rtn import quantize_rtn
    from aq.config import QuantConfig
    from aq.kernels import w4a4 as Q
    from aq.kernels import w4a16 as W
    from aq.deploy import W4A4Linear, W4A16Linear, W8A8Linear
    from aq.kernels import w8a8 as W8
    from aq.patch import patch_model

    for i in range(n):
        if i and c.out_of_time():
            break
        rng, g = c.rng, c.gen()
        K = _ragged(rng, 64, 192 if c.quick else 2048, 64)
        N = _ragged(rng, 8, 96 if c.quick else 1500)
        M = rng.choice([1, 7, 33] if c.quick else [1, 7, 64, 300])
        x = torch.randn(2, M, K, generator=g).to(torch.bfloat16)
        w = torch.randn(N, K, generator=g) * 0.05
        bias = torch.randn(N, generator=g) if rng.random() < 0.5 else None
        info = dict(M=M, K=K, N=N, bias=bias is not None)

        def lin16():
            t0 = time.time()
            m = W4A16Linear(W.pack_weight(w, 4, 64, torch.bfloat16), bias)
            with torch.no_grad():
                got = copy.deepcopy(m).to(c.device)(c.dev(x))
                with torch_backend():
                    ref = m(x)
            c.record("patch", "W4A16Linear", dict(y=rel(got, ref)), 1.5e-2, t0, **info)

        def lin4():
            t0 = time.time()
            m = W4A4Linear(Q.pack_w4a4_weight(w, 4), bias, 4)
            with torch.no_grad():
                got = copy.deepcopy(m).to(c.device)(c.dev(x))
                with torch_backend():
                    ref = m(x)
            c.record("patch", "W4A4Linear", dict(y=rel(got, ref)), 2e-2, t0, **info)

        def lin8():
            t0 = time.time()
            m = W8A8Linear(W8.pack_w8a8_weight(w, 8, 64), bias, 8)
            with torch.no_grad():
                got = copy.deepcopy(m).to(c.device)(c.dev(x))
                with torch_backend():
                    ref = m(x)
            c.record("patch", "W8A8Linear", dict(y=rel(got, ref)), 2e-2, t0, **info)

        c.run("patch", "W4A16Linear", lin16, **info)
        c.run("patch", "W4A4Linear", lin4, **info)
        c.run("patch", "W8A8Linear", lin8, **info)

    # whole patched models (norm fusion, fused projections, deferred norms), each against its CPU twin in fp32
    for wbits, abits, group in ((4, 16, 32), (4, 4, None), (8, 8, None), (3, 6, None), (6, 6, 64), (2, 16, 64),
                                (3, 16, 64))[: 3 if c.quick else 7]:
        info = dict(wbits=wbits, abits=abits, group=group)

        def model(wbits=wbits, abits=abits, group=group, info=info):
            t0 = time.time()
            fq = quantize_rtn(_tiny_llama(64, 128, 2), QuantConfig(wbits=wbits, abits=abits, group_size=group))
            pm = patch_model(fq)
            ids = torch.randint(0, 300, (2, 9 if c.quick else 40), generator=c.gen())
            with torch.no_grad():
                got = copy.deepcopy(pm).to(c.device)(c.dev(ids)).logits
                with torch_backend():
                    ref = pm(ids).logits
            c.record("patch", "patched_llama", dict(logits=rel(got, ref)), 2e-2 if abits == 16 else 1e-2, t0,
                     **info)

        c.run("patch", "patched_llama", model, **info)


FAMILIES = dict(fake_quant=check_fake_quant, affine=check_affine, norm=check_norm, w4a16=check_w4a16,
                w4a4=check_w4a4, w8a8=check_w8a8, patch=check_patch)
# cases per family (each w4a16 problem runs every admitted kernel path: ~4-6 cases)
FULL = dict(fake_quant=60, affine=30, norm=60, w4a16=60, w4a4=40, w8a8=40, patch=10)
# shares of --budget-s (compile time dominates a cold run: the matmul families have the most variants)
SHARE = dict(fake_quant=1.0, affine=1.0, norm=0.5, w4a16=2.0, w4a4=1.5, w8a8=1.0, patch=1.0)
QUICK = dict(fake_quant=2, affine=1, norm=2, w4a16=1, w4a4=1, w8a8=2, patch=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="folder (or .json file) for the summary")
    ap.add_argument("--quick", action="store_true", help="a few small cases (CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the number of cases per family")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="bound on wall time: each family gets its SHARE and stops drawing new cases after it "
                         "(at least one case each; compile time dominates on a cold cache). 0: no bound")
    ap.add_argument("--device", default="", help="cuda (default when present) or cpu (needs TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("on the CPU the kernels only run under TRITON_INTERPRET=1 (set it, and use --quick)")
    from aq import backend

    if device == "cpu" and not backend.interpreting():
        ap.error("TRITON_INTERPRET=1 is not seen by aq.backend")
    counts = QUICK if args.quick else FULL
    c = Checker(device, args.quick, args.seed)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    print(f"check_gpu on {gpu}", flush=True)
    t_all = time.time()
    per_family = {}
    names = args.families.split(",")
    for i, name in enumerate(names):
        if name not in FAMILIES:
            ap.error(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
        if args.budget_s:
            c.deadline = t_all + args.budget_s * sum(SHARE[n] for n in names[: i + 1]) / sum(SHARE[n] for n in names)
        t0, n0 = time.time(), len(c.cases)
        FAMILIES[name](c, max(1, round(counts[name] * args.scale)))
        mine = c.cases[n0:]
        per_family[name] = dict(cases=len(mine), failed=sum(not k["ok"] for k in mine), s=round(time.time() - t0, 1),
                                cut_by_budget=c.out_of_time())
        print(f"[{name}] {len(mine)} cases, {per_family[name]['failed']} failed, {per_family[name]['s']}s",
              flush=True)
    failed = [k for k in c.cases if not k["ok"]]
    summary = dict(gpu=gpu, torch=torch.__version__, triton=__import__("triton").__version__,
                   config_file=_config_file(device), quick=args.quick, seed=args.seed, cases=len(c.cases),
                   failed=len(failed), seconds=round(time.time() - t_all, 1), families=per_family,
                   failures=failed, all=c.cases)
    if args.out:
        out = Path(args.out)
        path = out if out.suffix == ".json" else out / "check_gpu.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
        print(f"wrote {path}")
    print(f"{len(c.cases)} cases, {len(failed)} failed, {summary['seconds']}s: {'FAIL' if failed else 'OK'}")
    return 1 if failed else 0


def _config_file(device: str) -> str | None:
    if device != "cuda":
        return None
    from aq.kernels import tuned

    f = tuned.config_file(torch.cuda.get_device_name())
    return str(f) if f.exists() else None


if __name__ == "__main__":
    sys.exit(main())
