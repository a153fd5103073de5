"""The GPU check of the compressed-tensors export (issue 14): SmolLM2 W4A16g64 calibrated with the exportable norm
transform (`--norm-transform diagonal`), exported, loaded through plain transformers, and its WikiText-2 perplexity
compared with aq's own checkpoint evaluated by aq (target: within +-0.05).

    PYTHONPATH=$PWD AQ_DATA_DIR=/path/to/data python bench/export_check.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out $OUT [--checkpoint DIR] [--nsamples 32 --epochs 2 --batch-size 4] [--eval-windows N]

Without --checkpoint it calibrates first (python -m aq.calibrate, in this process, on a short schedule: the check is
about the export being the same model, not about the calibration's quality) into --work/ckpt, exporting with
--export-format. With --checkpoint it exports that checkpoint (it must be exportable: see docs/export.md). Both
models are evaluated in float32 on the same tokens (the checkpoint's tokenizer; the export's is checked to give the
same ids); the bfloat16 export (`--dtype bfloat16`: scales rounded for serving) is evaluated too, for information.
Writes export_check.json under --out. Needs no network: the GGUF, $AQ_DATA_DIR and the compressed-tensors wheels.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.05  # WikiText-2 perplexity, export vs aq's checkpoint (issue 14)


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="the SmolLM2 GGUF (or anything aq.calibrate's --model takes)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="an exportable aq checkpoint (default: calibrate)")
    ap.add_argument("--out", type=Path, required=True, help="folder for export_check.json")
    ap.add_argument("--work", type=Path, default=Path("/tmp/aq-export-check"), help="checkpoint and export folders")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=None, help="calibration segment length (default: aq.calibrate's, "
                                                              "2048; shorter only for a CPU smoke run)")
    ap.add_argument("--eval-windows", type=int, default=None, help="first N 2048-token windows (default: all)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aq import calibrate, data, eval as aq_eval
    from aq.checkpoint import load_checkpoint, read_manifest
    from aq.export import export

    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    ct, ct16 = args.work / "compressed-tensors", args.work / "compressed-tensors-bf16"
    t0 = time.time()
    if args.checkpoint is None:
        ckpt = args.work / "ckpt"
        log(f"calibrating {args.model} W4A16g64, --norm-transform diagonal, {args.nsamples} segments, "
            f"{args.epochs} epochs")
        calibrate.main(["--model", args.model, "--wbits", "4", "--group-size", "64", "--norm-transform", "diagonal",
                        "--nsamples", str(args.nsamples), "--epochs", str(args.epochs),
                        "--batch-size", str(args.batch_size), "--eval-data", "wikitext2", "--eval-windows", "1",
                        *(["--seqlen", str(args.seqlen)] if args.seqlen else []),
                        "--skip-fp", "--no-progress", "--device", args.device, "--out", str(ckpt),
                        "--export-format", "compressed-tensors", "--export-out", str(ct)])
    else:
        ckpt = args.checkpoint
        export(ckpt, ct, say=log)
    calib_s = time.time() - t0
    export(ckpt, ct16, dtype="bfloat16", say=log)

    tok = AutoTokenizer.from_pretrained(ckpt)
    tokens = data.eval_tokens(tok, "wikitext2")
    same_ids = torch.equal(data.eval_tokens(AutoTokenizer.from_pretrained(ct), "wikitext2"), tokens)
    window = tokens[:2048].view(1, -1)

    def measure(model, name):
        t = time.time()
        with torch.no_grad():
            logits = model(window.to(args.device), use_cache=False).logits.float().cpu()
        ppl = aq_eval.perplexity(model, tokens, 2048, args.eval_windows, 8, desc=name)
        log(f"{name}: WikiText-2 {ppl:.4f} ({time.time() - t:.1f}s)")
        return ppl, logits

    aq_model = load_checkpoint(ckpt, device=args.device)  # aq's fake-quantized model, float32 (as calibrated)
    ppl_aq, ref = measure(aq_model, "aq checkpoint")
    del aq_model
    hf = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32).to(args.device).eval()
    ppl_hf, got = measure(hf, "export via transformers")
    del hf
    hf16 = AutoModelForCausalLM.from_pretrained(ct16, dtype=torch.bfloat16).to(args.device).eval()
    ppl_hf16, got16 = measure(hf16, "bf16 export via transformers")
    del hf16

    import compressed_tensors
    import transformers

    rel = lambda a: ((a - ref).norm() / ref.norm()).item()  # noqa: E731
    man = read_manifest(ckpt)
    result = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "compressed_tensors": compressed_tensors.__version__},
        "model": args.model, "checkpoint": str(ckpt) if args.checkpoint else "calibrated here",
        "quant_config": man["quant_config"],
        "schedule": None if args.checkpoint else {"nsamples": args.nsamples, "epochs": args.epochs,
                                                  "batch_size": args.batch_size, "seqlen": args.seqlen or 2048},
        "eval_windows": args.eval_windows, "tokenizer_ids_equal": same_ids,
        "wikitext2": {"aq_checkpoint": ppl_aq, "export_fp32": ppl_hf, "export_bf16": ppl_hf16},
        "difference_fp32": ppl_hf - ppl_aq, "tolerance": TOLERANCE,
        "within_tolerance": abs(ppl_hf - ppl_aq) <= TOLERANCE and same_ids,
        "first_window_logits_rel_err": {"export_fp32": rel(got), "export_bf16": rel(got16)},
        "calibrate_and_export_seconds": calib_s,
    }
    (args.out / "export_check.json").write_text(json.dumps(result, indent=2))
    log(f"aq {ppl_aq:.4f}, export {ppl_hf:.4f} (difference {ppl_hf - ppl_aq:+.4f}, tolerance {TOLERANCE}), bf16 "
        f"export {ppl_hf16:.4f}; logits rel. err. {rel(got):.2e}: "
        + ("PASS" if result["within_tolerance"] else "FAIL"))
    sys.exit(0 if result["within_tolerance"] else 1)


if __name__ == "__main__":
    main()
