"""Time of one calibration training step (aq.calib.loop._train: refresh, forward, backward, AdamW, dominance
projection) on one SmolLM2-shaped decoder layer with random weights, per mode and batch size: wall ms per step and
GPU kernel ms per step (torch profiler), hence the segments per second one process reaches and the GPU time a
whole calibration table needs.

    python bench/calib_step.py --out $OUT [--batches 1,4,8]

Random weights suffice: the step's cost depends on shapes, not values. Writes calib_step.json / .md under --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aq import models  # noqa: E402
from aq.calib import loop  # noqa: E402
from aq.qmodel import enable_qkv_quant  # noqa: E402
from aq.calib.layer import LayerCalib  # noqa: E402
from aq.config import QuantConfig  # noqa: E402

# SmolLM2-135M-Instruct's shapes (hidden 576, FFN 1536, 9 query / 3 key-value heads of 64)
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)
CASES = {
    "omniquant W4A16g64": dict(mode="omniquant", wbits=4, group_size=64),
    "affinequant W4A16g64 (block:64)": dict(mode="affinequant", wbits=4, group_size=64),
    "affinequant W4A16g64 (full)": dict(mode="affinequant", wbits=4, group_size=64, norm_transform="full"),
    "omniquant W4A4": dict(mode="omniquant", wbits=4, abits=4, group_size=None),
    "affinequant W4A4": dict(mode="affinequant", wbits=4, abits=4, group_size=None),
}


def one_layer_model(dev):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=1, **SMOLLM2)
    return LlamaForCausalLM(cfg).to(dev).eval()


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_case(name, kw, batch, nseg, seqlen, dev):
    model = one_layer_model(dev)
    cfg = QuantConfig(**kw, batch_size=batch, epochs=2)
    if cfg.abits < 16:
        enable_qkv_quant(model)
    arch, geo = models.arch_of(model), models.geometry(model)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (nseg, seqlen), generator=torch.Generator().manual_seed(0))
    inps, kws = loop.capture(model, ids, 8)
    layer = models.decoder_layers(model)[0]
    fp = inps.clone()
    loop.propagate(layer, fp, kws[0], 8)
    calib = LayerCalib(layer, arch, geo, cfg, norm_form=cfg.norm_form, head_affine=cfg.mode == "affinequant",
                       alpha=0.1, name="layers.0")
    log = loop.LayerLog(index=0)
    gen = torch.Generator().manual_seed(0)

    def epoch():
        amp = torch.bfloat16 if dev.type == "cuda" else None
        return loop._train(calib, inps, fp, kws[0], cfg, 1, 1.0, gen, amp, "", False, log)

    epoch()  # warm-up: Triton compilation, cuBLAS handles
    _sync(dev)
    steps0, t = log.steps, time.perf_counter()
    epoch()
    _sync(dev)
    wall = (time.perf_counter() - t) / (log.steps - steps0) * 1e3
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU]) as prof:
        steps0 = log.steps
        epoch()
        _sync(dev)
    n = log.steps - steps0
    ev = prof.key_averages()
    gpu = sum(e.device_time_total for e in ev) / n / 1e3  # 0 on the CPU (smoke runs only)
    kernels = sum(e.count for e in ev if e.device_time_total > 0) / n
    return {"case": name, "batch": batch, "wall_ms_per_step": wall, "gpu_ms_per_step": gpu,
            "kernels_per_step": kernels, "segments_per_s": batch * 1e3 / wall, "gpu_ms_per_segment": gpu / batch}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--segments", type=int, default=16, help="segments per timed epoch")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--cases", default="", help="comma-separated case names (default all)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    names = [c for c in args.cases.split(",") if c] or list(CASES)
    rows = []
    for name in names:
        for b in [int(x) for x in args.batches.split(",")]:
            r = time_case(name, CASES[name], b, args.segments, args.seqlen, dev)
            rows.append(r)
            print(json.dumps(r), flush=True)
    gpu_name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke run, no GPU numbers)"
    lines = [f"# Calibration step time, one SmolLM2-shaped layer ({gpu_name}, torch {torch.__version__})", "",
             f"{args.segments} segments x {args.seqlen} tokens per timed epoch, bf16 autocast, single process.", "",
             "| case | batch | wall ms / step | GPU ms / step | kernels / step | segments / s | GPU ms / segment |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['batch']} | {r['wall_ms_per_step']:.2f} | {r['gpu_ms_per_step']:.2f} | "
                     f"{r['kernels_per_step']:.0f} | {r['segments_per_s']:.0f} | {r['gpu_ms_per_segment']:.2f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "calib_step.md").write_text(text)
    (args.out / "calib_step.json").write_text(json.dumps({"gpu": gpu_name, "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
