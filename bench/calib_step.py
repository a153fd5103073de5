"""Time of one calibration training step (aq.calib.step.train_step: refresh, forward, backward, AdamW, dominance
projection) on one decoder layer with random weights, per mode, shape, batch size and step runner (eager or CUDA
graph): wall ms per step and GPU kernel ms per step (torch profiler), kernels per step; optionally the top kernels by
GPU time (--profile) and a check that a whole layer's calibration gives the same result with captured steps as with
eager ones (--check).

    PYTHONPATH=$PWD python bench/calib_step.py --out $OUT [--shape smollm2|llama3-8b|llama3-70b] [--batches 1,4,8]
        [--capture off,graph] [--cases NAME,..] [--profile] [--check]

Steps are timed at the last epoch's mask (the full band: the widest products). Random weights suffice: the step's
cost depends on shapes, not values. Writes calib_step.json / .md under --out (and calib_step_check.json with --check).
Every case runs on its own: an error (out of memory, a failed capture) is recorded in its row and the rest go on.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from aq import models
from aq.calib import loop, pipeline, step
from aq.calib.layer import LayerCalib
from aq.config import QuantConfig
from aq.qmodel import enable_qkv_quant

# decoder shapes (LLaMA family); vocab is irrelevant to a layer's step, so step timing uses a small one
SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
}
SMOLLM2 = SHAPES["smollm2"]
CASES = {
    "omniquant W4A16g64": dict(mode="omniquant", wbits=4, group_size=64),
    "affinequant W4A16g64 (block:64)": dict(mode="affinequant", wbits=4, group_size=64),
    "affinequant W4A16g64 (full)": dict(mode="affinequant", wbits=4, group_size=64, norm_transform="full"),
    "omniquant W4A4": dict(mode="omniquant", wbits=4, abits=4, group_size=None),
    "affinequant W4A4": dict(mode="affinequant", wbits=4, abits=4, group_size=None),
}
STEP_VOCAB = 1024


def layer_model(shape: str, layers: int, dev, dtype=None, vocab: int | None = None):
    """A LLaMA-shaped model with random weights, built on the CPU (seeded) and moved to `dev`, in `dtype`. Not built on
    the GPU: after a failed graph capture the CUDA generator refuses every random op of the process."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    kw = dict(SHAPES[shape])
    if vocab is not None:
        kw["vocab_size"] = vocab
    cfg = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **kw)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    return model.to(device=dev, dtype=dtype or torch.float32).eval()


def one_layer_model(dev, shape: str = "smollm2", dtype=None):
    return layer_model(shape, 1, dev, dtype, vocab=STEP_VOCAB)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _setup(shape, kw, batch, nseg, seqlen, dev):
    """(LayerCalib at the last epoch's mask, layer inputs, FP targets, layer kwargs, resolved config, amp)."""
    dtype = torch.bfloat16 if shape != "smollm2" and dev.type == "cuda" else torch.float32
    model = one_layer_model(dev, shape, dtype)
    cfg = QuantConfig(**kw, batch_size=batch, epochs=20).resolve(model)
    if cfg.abits < 16:
        enable_qkv_quant(model)
    arch, geo = models.arch_of(model), models.geometry(model)
    ids = torch.randint(0, STEP_VOCAB, (nseg, seqlen), generator=torch.Generator().manual_seed(0))
    inps, kws = pipeline.capture(model, ids, 1)
    layer = models.decoder_layers(model)[0]
    fp = inps.clone()
    pipeline.propagate(layer, fp, kws[0], 1)
    calib = LayerCalib(layer, arch, geo, cfg, norm_form=cfg.norm_form, head_affine=cfg.mode == "affinequant",
                       alpha=cfg.alpha_sf, name="layers.0")  # resolved: 0 for omniquant
    calib.set_epoch(cfg.epochs - 1, cfg.epochs)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    return calib, inps, fp, kws[0], cfg, amp


def _runner(calib, kws, cfg, amp, dev, capture: str):
    groups = [{"params": calib.transform_params(), "lr": cfg.lr_transform},
              {"params": calib.clip_params(), "lr": cfg.lr_clip}]
    graphs = step.graphs_for(capture, dev)
    opt = step.make_optimizer([g for g in groups if g["params"]], dev, capturable=graphs is not None)
    return step.StepRunner(calib, opt, kws, cfg, amp, step.Accum(dev), graphs, strict=True)


