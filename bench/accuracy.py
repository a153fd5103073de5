"""Accuracy of calibration variants on one model, several at once on one GPU (the step is CPU-bound, so 8-12
`python -m aq.calibrate` processes share a GPU well), over seeds: WikiText-2 and held-out C4 perplexity, mean / min /
max, calibration seconds and peak GPU memory, written to OUT.json and OUT.md.

  python bench/accuracy.py --variants "affinequant W4A16g64" "affinequant W4A16g64 rotate=hadamard loss=token" \
      --seeds 0 1 2 --nsamples 32 --epochs 5 --jobs 10 --out bench/results/accuracy_smollm2

A variant is "<mode> <setting> [flag=value ...]": setting as QuantConfig.label writes it (W4A16g64, W4A16, W4A4,
W6A6), flags are aq.calibrate's long options without the dashes (rotate=hadamard, loss=token, sink-weight=4, ...).
Each run's own results.json and log stay under --runs; a run whose results.json exists is not repeated (resume).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def setting_args(setting: str) -> list[str]:
    m = re.fullmatch(r"W(\d)A(\d+)(?:g(\d+))?", setting)
    if not m:
        raise SystemExit(f"error: setting {setting!r} is not of the form W4A16g64 / W4A4")
    w, a, g = m.groups()
    return ["--wbits", w, "--abits", a, "--group-size", g or "none"]


def run_args(variant: str) -> tuple[str, list[str]]:
    mode, setting, *flags = variant.split()
    args = ["--mode", mode, *setting_args(setting)]
    for f in flags:
        k, _, v = f.partition("=")
        args += [f"--{k}"] + ([v] if v else [])
    return re.sub(r"[^\w.=-]+", "_", variant), args


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--epochs", type=int, default=None, help="default: the paper's (20, 40 at 2 bits)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-data", default="wikitext2,c4")
    p.add_argument("--jobs", type=int, default=8, help="calibrations at once")
    p.add_argument("--runs", type=Path, default=Path("runs/accuracy"))
    p.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md are written")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--note", default="", help="a paragraph put under the table (how the runs were made)")
    p.add_argument("--collect-only", action="store_true",
                   help="run nothing: summarize the runs under --runs that finished (e.g. after a time limit)")
    a = p.parse_args(argv)
    a.runs.mkdir(parents=True, exist_ok=True)
    # seed-major: every variant gets its first seed before any gets its second, so a run cut short still compares all
    jobs = [(v, s) for s in a.seeds for v in a.variants]

    def one(job):
        variant, seed = job
        name, args = run_args(variant)
        d = a.runs / f"{name}.s{seed}"
        if (d / "results.json").is_file():
            return job, json.loads((d / "results.json").read_text())
        if a.collect_only:
            return job, None
        cmd = [sys.executable, "-m", "aq.calibrate", "--model", a.model, *args, "--seed", str(seed), "--skip-fp",
               "--nsamples", str(a.nsamples), "--batch-size", str(a.batch_size), "--eval-data", a.eval_data,
               "--no-progress", "--out", str(d)]
        if a.epochs is not None:
            cmd += ["--epochs", str(a.epochs)]  # rtn runs warn that training flags are unused, and go on
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(d / "log.txt", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TQDM_DISABLE": "1"}).returncode
        print(f"{variant} seed {seed}: rc {rc}, {time.time() - t0:.0f}s", flush=True)
        f = d / "results.json"
        return job, (json.loads(f.read_text()) if rc == 0 and f.is_file() else None)

    with ThreadPoolExecutor(a.jobs) as ex:
        done = list(ex.map(one, jobs))
    rows = {}
    sets = [s for s in a.eval_data.split(",") if s]
    for variant in a.variants:
        res = [r for (v, _), r in done if v == variant and r is not None]
        if not res:  # failed (non-zero exit) or, with --collect-only, never finished within its device call
            rows[variant] = {"seeds": 0, "status": "not finished" if a.collect_only else "failed"}
            continue
        row = {"seeds": len(res), "calib_s": statistics.mean(r["quantize_seconds"] for r in res),
               "peak_gib": max((r["peak_gpu_gib"] or 0) for r in res), "gpu": res[0]["gpu"],
               "nsamples": a.nsamples, "epochs": res[0]["epochs"], "batch_size": a.batch_size}
        for s in sets:
            vals = [next(iter(r["perplexity"].values()))[s] for r in res]
            row[s] = {"mean": statistics.mean(vals), "min": min(vals), "max": max(vals), "values": vals}
        rows[variant] = row
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=2))
    lines = ["| variant | seeds | " + " | ".join(f"{s} mean (min-max)" for s in sets) + " | calib s | peak GiB |",
             "|---|---|" + "---|" * len(sets) + "---|---|"]
    for v, r in rows.items():
        if not r["seeds"]:
            lines.append(f"| {v} | 0 ({r['status']}) |" + " |" * (len(sets) + 2))
            continue
        cells = [f"{r[s]['mean']:.2f} ({r[s]['min']:.2f}-{r[s]['max']:.2f})" for s in sets]
        lines.append(f"| {v} | {r['seeds']} | " + " | ".join(cells) + f" | {r['calib_s']:.0f} | {r['peak_gib']:.2f} |")
    gpu = next((r["gpu"] for r in rows.values() if r.get("gpu")), "cpu")
    text = (f"# Accuracy: {a.model}, {gpu}, {time.strftime('%Y-%m-%d')}\n\n{a.nsamples} x 2048 C4 segments, "
            f"batch {a.batch_size}, epochs {a.epochs or 'paper'}, seeds {a.seeds}\n\n" + "\n".join(lines) + "\n"
            + (f"\n{a.note}\n" if a.note else ""))
    a.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
