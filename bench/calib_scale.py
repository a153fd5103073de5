"""Calibration speed and memory at SmolLM2, LLaMA-3-8B and LLaMA-3-70B shapes on one GPU (issue 13).

    PYTHONPATH=$PWD python bench/calib_scale.py --out $OUT --model /path/to/smollm2.gguf [--budget-s 480] [--quick]
        [--profile] [--cases NAME,..] [--layers K] [--nsamples N] [--epochs E]

Per case (random bf16 weights of the stated shape; SmolLM2 in float32 as the CLI loads it):
  - step: wall and GPU ms of one training step at the full-band mask, batch 1 x 2048 tokens, with the step runner
    aq.calibrate uses on a GPU (CUDA graph) and eagerly (bench/calib_step.time_step);
  - layers: a model of the shape built on the CPU (all its layers, so the host-memory figure is the real one; the
    70B case holds one layer), K layers calibrated end to end with layer streaming (model on the CPU, one layer on
    the GPU) on N random segments x 2048 tokens for E epochs; s_per_layer extrapolates the measured layer time to
    the paper's schedule (128 segments, 20 epochs): the training time scales with epochs x segments, the rest
    (propagation, probes, merge) with segments;
  - "smollm2 default cli": the whole `python -m aq.calibrate --model PATH --no-progress` with its defaults (seconds),
    killed when its share of the budget runs out and then extrapolated from its per-layer log lines (marked so).
--budget-s: the whole script's wall-time limit; each phase takes a share and shrinks N / E (or skips a measurement,
saying so) to stay inside it. --quick: a short smoke (few layers, 16 segments, 1 epoch). --profile: print the top 15
kernels by GPU time of the 8B-shaped AffineQuant step (eager) and store them in the JSON.
Writes calib_speed.md and calib_speed.json under --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from aq import models
from aq.calib import loop
from aq.config import QuantConfig
from bench.calib_step import SHAPES, check_capture, time_step

ROOT = Path(__file__).resolve().parents[1]  # the repository (the CLI subprocess runs there)

W4G64 = dict(mode="affinequant", wbits=4, group_size=64)
CASES = {  # name -> (shape, config, layers of the CPU model)
    "smollm2 affinequant W4A16g64 b1": ("smollm2", W4G64, 30),
    "smollm2 omniquant W4A16g64 b1": ("smollm2", dict(W4G64, mode="omniquant"), 30),
    "llama3-8b affinequant W4A16g64 b1": ("llama3-8b", W4G64, 32),
    "llama3-8b omniquant W4A16g64 b1": ("llama3-8b", dict(W4G64, mode="omniquant"), 32),
    "llama3-8b affinequant W4A4 b1": ("llama3-8b", dict(mode="affinequant", wbits=4, abits=4, group_size=None), 32),
    "llama3-70b-layer affinequant W4A16g64 b1": ("llama3-70b", W4G64, 1),
}
CLI_CASE = "smollm2 default cli"
FULL_LAYERS = {"smollm2": 30, "llama3-8b": 32, "llama3-70b": 80}
PAPER_SEGMENTS, PAPER_EPOCHS, SEQLEN = 128, 20, 2048


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.total = time.monotonic(), seconds

    def left(self) -> float:
        return self.total - (time.monotonic() - self.t0)


def host_peak_gib() -> float:
    """Peak resident memory of this process since the last reset_host_peak (Linux: VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux; never reset


def reset_host_peak() -> None:
    """Reset the peak-RSS mark (Linux: writing 5 to /proc/self/clear_refs), so each shape's figure is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def cpu_model(shape: str, layers: int, dtype: torch.dtype, fill_dev: torch.device):
    """A LLaMA-shaped model in CPU memory with random weights (N(0, 0.02), norms 1), built without the slow default
    initialisation: allocated empty, filled from random tensors drawn on fill_dev (a GPU draws 16 GB in seconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **SHAPES[shape])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)  # on meta: no memory yet, then allocated once in dtype
    model = model.to_empty(device="cpu")
    g = torch.Generator(device=fill_dev).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=fill_dev, dtype=dtype).mul_(0.02))
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # its buffers were left empty
    return model.eval()


