"""Tune aq's kernel configs on the GPU this runs on and write aq/kernels/configs/<gpu-name>.json (shipped, read at run
time, so a user's first call does not stall on tuning).

    python bench/autotune.py                       # every family, its default shapes and M buckets
    python bench/autotune.py --family w4a16 --models llama3-8b --buckets 1,16,4096 --log /tmp/tune.json

Structure: a *family* (one kernel family, e.g. w4a16) says which problems to tune (shapes of real models), which M
buckets, which candidate configs per (problem, bucket), and how to build a call for a candidate. This driver compiles
every candidate once in parallel worker processes (Triton's disk cache then serves the timing process), times each
candidate under a CUDA graph over enough rotating weight copies that the weights come from DRAM (not L2), keeps the
fastest, and merges the winners into the per-GPU file under the family's key (other families' entries are kept).
To add a family: subclass Family and register it in FAMILIES.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.timing import copies_for, graph_time

ROOT = Path(__file__).resolve().parents[1]

def gpu_name() -> str:
    return torch.cuda.get_device_name()


# ------------------------------------------------------------------------------------------------------------ families
class Family:
    """One kernel family. Problems are JSON-able dicts; key(problem) is the entry in the config file."""

    name = ""

    def problems(self, args) -> list[dict]:
        raise NotImplementedError

    def buckets(self, args) -> list[int]:
        raise NotImplementedError

    def key(self, problem: dict) -> str:
        raise NotImplementedError

    def candidates(self, problem: dict, M: int) -> list[dict]:
        raise NotImplementedError

    def make_calls(self, problem: dict, M: int, cfg: dict, state: dict) -> list:
        """Closures, one per rotating weight copy, each running the kernel once with cfg."""
        raise NotImplementedError

    def check(self, problem: dict, M: int, cfg: dict, state: dict) -> float:
        """Relative error of cfg's output against the reference (catches configs that compile but are wrong)."""
        raise NotImplementedError


MODELS = {  # linear shapes (K, N) of each model, as in the issue
    "llama2-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
    "llama3-8b": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)],
    "smollm2": [(576, 576), (576, 192), (576, 1536), (1536, 576)],
    "qwen2.5-0.5b": [(896, 896), (896, 128), (896, 4864), (4864, 896)],
}
DEFAULT_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