def time_step(name, kw, batch, nseg, seqlen, dev, shape="smollm2", capture="off", steps=None, profile_top=0):
    """Steady-state step time of one case: warm-up (and capture) first, then `steps` timed steps, then the same
    number under the profiler. Returns a result row (and prints the top kernels when profile_top > 0)."""
    row = {"case": name, "shape": shape, "batch": batch, "capture": capture, "seqlen": seqlen}
    try:
        calib, inps, fp, kws, cfg, amp = _setup(shape, kw, batch, nseg, seqlen, dev)
        runner = _runner(calib, kws, cfg, amp, dev, capture)
        n = steps or max(4, nseg // batch)
        batches = [(inps[s:s + batch], fp[s:s + batch]) for s in range(0, nseg - batch + 1, batch)]
        for i in range(step.GRAPH_WARMUP + 2):  # Triton compilation and autotuning, cuBLAS handles, the capture
            runner(*batches[i % len(batches)])
        _sync(dev)
        t = time.perf_counter()
        for i in range(n):
            runner(*batches[i % len(batches)])
        _sync(dev)
        wall = (time.perf_counter() - t) / n * 1e3
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU]) as prof:
            for i in range(n):
                runner(*batches[i % len(batches)])
            _sync(dev)
        ev = prof.key_averages()
        gpu = sum(e.device_time_total for e in ev) / n / 1e3  # 0 on the CPU (smoke runs only)
        kernels = sum(e.count for e in ev if e.device_time_total > 0) / n
        if dev.type == "cuda" and gpu == 0:  # a profiler that does not trace kernels inside CUDA graphs
            gpu = kernels = None
            row["note"] = "the profiler saw no kernels (inside CUDA graphs): see the eager row's GPU time"
        row.update(wall_ms_per_step=wall, gpu_ms_per_step=gpu, kernels_per_step=kernels,
                   segments_per_s=batch * 1e3 / wall, gpu_ms_per_segment=None if gpu is None else gpu / batch,
                   graph_captures=runner.captures, peak_gpu_gib=_peak_gib(dev))
        if profile_top:
            table = ev.table(sort_by="cuda_time_total" if dev.type == "cuda" else "cpu_time_total",
                             row_limit=profile_top)
            print(f"--- {shape} {name} batch {batch} ({capture}): top {profile_top} kernels over {n} steps ---\n"
                  f"{table}", flush=True)
            row["profile_top"] = [{"name": e.key, "gpu_ms_per_step": e.device_time_total / n / 1e3,
                                   "calls_per_step": e.count / n}
                                  for e in sorted(ev, key=lambda e: -e.device_time_total)[:profile_top]]
    except Exception as e:  # noqa: BLE001 -- recorded in the row; the other cases still run
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _peak_gib(dev):
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None


def check_capture(dev, shape="smollm2", kw=None, nseg=16, seqlen=512, epochs=2, batch=1) -> dict:
    """One layer calibrated three times (eager, eager again, captured steps): the relative difference of the merged
    weights and of the last epoch's loss, captured vs eager next to eager vs eager (the GPU's own run-to-run noise,
    e.g. atomics in attention's backward). The captured run's optimizer is capturable AdamW (step counts on the
    device), which rounds the bias correction differently, so captured vs eager may differ where eager vs eager does
    not. Passes when graphs were captured and the loss differs by at most max(10x the noise, 1e-3) relative."""
    kw = kw or CASES["affinequant W4A16g64 (block:64)"]
    results = {}
    for label, cap in (("eager", "off"), ("eager again", "off"), ("graph", "graph")):
        model = one_layer_model(dev, shape)
        ids = torch.randint(0, STEP_VOCAB, (nseg, seqlen), generator=torch.Generator().manual_seed(0))
        cfg = QuantConfig(**kw, epochs=epochs, batch_size=batch)
        info = loop.calibrate(model, ids, cfg, amp=torch.bfloat16 if dev.type == "cuda" else None, batch=4,
                              progress=False, say=lambda s: None, step_capture=cap)
        state = {k: v.detach().float().cpu() for k, v in models.decoder_layers(model)[0].state_dict().items()
                 if v.is_floating_point()}
        results[label] = (state, info["layers"][0])

    def rel(a, b):
        return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30)) for k in b)

    ref, ref_log = results["eager"]
    noise = rel(results["eager again"][0], ref)
    diff = rel(results["graph"][0], ref)
    out = {"shape": shape, "segments": nseg, "seqlen": seqlen, "epochs": epochs,
           "weights_rel_diff_graph_vs_eager": diff, "weights_rel_diff_eager_vs_eager": noise,
           "loss_eager": ref_log["loss"], "loss_eager_again": results["eager again"][1]["loss"],
           "loss_graph": results["graph"][1]["loss"], "graph_captures": results["graph"][1]["graph_captures"],
           "graph_replays": results["graph"][1]["graph_replays"]}
    def lrel(a):
        return abs(a - ref_log["loss"]) / abs(ref_log["loss"])

    out["loss_rel_diff_graph_vs_eager"] = lrel(out["loss_graph"])
    out["loss_rel_diff_eager_vs_eager"] = lrel(out["loss_eager_again"])
    out["pass"] = bool(out["graph_captures"] > 0 and out["loss_rel_diff_graph_vs_eager"]
                       <= max(10 * out["loss_rel_diff_eager_vs_eager"], 1e-3))
    return out