def layer_run(model, kw: dict, k: int, nseg: int, epochs: int, dev: torch.device, seqlen: int = SEQLEN,
              buffers: str = "auto") -> dict:
    """Calibrate the first k layers of a CPU-resident model, streamed to dev; the model's FP layers are restored
    afterwards (so the next case starts from the same model)."""
    layers = models.decoder_layers(model)
    saved, impl = list(layers), model.config._attn_implementation
    ids = torch.randint(0, model.config.vocab_size, (nseg, seqlen), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(**kw, epochs=epochs, nsamples=nseg, seqlen=seqlen, batch_size=1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        info = loop.calibrate(model, ids, cfg, amp=torch.bfloat16 if dev.type == "cuda" else None,
                              batch=1 if dev.type == "cpu" else 8, progress=False, say=print, device=dev,
                              max_layers=k, buffers=buffers)
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer
        model.config._attn_implementation = impl
    wall = time.perf_counter() - t
    # per-layer figures from the layers after the first where there are any: the first pays the process's one-off
    # Triton compilation and autotuning (seconds), which a real run pays once, not per layer
    logs = info["layers"][1:] or info["layers"]
    first_s = info["layers"][0]["seconds"]
    train = sum(r["train_seconds"] for r in logs) / len(logs)
    other = sum(r["seconds"] - r["train_seconds"] for r in logs) / len(logs)
    steps = sum(r["steps"] for r in logs) / len(logs)
    scale_train = PAPER_EPOCHS * PAPER_SEGMENTS / (epochs * nseg)
    return {"layers_calibrated": k, "segments": nseg, "epochs": epochs, "run_seconds": wall, "buffers": buffers,
            "measured_s_per_layer": train + other, "first_layer_s": first_s, "layers_averaged": len(logs),
            "train_s_per_layer": train, "other_s_per_layer": other,
            "steps_per_layer": steps, "run_ms_per_step": train / max(steps, 1) * 1e3,
            "s_per_layer": train * scale_train + other * PAPER_SEGMENTS / nseg,
            "graph_captures_per_layer": sum(r["graph_captures"] for r in logs) / len(logs),
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
            "peak_host_gib": host_peak_gib(), "layer_losses": [r["loss"] for r in info["layers"]]}


def plan_run(step_ms: float | None, seconds: float, quick: bool, nsamples: int | None, epochs: int | None):
    """(segments, epochs) of a layer run that should take about `seconds` per layer (None: it does not fit)."""
    nseg, ep = (16, 1) if quick else (PAPER_SEGMENTS, 2)
    if nsamples or epochs:
        return nsamples or nseg, epochs or ep
    if step_ms is None:  # the step timing failed: the smallest run
        return 16, 1

    def fits(n, e):
        return n * e * step_ms * 1.5e-3 + 10 <= seconds

    while not fits(nseg, ep):
        if ep > 1:
            ep -= 1
        elif nseg > 16:
            nseg = max(16, nseg // 2)
        else:
            return None
    return nseg, ep


def run_cli(model_path: str, timeout: float) -> dict:
    """The default command line on the GPU, its lines time-stamped as they come; killed after `timeout` s."""
    cmd = [sys.executable, "-m", "aq.calibrate", "--model", model_path, "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines: list[tuple[float, str]] = []

    def reader():
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line.rstrip()))
            print("  cli| " + line.rstrip(), flush=True)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        proc.wait(timeout=max(timeout, 1))
        killed = False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        killed = True
    th.join(timeout=5)
    row = parse_cli(lines, killed, proc.returncode, time.monotonic() - t0)
    row.update(command=" ".join(cmd[1:]), killed_after_s=timeout if killed else None)
    return row


def parse_cli(lines: list[tuple[float, str]], killed: bool, returncode: int | None, wall: float) -> dict:
    """The CLI case's row from its time-stamped output lines: per-layer seconds, peak memory, the perplexity table;
    a killed run's total extrapolated as start-up + FP evaluation + layers x mean layer time + one more evaluation."""
    layer_s = [float(m.group(3)) for _, ln in lines
               if (m := re.match(r"layer (\d+)/(\d+): loss .* steps, ([\d.]+)s", ln))]
    n_layers = next((int(m.group(2)) for _, ln in lines if (m := re.match(r"layer (\d+)/(\d+)", ln))), None)
    t_loaded = next((t for t, ln in lines if ln.startswith("loaded ")), None)
    t_intro = next((t for t, ln in lines if ln.startswith("calibrating ")), None)
    peak = next((float(m.group(1)) for _, ln in lines if (m := re.search(r"peak GPU memory ([\d.]+) GiB", ln))), None)
    qtime = next((float(m.group(1)) for _, ln in lines
                  if (m := re.match(r"(?:affinequant|omniquant) \S+: ([\d.]+)s", ln))), None)
    ppl = {}
    for _, ln in lines:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if ln.startswith("| ") and len(cells) >= 2 and all(re.fullmatch(r"[\d.]+|nan|inf", c) for c in cells[1:]):
            ppl[cells[0]] = [float(c) for c in cells[1:]]
    row = {"returncode": None if killed else returncode, "layers_done": len(layer_s), "n_layers": n_layers,
           "s_per_layer": sum(layer_s) / len(layer_s) if layer_s else None, "peak_gpu_gib": peak,
           "perplexity": ppl or None, "wall_ms_per_step": None, "gpu_ms_per_step": None, "peak_host_gib": None,
           "tail": [ln for _, ln in lines[-25:]]}
    if not killed and returncode == 0:
        row.update(seconds=wall, calib_seconds=qtime, extrapolated=False)
    elif layer_s and n_layers and t_intro is not None:
        fp_eval = (t_intro - t_loaded) if t_loaded is not None else 0.0  # the quantized evaluation takes as long
        calib = n_layers * row["s_per_layer"]
        row.update(seconds=t_intro + calib + fp_eval, calib_seconds=calib, extrapolated=True)
    else:
        row.update(seconds=None, calib_seconds=None, extrapolated=False,
                   error="the run ended before a layer finished" + ("" if killed else f" (exit {returncode})"))
    return row


def fmt(v, f="{:.2f}"):
    return "" if v is None else f.format(v)


def _both(r: dict, key: str) -> str:
    """The row's value with the eager one in brackets, where measured."""
    eager = r.get("eager_" + key)
    return fmt(r.get(key)) + ("" if eager is None else f" ({fmt(eager)})")


def write(out: Path, gpu: str, rows: dict, settings: dict, notes: list[str], check: dict | None = None) -> None:
    (out / "calib_speed.json").write_text(json.dumps({"gpu": gpu, "rows": rows, "settings": settings,
                                                       "notes": notes, "check": check}, indent=1))
    lines = [f"# Calibration speed and memory ({gpu}, torch {torch.__version__})", "",
             "Batch 1 x 2048 tokens per step, bf16 autocast. Step: full-band mask, the runner aq.calibrate uses "
             "(CUDA graph on a GPU; eager in brackets). s / layer: the paper's schedule (128 segments, 20 epochs), "
             "extrapolated from the layer run stated in its row (layer streaming: model on the CPU). Whole model: "
             "s / layer x layers (30 / 32 / 80).", "",
             "| case | wall ms / step | GPU ms / step | s / layer | whole model | peak GPU GiB | peak host GiB | "
             "layer run |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if name == CLI_CASE:
            sec = r.get("seconds")
            what = (f"{fmt(sec, '{:.0f}')} s" + (" (extrapolated from "
                    f"{r['layers_done']}/{r['n_layers']} layers)" if r.get("extrapolated") else "")) if sec else \
                r.get("error", "")
            lines.append(f"| {name} | | | {fmt(r.get('s_per_layer'), '{:.1f}')} | {what} | "
                         f"{fmt(r.get('peak_gpu_gib'))} | | whole CLI run |")
            continue
        step = _both(r, "wall_ms_per_step") if r.get("wall_ms_per_step") is not None else r.get("step_error", "")[:80]
        gpu_ms = _both(r, "gpu_ms_per_step")
        run = (f"{r['layers_calibrated']} layers x {r['segments']} seg x {r['epochs']} ep, streams: {r['buffers']}, "
               f"{r['run_seconds']:.0f}s"
               if "run_seconds" in r else r.get("run_error", "not run")[:100])
        whole = r.get("s_per_layer")
        lines.append(f"| {name} | {step} | {gpu_ms} | {fmt(whole, '{:.1f}')} | "
                     f"{fmt(None if whole is None else whole * r['full_layers'] / 60, '{:.1f} min')} | "
                     f"{fmt(r.get('peak_gpu_gib'))} | {fmt(r.get('peak_host_gib'))} | {run} |")
    if check is not None:
        lines += ["", f"Captured vs eager steps, one SmolLM2-shaped layer calibrated (check): {json.dumps(check)}"]
    lines += [""] + [f"- {n}" for n in notes]
    (out / "calib_speed.md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="the SmolLM2 model for the default-CLI case")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-time limit of the whole script")
    ap.add_argument("--quick", action="store_true", help="smoke: few layers, 16 segments, 1 epoch")
    ap.add_argument("--profile", action="store_true", help="top 15 kernels of the 8B-shaped AffineQuant step")
    ap.add_argument("--cases", default="", help=f"comma-separated subset of: {', '.join(list(CASES) + [CLI_CASE])}")
    ap.add_argument("--layers", type=int, default=None, help="layers calibrated per case (default 2, 70B: 1)")
    ap.add_argument("--nsamples", type=int, default=None, help="segments of each layer run (default by budget)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of each layer run (default by budget)")
    ap.add_argument("--cli-share", type=float, default=0.4, help="share of the budget for the default-CLI case")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager step timings")
    ap.add_argument("--buffers-70b", default="cpu", choices=("auto", "device", "cpu"),
                    help="where the 70B layer run keeps its activation streams")
    ap.add_argument("--no-check", action="store_true", help="skip the captured-vs-eager check of one layer")
    args = ap.parse_args()
    budget = Budget(args.budget_s)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke run, no GPU numbers)"
    args.out.mkdir(parents=True, exist_ok=True)
    names = [c for c in args.cases.split(",") if c] or list(CASES) + [CLI_CASE]
    for n in names:
        if n not in CASES and n != CLI_CASE:
            sys.exit(f"unknown case {n!r}: choose from {', '.join(list(CASES) + [CLI_CASE])}")
    runner = "graph" if dev.type == "cuda" else "off"
    seqlen = SEQLEN if dev.type == "cuda" else 64  # CPU smoke runs only
    settings = {"budget_s": args.budget_s, "quick": args.quick, "step_runner": runner, "seqlen": seqlen}
    notes: list[str] = []
    rows: dict[str, dict] = {}
    cli_budget = args.cli_share * args.budget_s if CLI_CASE in names else 0.0
    model_cases = [n for n in names if n in CASES]

    # 0. captured steps give the eager result (one small layer, three short calibrations)
    check = None
    if dev.type == "cuda" and not args.no_check:
        try:
            check = check_capture(dev)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            check = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps({"check": check}), flush=True)

    # 1. step timings (cheap; they size the layer runs)
    for name in model_cases:
        shape, kw, full = CASES[name]
        row = rows[name] = {"shape": shape, "full_layers": FULL_LAYERS[shape]}
        if budget.left() < cli_budget + 30:
            row["step_error"] = "skipped: budget"
            continue
        top = 15 if args.profile and name == "llama3-8b affinequant W4A16g64 b1" else 0
        variants = [runner] + ([] if args.no_eager or args.quick or runner == "off" else ["off"])
        if top and "off" not in variants:
            variants.append("off")
        for cap in variants:
            r = time_step(name, kw, 1, 8 if dev.type == "cuda" else 2, seqlen, dev, shape, cap, None,
                          top if cap == "off" else 0)
            print(json.dumps({k: v for k, v in r.items() if k != "profile_top"}), flush=True)
            pre = "" if cap == runner else "eager_"
            if "error" in r:
                row[pre + "step_error"] = r["error"]
                continue
            row[pre + "wall_ms_per_step"], row[pre + "gpu_ms_per_step"] = r["wall_ms_per_step"], r["gpu_ms_per_step"]
            row[pre + "kernels_per_step"] = r["kernels_per_step"]
            if "profile_top" in r:
                row["profile_top_eager"] = r["profile_top"]
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        write(args.out, gpu, rows, settings, notes, check)

    # 2. layer runs with streaming, one CPU model per shape
    by_shape: dict[str, list[str]] = {}
    for name in model_cases:
        by_shape.setdefault(CASES[name][0], []).append(name)
    runs_left = len(model_cases)
    for shape, cases in by_shape.items():
        if budget.left() < cli_budget + 30:
            for name in cases:
                rows[name]["run_error"] = "skipped: budget"
            continue
        full = CASES[cases[0]][2]
        n_model = min(full, 4) if args.quick and full > 1 else full
        t = time.perf_counter()
        gc.collect()
        reset_host_peak()
        try:
            dtype = torch.float32 if shape == "smollm2" else torch.bfloat16
            model = cpu_model(shape, n_model, dtype, dev)
        except Exception as e:  # noqa: BLE001 -- recorded; the other shapes still run
            traceback.print_exc()
            for name in cases:
                rows[name]["run_error"] = f"model build failed: {type(e).__name__}: {e}"
            continue
        print(f"{shape}: {n_model}-layer CPU model built in {time.perf_counter() - t:.1f}s", flush=True)
        for name in cases:
            _, kw, _ = CASES[name]
            row = rows[name]
            k = args.layers or (1 if shape == "llama3-70b" else 2)
            k = min(k, n_model)
            share = (budget.left() - cli_budget - 10) / max(runs_left, 1)
            runs_left -= 1
            step_ms = row.get("wall_ms_per_step") or row.get("eager_wall_ms_per_step")
            plan = plan_run(step_ms, share / k, args.quick, args.nsamples, args.epochs)
            if plan is None:
                row["run_error"] = f"skipped: a layer run does not fit its budget share ({share:.0f}s)"
                continue
            try:
                # 70B: the activation streams (17 GB at 128 x 2048) in pinned CPU memory, for the <= 40 GB target
                buffers = args.buffers_70b if shape == "llama3-70b" else "auto"
                row.update(layer_run(model, kw, k, plan[0], plan[1], dev, seqlen, buffers))
                row["model_layers_on_cpu"] = n_model
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row["run_error"] = f"{type(e).__name__}: {e}"
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps({name: row}, default=str), flush=True)
            write(args.out, gpu, rows, settings, notes, check)
        del model
        gc.collect()

    # 3. the default command line
    if CLI_CASE in names:
        if dev.type != "cuda":
            rows[CLI_CASE] = {"error": "skipped: no GPU", "seconds": None}
        else:
            gc.collect()
            torch.cuda.empty_cache()  # the CLI runs in its own process on the same GPU
            timeout = budget.left() - 15
            rows[CLI_CASE] = run_cli(args.model, timeout) if timeout > 30 else {"error": "skipped: budget",
                                                                                 "seconds": None}
    for name, r in rows.items():
        if name != CLI_CASE and r.get("s_per_layer") is not None:
            notes.append(f"{name}: {r['s_per_layer']:.1f} s/layer -> {r['s_per_layer'] * r['full_layers'] / 60:.1f} "
                         f"min for {r['full_layers']} layers (paper schedule), peak GPU {fmt(r.get('peak_gpu_gib'))} "
                         f"GiB")
    notes.append(f"script wall time {args.budget_s - budget.left():.0f}s of a {args.budget_s:.0f}s budget")
    write(args.out, gpu, rows, settings, notes, check)
    print((args.out / "calib_speed.md").read_text())


if __name__ == "__main__":
    main()