class W4A16(Family):
    name = "w4a16"

    def problems(self, args) -> list[dict]:
        out, seen = [], set()
        if getattr(args, "shapes", ""):
            for kn in args.shapes.split(","):
                K, N = (int(v) for v in kn.split("x"))
                for g in args.groups.split(","):
                    out.append(dict(K=K, N=N, group=K if g == "ch" else int(g), bits=args.bits))
            return out
        for model in args.models.split(","):
            for K, N in MODELS[model]:
                for g in args.groups.split(","):
                    g = K if g == "ch" else int(g)
                    if K % g or (K, N, g) in seen:
                        continue
                    seen.add((K, N, g))
                    out.append(dict(K=K, N=N, group=g, bits=args.bits))
            if model == "smollm2" and "64" not in args.groups.split(","):  # K = 576 takes no g = 128: tune g = 64 too
                for K, N in MODELS[model]:
                    if (K, N, 64) not in seen:
                        seen.add((K, N, 64))
                        out.append(dict(K=K, N=N, group=64, bits=args.bits))
        return out

    def buckets(self, args) -> list[int]:
        return [int(b) for b in args.buckets.split(",")] if args.buckets else DEFAULT_BUCKETS

    def seed(self, problem: dict, M: int) -> dict:
        """What aq runs today for this problem on this GPU (its tuned entry, else the nearest tuned neighbour of the
        shipped tables): the centre of the pruned search."""
        from aq.kernels import w4a16 as W

        sms = torch.cuda.get_device_properties(0).multi_processor_count
        return W.fallback_config(M, problem["N"], problem["K"], problem["bits"], problem["group"], gpu_name(), sms)

    def key(self, problem: dict) -> str:
        from aq.kernels import w4a16 as W

        return W.shape_key(problem["bits"], problem["group"], problem["K"], problem["N"])

    def candidates(self, problem: dict, M: int) -> list[dict]:
        from aq.kernels import w4a16 as W

        K, N, bits = problem["K"], problem["N"], problem["bits"]
        e = 32 // W.container_bits(bits)
        kw = K // e
        sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
        out = []

        def splits(tiles, bkw):
            """split-K counts that give ~1, 2, 4 waves of programs (runtime only: no recompiles)."""
            res = set()
            for waves in (1, 2, 4):
                s = max(1, min(-(-waves * sms // max(tiles, 1)), kw // bkw))
                res.add(s)
            return sorted(res)

        if M <= 4:  # CUDA-core GEMV (one program row per token)
            for bn in (64, 128, 256):
                for bkw in (16, 32, 64):  # 64: more weight words in flight per program (the H200's higher bandwidth)
                    if bn * bkw > 8192 or bkw > kw:
                        continue
                    for pf in ((False, True) if M == 1 else (False,)):
                        for nw in ((4, 8) if bn * bkw >= 4096 else (4,)):
                            for s in splits(-(-N // bn), bkw):
                                out.append(dict(kernel="gemv", block_n=bn, block_kw=bkw, split_k=s, prefetch=pf,
                                                num_warps=nw, num_stages=1))
        if M <= 64:  # tensor cores, one M tile; at M <= 16 the swapped form (wgmma, weights from registers) won
            bm = max(16, 1 << (M - 1).bit_length())
            for bn in (64, 128):
                for bkw in (max(2, 64 // e), max(2, 128 // e), max(2, 256 // e)):
                    if bkw > kw:
                        continue
                    for swap, fold in (((True, False), (True, True)) if M <= 16 else
                                       ((True, False), (False, False), (True, True))):
                        if fold and problem["group"] % (bkw * e):
                            continue  # folding needs one group per K step
                        for ns in ((3,) if fold else (3, 4)):
                            for s in splits(-(-N // bn) * -(-M // bm), bkw):
                                out.append(dict(kernel="mma", block_m=bm, block_n=bn, block_kw=bkw, split_k=s,
                                                swap=swap, join=True, half_dq=True, fold=fold, num_warps=4,
                                                num_stages=ns))
        if 64 <= M <= 1024:  # tensor-core tiles
            for bm, bn, nw in ((64, 128, 4), (128, 128, 8), (256, 128, 8)):
                if bm > 2 * max(M, 64):
                    continue
                for bkw in (max(2, 64 // e), max(2, 128 // e)):
                    if bkw > kw:
                        continue
                    for ns in (3, 4):
                        if bm == 256 and bkw * e > 64 and ns == 4:
                            continue  # over the shared-memory limit
                        tiles = -(-N // bn) * -(-M // bm)
                        for s in sorted({1, *([2, 4] if tiles < sms else [])}):
                            out.append(dict(kernel="mma", block_m=bm, block_n=bn, block_kw=bkw, split_k=s, swap=True,
                                            join=True, half_dq=True, group_m=8, num_warps=nw, num_stages=ns))
        if M >= 128:  # dequantize once, then cuBLAS
            for bn, bk, nw in ((16, 512, 4), (8, 1024, 4), (16, 256, 4), (32, 512, 8), (16, 1024, 8)):
                bkw = min(max(2, bk // e), kw)
                out.append(dict(kernel="dequant", block_n=bn, block_kw=bkw, half_dq=True, num_warps=nw))
        return out

    def setup(self, problem: dict, M: int, state: dict) -> None:
        from aq.kernels import w4a16 as W

        K, N = problem["K"], problem["N"]
        tag = (K, N, problem["group"], problem["bits"])
        if state.get("tag") != tag:
            state.clear()
            state["tag"] = tag
            torch.manual_seed(0)
            p = W.pack_weight(torch.randn(N, K, device="cuda") * 0.02, problem["bits"], problem["group"],
                              torch.bfloat16)
            n = copies_for(p.nbytes())
            state["packed"] = [p] + [W.PackedWeight(p.qweight.clone(), p.scales.clone(), p.zeros.clone(), p.bits,
                                                    p.group_size, p.N, p.K) for _ in range(n - 1)]
        if state.get("M") != M:
            state["M"] = M
            state["x"] = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            p = state["packed"][0]
            state["ref"] = W.w4a16_linear_reference(state["x"], p).float()

    def make_calls(self, problem, M, cfg, state):
        from aq.kernels import w4a16 as W

        self.setup(problem, M, state)
        x = state["x"]
        return [lambda p=p: W.w4a16_linear_triton(x, p, None, cfg) for p in state["packed"]]

    def check(self, problem, M, cfg, state):
        from aq.kernels import w4a16 as W

        self.setup(problem, M, state)
        y = W.w4a16_linear_triton(state["x"], state["packed"][0], None, cfg).float()
        ref = state["ref"]
        return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


FAMILIES = {f.name: f for f in (W4A16(),)}


# ------------------------------------------------------------------------------------------------------------ driver
def _compile_worker(family_name: str, jobs: list) -> list:
    """Runs each (problem, M, cfg) once so Triton compiles it into the shared disk cache. Returns failures."""
    fam = FAMILIES[family_name]
    state, failed = {}, []
    for problem, M, cfg in jobs:
        try:
            for c in fam.make_calls(problem, M, cfg, state)[:1]:
                c()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a config that does not compile or launch is dropped
            failed.append((problem, M, cfg, f"{type(e).__name__}: {str(e)[:200]}"))
    return failed


def _compile_key(problem: dict, M: int, cfg: dict) -> str:
    """Configs that differ only in run-time values (split count, M within one bucket) share a compile."""
    c = {k: v for k, v in cfg.items() if k != "split_k"}
    c["use_part"] = cfg.get("split_k", 1) > 1
    K, N, g = problem["K"], problem["N"], problem["group"]
    e = 32 // (2 if problem["bits"] == 2 else 4 if problem["bits"] <= 4 else 8)
    spec = [K % 16 == 0, (K // e) % 16 == 0, N % 16 == 0, g % 16 == 0, g % (cfg["block_kw"] * e) == 0]
    return json.dumps([spec, c], sort_keys=True)


def precompile(fam: Family, work: list, jobs: int) -> dict:
    uniq = {}
    for problem, M, cfg in work:
        uniq.setdefault(_compile_key(problem, M, cfg), (problem, M, cfg))
    todo = list(uniq.values())
    todo.sort(key=lambda t: (t[0]["K"], t[0]["N"], t[1]))
    chunks = [todo[i::jobs] for i in range(jobs)]
    t0 = time.time()
    failed = []
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as ex:
        for f in [ex.submit(_compile_worker, fam.name, ch) for ch in chunks if ch]:
            failed += f.result()
    print(f"[{fam.name}] compiled {len(todo)} kernels on {jobs} processes in {time.time() - t0:.0f}s, "
          f"{len(failed)} failed", flush=True)
    for f in failed[:10]:
        print("   failed:", json.dumps(f[2]), f[3], flush=True)
    return {_compile_key(*f[:3]) for f in failed}


def config_distance(a: dict, b: dict) -> float:
    """How far two configs are apart: a kernel change costs most, then each differing option, numeric knobs by their
    log2 ratio (block 64 vs 128 is one step, split 4 vs 9 a bit more)."""
    if a.get("kernel") != b.get("kernel"):
        return 100.0
    d = 0.0
    for k in set(a) | set(b):
        if k == "us":
            continue
        x, y = a.get(k), b.get(k)
        if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, (int, float)) \
                or not isinstance(y, (int, float)):
            d += 0 if x == y else 1.0
        else:
            d += abs(math.log2(max(x, 1) / max(y, 1)))
    return d


def prune(fam: Family, problems: list, buckets: list, budget_s: float, per_candidate_s: float) -> dict:
    """Per (problem key, M): the candidates to time, nearest the family's seed config first, as many as the budget
    allows (the seed itself always leads, so a bucket never ends worse than what aq runs untuned)."""
    n_pm = len(problems) * len(buckets)
    keep = max(2, int(budget_s / max(n_pm * per_candidate_s, 1e-9))) if budget_s else None
    plan = {}
    for p in problems:
        for M in buckets:
            cands = fam.candidates(p, M)
            seed = fam.seed(p, M) if hasattr(fam, "seed") else None
            if seed is not None:
                cands = [seed] + sorted((c for c in cands if c != seed), key=lambda c: config_distance(c, seed))
            plan[(fam.key(p), M)] = cands if keep is None else cands[:keep]
    return plan


def tune_family(fam: Family, args, budget_s: float = 0.0, on_shape=None) -> tuple[dict, list]:
    """on_shape(table): called after each shape, so a run cut short (timeout) keeps what it finished."""
    problems, buckets = fam.problems(args), fam.buckets(args)
    t_start = time.time()
    # compile runs on --jobs processes, ~2 s per kernel; timing ~0.1-0.3 s per candidate: one candidate costs about
    # 2 / jobs + 0.25 s of wall time (measured on the H100 run); the rest of the budget is the timing loop's deadline
    plan = prune(fam, problems, buckets, budget_s, 2.0 / max(args.jobs, 1) + 0.25)
    work = [(p, M, c) for p in problems for M in buckets for c in plan[(fam.key(p), M)]]
    print(f"[{fam.name}] {len(problems)} shapes x {len(buckets)} buckets: {len(work)} candidates"
          + (f" (pruned to the seed's neighbourhood for a {budget_s:.0f}s budget)" if budget_s else ""), flush=True)
    bad = precompile(fam, work, args.jobs) if args.jobs > 1 else set()
    table, log, state = {}, [], {}
    t0 = time.time()
    deadline = t_start + budget_s if budget_s else math.inf
    for problem in problems:
        key = fam.key(problem)
        for M in buckets:
            best = None
            for i, cfg in enumerate(plan[(key, M)]):
                if i > 0 and time.time() > deadline:
                    break  # out of budget: keep the best so far (the seed at least)
                if _compile_key(problem, M, cfg) in bad:
                    continue
                try:
                    err = fam.check(problem, M, cfg, state)
                    if not err < args.max_err:
                        log.append(dict(key=key, M=M, cfg=cfg, us=None, err=err))
                        print(f"   WRONG {key} M={M} {cfg} err={err:.2e}", flush=True)
                        continue
                    us = graph_time(fam.make_calls(problem, M, cfg, state), reps=args.reps)
                except Exception as e:  # noqa: BLE001
                    log.append(dict(key=key, M=M, cfg=cfg, us=None, error=f"{type(e).__name__}: {str(e)[:200]}"))
                    continue
                log.append(dict(key=key, M=M, cfg=cfg, us=us, err=err))
                if best is None or us < best[0]:
                    best = (us, cfg)
            if best:
                table.setdefault(key, {})[str(M)] = dict(best[1], us=round(best[0], 2))
                print(f"  {key:>18} M={M:<5} {best[0]:9.1f} us  {json.dumps(best[1])}", flush=True)
        torch.cuda.empty_cache()
        if on_shape is not None and key in table:
            on_shape(table)
    print(f"[{fam.name}] timed in {time.time() - t0:.0f}s", flush=True)
    return table, log


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default=",".join([*FAMILIES, "w4a4"]), help="w4a16 and/or w4a4")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--shapes", default="", help="K x N list (e.g. 4096x14336,14336x4096) instead of --models")
    ap.add_argument("--groups", default="128", help="comma list of group sizes, 'ch' = per channel")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--buckets", default="", help="comma list of M buckets (default: 1, 2, 4, ..., 16384)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--max-err", type=float, default=2e-2)
    ap.add_argument("--out", default="", help="config file to merge into (default: the package's file for this GPU)")
    ap.add_argument("--log", default="", help="write every candidate's time here (JSON)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="bound on total wall time (s): the search is pruned to each bucket's seed neighbourhood "
                         "(what aq runs now: tuned entry or nearest tuned neighbour) and stops timing at the deadline; "
                         "w4a4 gets its share through bench/w4a4.py sweep --budget. 0: the full search")
    ap.add_argument("--w4a4-out", default="bench/results/w4a4-sweep", help="folder for the w4a4 sweep's tables")
    ap.add_argument("--w4a4-share", type=float, default=0.25, help="fraction of --budget-s for the w4a4 sweep")
    args = ap.parse_args(argv)

    from aq.kernels import tuned

    out = Path(args.out) if args.out else tuned.config_file(gpu_name())
    meta = dict(gpu=gpu_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=__import__("triton").__version__)
    logs = {}
    names = args.family.split(",")
    t_main = time.time()
    w4a4 = "w4a4" in names
    names = [n for n in names if n != "w4a4"]
    own = args.budget_s * (1 - args.w4a4_share) if w4a4 else args.budget_s  # seconds for the families here
    for i, name in enumerate(names):
        fam = FAMILIES[name]
        left = own - (time.time() - t_main)
        base = dict(tuned.tuned(name, gpu_name()) or {}) if not args.out else {}
        out.parent.mkdir(parents=True, exist_ok=True)

        def write(table, name=name, base=base):
            tuned.write_tuned(name, gpu_name(), {**base, **table}, meta, out)

        table, log = tune_family(fam, args, max(left / (len(names) - i), 30.0) if args.budget_s else 0.0, write)
        write(table)
        logs[name] = log
        print(f"wrote {out}")
        if args.log:
            Path(args.log).write_text(json.dumps(dict(meta=meta, logs=logs)) + "\n")
    if w4a4:  # its sweep lives in bench/w4a4.py (per M bucket, shape-independent configs); it stops starting buckets
        # at its budget, buckets not reached keep the shipped defaults (the H100 winners)
        share = max(args.budget_s - (time.time() - t_main), 20.0) if args.budget_s else 240
        cmd = [sys.executable, str(ROOT / "bench" / "w4a4.py"), "sweep", "--budget", f"{share:.0f}",
               "--out", args.w4a4_out] + ([] if args.out else ["--write"])  # an explicit --out: package file untouched
        print("[w4a4]", " ".join(cmd), flush=True)
        t = time.time()
        rc = subprocess.run(cmd, env=dict(os.environ)).returncode
        print(f"[w4a4] sweep exit {rc} after {time.time() - t:.0f}s", flush=True)
        if rc:
            raise SystemExit(rc)

if __name__ == "__main__":
    main()
