"""W8A8 on the GPU: aq's int8-container GEMM (aq.kernels.w8a8) beside cuBLAS bf16 and cuBLAS int8 (torch._int_mm).

    PYTHONPATH=$PWD python bench/w8a8.py --out DIR   # the table (DIR/w8a8.json, DIR/w8a8.md); --quick: 2 shapes, 3 M

Timing as bench/w4a4.py (bench.timing.graph_time: every call captured in a CUDA graph with copies on other buffers,
>= 200 MB of weights, median of 30 replays). Correctness is bench/check_gpu.py's (family w8a8); here each point also
checks the per-channel integer result against torch._int_mm with the zero-point terms added in int64.
Columns: aq_gemm (per-channel weight, the GEMM alone), aq_linear (plus the per-token activation quantization),
aq_gemm_g128 (weight groups of 128 along K), cublas_bf16, int8_mm (cuBLAS int8 without any scales; M <= 16 runs as
M = 32, cuBLAS' minimum).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from aq.kernels import act_quant as Q
from aq.kernels import w8a8 as W
from bench import w4a4 as B4  # its activations with outlier channels, buffer counts, failure list, GPU info
from bench.timing import graph_time

SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N): SmolLM2, LLaMA sizes
MS = [1, 16, 128, 512, 2048, 4096]


def int_reference(a: Q.QuantizedActivation, wt: W.W8A8Weight) -> torch.Tensor:
    """Exact per-channel sum_k (ca - za)(cw - zw): torch._int_mm on the signed codes, corrections in int64."""
    q = a.q.reshape(-1, wt.K)
    M = q.shape[0]
    Mp = max(32, -(-M // 8) * 8)
    qp = torch.zeros(Mp, wt.K, dtype=torch.int8, device=q.device)
    qp[:M] = q
    acc = torch._int_mm(qp, wt.codes.t().contiguous())[:M].long()
    za, zw = a.zero.reshape(-1, 1).long(), wt.zero.long()
    return (acc - za * wt.code_sum.long() - zw * (a.code_sum.reshape(-1, 1).long() - wt.K * za)).int()


def point(M, K, N, dev, g) -> dict:
    row = dict(M=M, K=K, N=N)
    n = B4.n_sets_for(2 * N * K + 2 * M * K)
    xs = [B4.rand_act(M, K, torch.bfloat16, g, dev) for _ in range(n)]
    ws = [torch.randn(N, K, generator=g, device=dev) * 0.02 for _ in range(n)]
    wb = [w.to(torch.bfloat16) for w in ws]
    timed = lambda make: graph_time([make(i) for i in range(n)], reps=30)  # noqa: E731
    row["cublas_bf16"] = timed(lambda i: (lambda: F.linear(xs[i], wb[i])))
    Mi = M if M > 16 else 32
    ai = [torch.randint(-128, 128, (Mi, K), generator=g, device=dev, dtype=torch.int8) for _ in range(n)]
    wi = [torch.randint(-128, 128, (N, K), generator=g, device=dev, dtype=torch.int8) for _ in range(n)]
    row["int8_mm"] = timed(lambda i: (lambda: torch._int_mm(ai[i], wi[i].t())))
    for key, group in (("aq_gemm", None), ("aq_gemm_g128", 128 if K % 128 == 0 else None)):
        if key == "aq_gemm_g128" and group is None:
            continue
        wts = [W.pack_w8a8_weight(w, 8, group) for w in ws]
        acts = [Q.quantize_activation(x, 8, signed=True) for x in xs]
        if group is None:
            if not torch.equal(W.w8a8_matmul(acts[0], wts[0], None, torch.int32), int_reference(acts[0], wts[0])):
                B4.fail(f"M={M} K={K} N={N}: aq's integer sum differs from torch._int_mm's")
            row["config"] = W.pick_config(M, N, K, K, dev)
            row["aq_linear"] = timed(lambda i: (lambda: W.w8a8_linear(xs[i], wts[i], abits=8)))
        row[key] = timed(lambda i: (lambda: W.w8a8_matmul(acts[i], wts[i], None, torch.bfloat16)))
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (correctness on the CPU: tests/test_w8a8.py, bench/check_gpu.py --quick)")
    dev, g = "cuda", torch.Generator(device="cuda").manual_seed(0)
    shapes, ms = (SHAPES[2:4], [1, 128, 2048]) if args.quick else (SHAPES, MS)
    rows = []
    for K, N in shapes:
        for M in ms:
            rows.append(point(M, K, N, dev, g))
            torch.cuda.empty_cache()  # the point's buffers are gone with its frame
    info = B4.gpu_info()
    cols = ["cublas_bf16", "int8_mm", "aq_gemm", "aq_linear", "aq_gemm_g128"]
    lines = [f"# W8A8 GEMM, {info['gpu']}, {info['date']}", "",
             "us per call (CUDA graphs, weights rotated past L2); x = cuBLAS bf16 / aq_gemm", "",
             "| K x N | M | " + " | ".join(cols) + " | x |", "|---" * (len(cols) + 3) + "|"]
    for r in rows:
        vals = " | ".join(f"{r[c]:.1f}" if r.get(c) is not None else "-" for c in cols)
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {vals} | {r['cublas_bf16'] / r['aq_gemm']:.2f} |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "w8a8.json").write_text(json.dumps(dict(info=info, rows=rows, fails=B4.FAILS), indent=1,
                                                       default=str))
        (args.out / "w8a8.md").write_text("\n".join(lines) + "\n")
    return 1 if B4.FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