def table(rows, title: str) -> str:
    lines = [title, "", "| shape | case | batch | runner | wall ms / step | GPU ms / step | kernels / step "
             "| segments / s | peak GPU GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['case']} | {r['batch']} | {r['capture']} | error: {r['error'][:120]} "
                         "| | | | |")
            continue
        pk = "" if r.get("peak_gpu_gib") is None else f"{r['peak_gpu_gib']:.1f}"
        gpu = "" if r["gpu_ms_per_step"] is None else f"{r['gpu_ms_per_step']:.2f}"
        kern = "" if r["kernels_per_step"] is None else f"{r['kernels_per_step']:.0f}"
        lines.append(f"| {r['shape']} | {r['case']} | {r['batch']} | {r['capture']} | {r['wall_ms_per_step']:.2f} | "
                     f"{gpu} | {kern} | {r['segments_per_s']:.1f} | {pk} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="smollm2", choices=tuple(SHAPES))
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--capture", default="off,graph", help="step runners to time: off (eager), graph (CUDA graph)")
    ap.add_argument("--segments", type=int, default=16, help="distinct segments cycled through by the timed steps")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default segments / batch, >= 4)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--cases", default="", help="comma-separated case names (default all)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N kernels by GPU time per case")
    ap.add_argument("--check", action="store_true", help="also check one layer's calibration: captured vs eager")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("highest")  # what aq.calibrate runs with (torch's default)
    args.out.mkdir(parents=True, exist_ok=True)
    names = [c for c in args.cases.split(",") if c] or list(CASES)
    for n in names:
        if n not in CASES:
            sys.exit(f"unknown case {n!r}: choose from {', '.join(CASES)}")
    captures = [c for c in args.capture.split(",") if c]
    if dev.type != "cuda":
        captures = [c for c in captures if c != "graph"] or ["off"]  # no CUDA graphs on a CPU
    rows = []
    for name in names:
        for b in [int(x) for x in args.batches.split(",")]:
            for cap in captures:
                r = time_step(name, CASES[name], b, args.segments, args.seqlen, dev, args.shape, cap, args.steps,
                              args.profile)
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "profile_top"}), flush=True)
    gpu_name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke run, no GPU numbers)"
    text = table(rows, f"# Calibration step time, one {args.shape}-shaped layer ({gpu_name}, torch {torch.__version__})"
                       f"\n\n{args.seqlen} tokens per segment, bf16 autocast, single process, full-band mask; "
                       "steps: off = eager, graph = CUDA-graph replays.")
    out = {"gpu": gpu_name, "rows": rows}
    if args.check:
        out["check"] = check_capture(dev) if dev.type == "cuda" else {"skipped": "no CUDA device"}
        print(json.dumps(out["check"]), flush=True)
        text += f"\nCaptured vs eager, one layer calibrated: {json.dumps(out['check'])}\n"
    (args.out / "calib_step.md").write_text(text)
    (args.out / "calib_step.json").write_text(json.dumps(out, indent=1))
    print(text)


if __name__ == "__main__":
    main()
