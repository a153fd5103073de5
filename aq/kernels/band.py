"""Triton band kernels of the masked affine transforms (aq.kernels.affine): products with A*M that skip the zero part
of the band / block structure, the fake quantization fused into the product's epilogue, and the gradient of A computed
on the band tiles only. M (the mask) is recomputed in registers from (band, block, alpha), never loaded.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from aq import primitives
from aq.kernels.common import cdiv, fake_quant_values, grouped_tile, launch_tuned, next_pow2, qparams, quick_bench

# DOT_MODE: how tl.dot multiplies. 0: exact fp32 ("ieee"), 1: tf32 (fp32 operands, tensor cores), 2: bf16, 3: fp16.
DOT_IEEE, DOT_TF32, DOT_BF16, DOT_FP16 = 0, 1, 2, 3


@triton.jit
def _mask_values(rows, cols, band, block, alpha):
    """M[rows, cols]: 1 on the diagonal, alpha where |i - j| < band in one block, 0 elsewhere."""
    diff = rows[:, None] - cols[None, :]
    keep = (diff < band) & (diff > -band) & ((rows // block)[:, None] == (cols // block)[None, :])
    return tl.where(diff == 0, 1.0, tl.where(keep, alpha, 0.0))


@triton.jit
def _dot(a, b, acc, DOT_MODE: tl.constexpr):
    if DOT_MODE == 0:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_MODE == 1:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    elif DOT_MODE == 2:
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    return acc


def _mm_configs():
    cfgs = []
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); the interpreter takes the first one that fits (large blocks)
    shapes = [(64, 64, 64, 4, 2), (128, 64, 32, 4, 4), (128, 128, 32, 8, 3), (64, 128, 32, 4, 4),
              (128, 32, 32, 4, 4), (64, 32, 64, 4, 3), (128, 16, 32, 4, 4), (64, 256, 32, 8, 3)]
    for bm, bn, bk, w, st in shapes:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w,
                                  num_stages=st))
    return cfgs


_FREE_BN = (64, 128)  # tile widths tried when the group size does not fix BLOCK_N


def _prune_mm(configs, named_args, **kwargs):
    req = kwargs.get("REQ_BN", named_args.get("REQ_BN", 0))
    return [c for c in configs if (c.kwargs["BLOCK_N"] == req if req else c.kwargs["BLOCK_N"] in _FREE_BN)]


@triton.autotune(configs=_mm_configs(), key=["M", "N", "K", "SPAN_KEY", "REQ_BN", "APPLY_MASK", "QUANT", "DOT_MODE"],
                 prune_configs_by={"early_config_prune": _prune_mm}, do_bench=quick_bench)
@triton.jit
def _band_mm_kernel(
    x_ptr, b_ptr, out_ptr, y_ptr, cmax_ptr, cmin_ptr, stats_ptr,
    M, N, K, NG,
    sxm, sxk, sbn, sbk,
    band, block, alpha,
    SPAN_KEY, REQ_BN,
    APPLY_MASK: tl.constexpr, RESTRICT: tl.constexpr, DOT_MODE: tl.constexpr,
    QUANT: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, EPS: tl.constexpr,
    HAS_CMAX: tl.constexpr, HAS_CMIN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * B[n, k] (* M[n, k] if APPLY_MASK), k restricted to the band/block of n (RESTRICT).

    B is addressed through strides (sbn, sbk), so B = A gives x @ (A*M)^T and swapped strides give x @ (A*M).
    QUANT: BLOCK_N is one quantization group; the epilogue also fake-quantizes the tile (y) and saves per-group stats
    [4, M, NG] (raw max, raw min, scale, zero) for the backward pass; out then holds the fp32 transformed values."""
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    n0 = pid_n * BLOCK_N
    if RESTRICT:
        n_last = tl.minimum(n0 + BLOCK_N, N) - 1
        lo = tl.maximum(tl.maximum(n0 - band + 1, (n0 // block) * block), 0)
        hi = tl.minimum(tl.minimum(n_last + band, (n_last // block + 1) * block), K)
        lo = (lo // BLOCK_K) * BLOCK_K
    else:
        lo = 0
        hi = K

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    rk0 = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * sxm
    b_rows = b_ptr + rn[:, None].to(tl.int64) * sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        rk = k0 + rk0
        k_ok = rk < hi
        xt = tl.load(x_rows + rk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(b_rows + rk[None, :] * sbk, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if APPLY_MASK:
            bt = bt * _mask_values(rn, rk, band, block, alpha)
        acc = _dot(xt, tl.trans(bt), acc, DOT_MODE)

    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if QUANT:
        xmax = tl.where(m_ok, tl.max(acc, axis=1), 0.0)
        xmin = tl.where(m_ok, tl.min(acc, axis=1), 0.0)
        pidx = rm.to(tl.int64) * NG + pid_n
        cmax = tl.full([BLOCK_M], 1.0, tl.float32)
        cmin = tl.full([BLOCK_M], 1.0, tl.float32)
        if HAS_CMAX:
            cmax = tl.load(cmax_ptr + pidx, mask=m_ok, other=1.0)
        if HAS_CMIN:
            cmin = tl.load(cmin_ptr + pidx, mask=m_ok, other=1.0)
        scale, zero = qparams(xmin * cmin, xmax * cmax, BITS, SYMMETRIC, EPS)
        y = fake_quant_values(acc, scale[:, None], zero[:, None], BITS)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
        MG = M * NG
        tl.store(stats_ptr + pidx, xmax, mask=m_ok)
        tl.store(stats_ptr + MG + pidx, xmin, mask=m_ok)
        tl.store(stats_ptr + 2 * MG + pidx, scale, mask=m_ok)
        tl.store(stats_ptr + 3 * MG + pidx, zero, mask=m_ok)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _grad_configs():
    shapes = [(64, 64, 64, 4, 2), (128, 128, 32, 8, 3), (128, 64, 32, 4, 4)]
    return [triton.Config({"BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_R": br}, num_warps=w, num_stages=st)
            for bi, bj, br, w, st in shapes]


def _prune_grad(configs, named_args, **kwargs):
    return configs


@triton.autotune(configs=_grad_configs(), key=["R", "D", "SPAN_KEY", "APPLY_MASK", "DOT_MODE", "SPLIT"],
                 prune_configs_by={"early_config_prune": _prune_grad}, do_bench=quick_bench,
                 reset_to_zero=["out_ptr"])
@triton.jit
def _band_grad_kernel(
    p_ptr, q_ptr, out_ptr, R, D, spr, spd, sqr, sqd, band, block, alpha, scale_f, SPAN_KEY, ROWS_PER_SPLIT,
    APPLY_MASK: tl.constexpr, DOT_MODE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[i, j] = scale_f * M[i, j] * sum_r P[r, i] Q[r, j], computed only on the (i, j) tiles that meet the
    band/block structure (program (pid_i, pid_j) takes the pid_j-th such j-tile of row tile pid_i); out is
    pre-zeroed elsewhere. SPLIT > 1: program_id(2) takes ROWS_PER_SPLIT rows and adds its part atomically (more
    programs when the band has few tiles)."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    i0 = pid_i * BLOCK_I
    i_last = tl.minimum(i0 + BLOCK_I, D) - 1
    jlo = tl.maximum(tl.maximum(i0 - band + 1, (i0 // block) * block), 0)
    jhi = tl.minimum(tl.minimum(i_last + band, (i_last // block + 1) * block), D)
    j0 = (jlo // BLOCK_J) * BLOCK_J + pid_j * BLOCK_J
    if j0 < jhi:
        ri = i0 + tl.arange(0, BLOCK_I)
        rj = j0 + tl.arange(0, BLOCK_J)
        rr0 = tl.arange(0, BLOCK_R)
        i_ok = ri < D
        j_ok = rj < D
        r_begin = pid_s * ROWS_PER_SPLIT
        r_end = tl.minimum(r_begin + ROWS_PER_SPLIT, R)
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for r0 in range(r_begin, r_end, BLOCK_R):
            rr = r0 + rr0
            r_ok = rr < r_end
            pt = tl.load(p_ptr + rr[:, None].to(tl.int64) * spr + ri[None, :] * spd, mask=r_ok[:, None] & i_ok[None, :],
                         other=0.0)
            qt = tl.load(q_ptr + rr[:, None].to(tl.int64) * sqr + rj[None, :] * sqd, mask=r_ok[:, None] & j_ok[None, :],
                         other=0.0)
            acc = _dot(tl.trans(pt), qt, acc, DOT_MODE)
        if APPLY_MASK:
            acc = acc * _mask_values(ri, rj, band, block, alpha)
        acc = acc * scale_f
        offs = out_ptr + ri[:, None].to(tl.int64) * D + rj[None, :]
        if SPLIT > 1:
            tl.atomic_add(offs, acc, mask=i_ok[:, None] & j_ok[None, :])
        else:
            tl.store(offs, acc, mask=i_ok[:, None] & j_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------------
# launch wrappers
# ---------------------------------------------------------------------------------------------------------------------

def dot_mode_for(dtype: torch.dtype, device: torch.device) -> int:
    """How the kernels multiply: exact fp32 in the interpreter; on a GPU, 16-bit inputs in their dtype (as autocast
    would) and fp32 inputs in tf32 or exact fp32 following torch's float32 matmul precision setting
    (torch.set_float32_matmul_precision("high") -> tf32, the same rule cuBLAS calls follow)."""
    if device.type != "cuda":
        return DOT_IEEE
    if dtype == torch.bfloat16:
        return DOT_BF16
    if dtype == torch.float16:
        return DOT_FP16
    tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
    return DOT_TF32 if tf32 else DOT_IEEE


def _span_key(K: int, band: int, block: int) -> int:
    return next_pow2(max(1, min(K, 2 * band - 1, block)))


def band_mm(x: torch.Tensor, B: torch.Tensor, band: int, block: int, alpha: float, *, transpose_b: bool = False,
            apply_mask: bool = True, out_dtype: torch.dtype | None = None, dot_mode: int | None = None,
            quant: dict | None = None):
    """out = x @ (B*M)^T (transpose_b False) or x @ (B*M) (True); M from (band, block, alpha) when apply_mask, else
    B is used as is and (band, block) only says where B is zero. x [rows, d], B [d, d].

    quant = dict(bits, g, symmetric, cmax, cmin) (g a power of 2 in 16..256 dividing d): returns (out fp32, y, stats)
    with y = fake_quant(out) in out_dtype; otherwise returns out in out_dtype (x's dtype by default)."""
    Mr, K = x.shape
    d = B.shape[0]
    assert B.shape == (d, d) and K == d
    x = x if x.stride(-1) == 1 else x.contiguous()
    dm = dot_mode_for(x.dtype, x.device) if dot_mode is None else dot_mode
    sbn, sbk = (B.stride(1), B.stride(0)) if transpose_b else (B.stride(0), B.stride(1))
    restrict = band < d or block < d
    if quant is not None:
        g = quant["g"]
        NG = d // g
        out = torch.empty((Mr, d), dtype=torch.float32, device=x.device)
        y = torch.empty((Mr, d), dtype=out_dtype or x.dtype, device=x.device)
        stats = torch.empty((4, Mr, NG), dtype=torch.float32, device=x.device)
        cmax, cmin = quant.get("cmax"), quant.get("cmin")
        bits, sym, req_bn = quant["bits"], quant["symmetric"], g
    else:
        NG = 1
        out = torch.empty((Mr, d), dtype=out_dtype or x.dtype, device=x.device)
        y = stats = cmax = cmin = None
        bits, sym, req_bn = 8, False, 0
    if Mr == 0:
        return (out, y, stats) if quant is not None else out

    def grid(meta):
        return (cdiv(Mr, meta["BLOCK_M"]) * cdiv(d, meta["BLOCK_N"]),)

    launch_tuned(_band_mm_kernel, grid, _prune_mm, (
        x, B, out, y if y is not None else out, cmax if cmax is not None else out, cmin if cmin is not None else out,
        stats if stats is not None else out,
        Mr, d, K, NG, x.stride(0), x.stride(1), sbn, sbk, band, block, float(alpha),
        _span_key(d, band, block) if restrict else d, req_bn), dict(
        APPLY_MASK=apply_mask, RESTRICT=restrict, DOT_MODE=dm, QUANT=quant is not None, BITS=bits, SYMMETRIC=sym,
        EPS=primitives.SCALE_EPS, HAS_CMAX=cmax is not None, HAS_CMIN=cmin is not None,
    ), ("mm", Mr, d, _span_key(d, band, block) if restrict else d, req_bn, apply_mask, restrict, dm,
        quant is not None, x.dtype, B.dtype, out.dtype))
    return (out, y, stats) if quant is not None else out


@functools.lru_cache(maxsize=256)
def _n_j_tiles(D: int, band: int, block: int, BI: int, BJ: int) -> int:
    n = 1
    for i0 in range(0, D, BI):
        i_last = min(i0 + BI, D) - 1
        jlo = max(i0 - band + 1, (i0 // block) * block, 0)
        jhi = min(i_last + band, (i_last // block + 1) * block, D)
        n = max(n, cdiv(jhi - (jlo // BJ) * BJ, BJ))
    return n


@functools.lru_cache(maxsize=8)
def _num_sms(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
    return 4  # the interpreter: small, so that tests exercise the split path


def _grad_split(R: int, D: int, band: int, block: int, device) -> int:
    """Row splits for band_grad: enough programs to fill the GPU twice over (with 64 x 64 tiles), >= 256 rows each."""
    tiles = cdiv(D, 64) * _n_j_tiles(D, band, block, 64, 64)
    split = max(1, min(cdiv(2 * _num_sms(str(device)), tiles), R // 256))
    return 1 << (split.bit_length() - 1)  # a power of 2 (few distinct compiled variants)


def band_grad(P: torch.Tensor, Q: torch.Tensor, band: int, block: int, alpha: float, scale: float = 1.0,
              apply_mask: bool = True, dot_mode: int | None = None) -> torch.Tensor:
    """scale * (P^T Q) * M (float32 [d, d]), computed on the band/block tiles only. P, Q: [rows, d]."""
    R, D = P.shape
    assert Q.shape == (R, D)
    split = _grad_split(R, D, band, block, P.device)
    full = band >= D and block >= D and split == 1
    out = (torch.empty if full else torch.zeros)((D, D), dtype=torch.float32, device=P.device)
    dm = dot_mode_for(Q.dtype, Q.device) if dot_mode is None else dot_mode
    rows_per_split = cdiv(cdiv(R, split), 128) * 128

    def grid(meta):
        return (cdiv(D, meta["BLOCK_I"]), _n_j_tiles(D, band, block, meta["BLOCK_I"], meta["BLOCK_J"]),
                cdiv(R, rows_per_split))

    launch_tuned(_band_grad_kernel, grid, _prune_grad, (
        P, Q, out, R, D, P.stride(0), P.stride(1), Q.stride(0), Q.stride(1), band, block, float(alpha), float(scale),
        _span_key(D, band, block), rows_per_split), dict(APPLY_MASK=apply_mask, DOT_MODE=dm, SPLIT=split),
        ("grad", R, D, _span_key(D, band, block), apply_mask, dm, split, P.dtype, Q.dtype))
    return out


