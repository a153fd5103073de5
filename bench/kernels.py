"""Side-by-side linear-layer kernels on the GPU in hand, in one run (issue 12's table):

    python bench/kernels.py --out bench/results/kernels_h200          # the issue's K x N and M lists
    python bench/kernels.py --out /tmp/k --quick                       # 2 shapes x 4 M, < 2 min

Methods: cuBLAS bf16 (F.linear), torch int4 tinygemm (torch._weight_int4pack_mm, g128), cuBLAS int8 (torch._int_mm,
GEMM only, M > 16), FP8 row-wise (torch._scaled_mm e4m3 with per-row / per-column scales, GEMM only), aq W4A16 g128
and g64 (aq.kernels.w4a16.w4a16_linear, this GPU's tuned table or its fallback), aq W4A4 including the per-token
activation quantization (aq.kernels.w4a4.w4a4_linear). Every time is a CUDA graph of one call per weight copy, the
copies together 3x the L2 size, so weights come from DRAM as in a real model's forward pass. The copy bandwidth
(device-to-device, read + write) is measured in the same run; the roofline of each method is its bytes (weights +
activations + output) over that bandwidth. Writes kernels.json (schema of the issue, plus extras), kernels.md and,
when matplotlib imports, kernels.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.timing import copy_bandwidth, graph_time

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (576, 1536), (1536, 576)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048, 4096]
QUICK_SHAPES = [(4096, 4096), (4096, 14336)]
QUICK_MS = [1, 16, 128, 4096]
METHODS = ["bf16", "tinygemm", "int8", "fp8", "aq_w4a16", "aq_w4a16_g64", "aq_w4a4"]


def tinygemm_pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """torch's int4 layout from aq's codes [N, K]: uint8 [N, K/2] (even k in the high nibble) packed by torch, and
    scales_and_zeros [K/g, N, 2] in its convention w = (q - 8) s + zt, i.e. zt = (8 - z) s."""
    u8 = ((codes[:, ::2].to(torch.int32) << 4) | codes[:, 1::2].to(torch.int32)).to(torch.uint8)
    packed = torch._convert_weight_to_int4pack(u8.contiguous(), 8)
    s = scales.float()
    return packed, torch.stack([s, (8 - zeros.float()) * s], dim=-1).to(torch.bfloat16).contiguous()


def build(method: str, K: int, N: int, n_copies: int, w: torch.Tensor):
    """(weights per copy, bytes of one copy, fn(x, weight) -> y) for one method, or raises if unsupported here."""
    from aq.kernels import w4a4 as Q
    from aq.kernels import w4a16 as W

    if method == "bf16":
        ws = [w.clone() for _ in range(n_copies)]
        return ws, w.numel() * 2, lambda x, wi: F.linear(x, wi)
    if method in ("aq_w4a16", "aq_w4a16_g64", "tinygemm"):
        p = W.pack_weight(w.float(), 4, 64 if method.endswith("g64") else 128, torch.bfloat16)
        if method == "tinygemm":
            t = tinygemm_pack(W.unpack_weight(p), p.scales, p.zeros)
            ws = [(t[0].clone(), t[1].clone()) for _ in range(n_copies)]
            return ws, t[0].numel() * t[0].element_size() + t[1].numel() * 2, \
                lambda x, wi: torch._weight_int4pack_mm(x, wi[0], 128, wi[1])
        ws = [W.PackedWeight(p.qweight.clone(), p.scales.clone(), p.zeros.clone(), p.bits, p.group_size, N, K)
              for _ in range(n_copies)]
        return ws, p.nbytes(), lambda x, wi: W.w4a16_linear(x, wi)
    if method == "aq_w4a4":
        q = Q.pack_w4a4_weight(w.float(), 4)
        ws = [dataclasses.replace(q, packed=q.packed.clone(), scale=q.scale.clone(), zero=q.zero.clone(),
                                  code_sum=q.code_sum.clone()) for _ in range(n_copies)]
        return ws, q.packed.numel() + 12 * N, lambda x, wi: Q.w4a4_linear(x, wi)
    if method == "int8":
        w8 = torch.randint(-8, 8, (N, K), device="cuda", dtype=torch.int8)
        ws = [w8.clone() for _ in range(n_copies)]
        return ws, N * K, lambda x, wi: torch._int_mm(x, wi.t())
    if method == "fp8":
        f8 = (w.float() / w.abs().amax(1, keepdim=True) * 448).to(torch.float8_e4m3fn)
        sb = torch.rand(1, N, device="cuda", dtype=torch.float32)
        ws = [(f8.clone(), sb.clone()) for _ in range(n_copies)]
        return ws, N * K + 4 * N, None  # fn built per M (needs the activation scales)
    raise ValueError(f"unknown method {method!r}")


def act_for(method: str, M: int, K: int, x: torch.Tensor):
    if method == "int8":
        return torch.randint(-8, 8, (M, K), device="cuda", dtype=torch.int8)
    if method == "fp8":
        return (x.float() / x.float().abs().amax(1, keepdim=True) * 448).to(torch.float8_e4m3fn)
    return x


def run(args) -> dict:
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    shapes = QUICK_SHAPES if args.quick else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = QUICK_MS if args.quick else [int(v) for v in args.ms.split(",")]
    methods = args.methods.split(",")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, L2 {l2 >> 20} MB", flush=True)
    rows, t0 = [], time.time()
    for K, N in shapes:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        built = {}
        for m in methods:
            try:
                probe = build(m, K, N, 1, w)
                n_copies = max(2, min(64, -(-3 * l2 // max(probe[1], 1))))
                built[m] = build(m, K, N, n_copies, w)
                del probe
            except Exception as e:  # noqa: BLE001 - a method this torch/GPU lacks is reported, not fatal
                print(f"  {m} unavailable for {K}x{N}: {type(e).__name__}: {str(e)[:150]}", flush=True)
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            row = dict(K=K, N=N, M=M)
            for m, (ws, wbytes, fn) in built.items():
                key = f"{m}_us" if m != "bf16" else "bf16_us"
                try:
                    if m == "int8" and M <= 16:
                        row[key] = None  # cuBLAS int8 needs M > 16
                        continue
                    a = act_for(m, M, K, x)
                    if m == "fp8":
                        sa = torch.rand(M, 1, device="cuda", dtype=torch.float32)
                        calls = [lambda wi=wi: torch._scaled_mm(a, wi[0].t(), sa, wi[1], out_dtype=torch.bfloat16,
                                                                use_fast_accum=True) for wi in ws]
                    else:
                        calls = [lambda wi=wi: fn(a, wi) for wi in ws]
                    row[key] = round(graph_time(calls, args.reps), 2)
                    a_bytes = a.numel() * a.element_size() + M * N * 2
                    row[f"{m}_roofline_us"] = round((wbytes + a_bytes) / bw * 1e6, 2)
                except Exception as e:  # noqa: BLE001
                    row[key] = None
                    row.setdefault("errors", {})[m] = f"{type(e).__name__}: {str(e)[:150]}"
            rows.append(row)
            b = row.get("bf16_us")
            print(f"  {K}x{N} M={M:<5} " + " ".join(
                f"{m}={row.get(m + '_us') if m != 'bf16' else b}" for m in built), flush=True)
        del built, w
        torch.cuda.empty_cache()
    from aq.kernels import tuned

    cfg = tuned.config_file(torch.cuda.get_device_name())
    return dict(gpu=torch.cuda.get_device_name(), copy_TBps=round(bw / 1e12, 3), sms=props.multi_processor_count,
                l2_MB=l2 >> 20, torch=torch.__version__, triton=__import__("triton").__version__,
                tuned_config=str(cfg) if cfg.exists() else None, seconds=round(time.time() - t0, 1),
                note="int8/fp8: GEMM only (pre-quantized activations); aq_w4a4 includes activation quantization; "
                     "times are CUDA graphs over weight copies of 3x L2; *_roofline_us = bytes / copy bandwidth",
                rows=rows)


def markdown(res: dict) -> str:
    cols = [m for m in METHODS if m != "bf16" and any(r.get(f"{m}_us") for r in res["rows"])]
    out = [f"# Linear kernels on {res['gpu']} (copy {res['copy_TBps']} TB/s), multiples of cuBLAS bf16 (higher is "
           f"faster); bf16 in us", "", "| K x N | M | bf16 us | " + " | ".join(cols) + " | aq W4A16 % of roofline |",
           "|---|---|---|" + "---|" * len(cols) + "---|"]
    for r in res["rows"]:
        b = r.get("bf16_us")
        cells = []
        for m in cols:
            t = r.get(f"{m}_us")
            cells.append(f"{b / t:.2f}x" if b and t else "")
        roof, t = r.get("aq_w4a16_roofline_us"), r.get("aq_w4a16_us")
        frac = f"{100 * roof / t:.0f}%" if roof and t else ""
        out.append(f"| {r['K']}x{r['N']} | {r['M']} | {b or ''} | " + " | ".join(cells) + f" | {frac} |")
    return "\n".join(out) + "\n\n" + res["note"] + "\n"


def plot(res: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = sorted({(r["K"], r["N"]) for r in res["rows"]}, key=lambda s: [tuple(x) for x in SHAPES].index(s)
                    if s in SHAPES else 99)
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    for ax, (K, N) in zip(axes[0], shapes):
        rs = [r for r in res["rows"] if (r["K"], r["N"]) == (K, N)]
        for m in METHODS[1:]:
            pts = [(r["M"], r["bf16_us"] / r[f"{m}_us"]) for r in rs if r.get(f"{m}_us") and r.get("bf16_us")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{K}x{N}")
        ax.set_xlabel("M")
        ax.set_ylabel("x cuBLAS bf16")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{res['gpu']}, copy {res['copy_TBps']} TB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for kernels.json, kernels.md, kernels.png")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_SHAPES} x M {QUICK_MS} only (< 2 min)")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    (out / "kernels.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "kernels.md").write_text(markdown(res))
    made = plot(res, out / "kernels.png")
    print(f"wrote {out}/kernels.json, kernels.md" + (", kernels.png" if made else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
