"""SmolLM2 on the GPU: FP vs W4A16g64 vs W4A4 running on aq's kernels (perplexity + six zero-shot tasks), and the
equivalence of each patched model with the fake-quantized model it was made from.

    python bench/eval_smollm2.py --out bench/results/eval_smollm2                      # RTN models
    python bench/eval_smollm2.py --ckpt-w4a16 runs/aq_w4a16g64 --ckpt-w4a4 runs/aq_w4a4 --out ...   # AffineQuant

Each quantized model is the fake-quantized model (an aq checkpoint from `python -m aq.calibrate --out DIR`, or
round-to-nearest when no checkpoint is given) patched by aq.patch_model; everything runs in bf16 on the GPU.
Equivalence: relative logit error ||patched - fake|| / ||fake|| over the first --logit-windows WikiText-2 windows, and
both models' perplexities. Zero-shot: lm-eval-style log-likelihood scoring, the first --limit examples of each task.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
from pathlib import Path

import torch


from aq import data, eval as aq_eval, models
from aq.calib.rtn import quantize_rtn
from aq.patch import patch_model, patched_summary

PPL = ("wikitext2", "c4")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--ckpt-w4a16", default=None, help="AffineQuant W4A16g64 checkpoint (default: RTN)")
    ap.add_argument("--ckpt-w4a4", default=None, help="AffineQuant W4A4 checkpoint (default: RTN)")
    ap.add_argument("--limit", type=int, default=1000, help="first N examples per zero-shot task")
    ap.add_argument("--logit-windows", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=None, help="perplexity windows per set (default all)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--tasks", default=",".join(data.ZEROSHOT_TASKS))
    ap.add_argument("--out", type=Path, default=None, help="path without suffix: writes .md and .json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--batch-tokens", type=int, default=16384, help="zero-shot tokens per forward")
    ap.add_argument("--skip-fp", action="store_true", help="do not evaluate the FP model")
    args = ap.parse_args()
    dev = args.device
    dtype = getattr(torch, args.dtype)
    zs = [t for t in args.tasks.split(",") if t]
    t0 = time.time()
    fp, tok = models.load_model(args.model, dtype, dev)
    print(f"loaded {args.model} in {time.time() - t0:.0f}s", flush=True)
    wt = data.eval_tokens(tok, "wikitext2")
    res = {"gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "date": str(datetime.date.today()),
           "model": args.model, "dtype": args.dtype, "limit": args.limit,
           "eval_windows": args.eval_windows, "rows": {}, "equivalence": {}}

    def ev(m, label):
        t = time.time()
        r = aq_eval.evaluate(m, tok, list(PPL) + zs, seqlen=args.seqlen, eval_windows=args.eval_windows, ppl_batch=8,
                            limit=args.limit, batch_tokens=args.batch_tokens, label=label)
        r["seconds"] = time.time() - t
        print(label, json.dumps({k: v for k, v in r.items() if k != "zeroshot"}),
              {t_: round(100 * v["acc"], 2) for t_, v in r.get("zeroshot", {}).items()}, flush=True)
        return r

    if not args.skip_fp:
        res["rows"][f"FP ({args.dtype})"] = ev(fp, "FP")
    for setting, ckpt in (("W4A16g64", args.ckpt_w4a16), ("W4A4", args.ckpt_w4a4)):
        try:
            t = time.time()
            if ckpt:
                from aq.checkpoint import load_checkpoint

                fq = load_checkpoint(ckpt, device=dev, dtype=dtype)
                name = f"AffineQuant {setting}"
            else:
                cfg = aq_eval._parse_setting(setting)
                fq = quantize_rtn(copy.deepcopy(fp), cfg)
                name = f"RTN {setting}"
            fq_ppl = aq_eval.perplexities(fq, tok, PPL, args.seqlen, args.eval_windows, 8, f"{name} fake")
            pm = patch_model(copy.deepcopy(fq))
            err = aq_eval.logit_error(fq, pm, wt, args.logit_windows, args.seqlen)
            del fq
            torch.cuda.empty_cache()
            row = ev(pm, f"{name} (aq kernels)")
            res["rows"][f"{name} (aq kernels)"] = row
            res["equivalence"][name] = {"logit_rel_err": err, "fake_quant_ppl": fq_ppl,
                                        "patched_ppl": row["perplexity"], "modules": patched_summary(pm),
                                        "seconds": time.time() - t}
            print(name, res["equivalence"][name], flush=True)
            del pm
            torch.cuda.empty_cache()
        except Exception as e:  # keep the other rows
            import traceback

            traceback.print_exc()
            res["equivalence"][setting] = {"error": f"{type(e).__name__}: {e}"}

    lines = ["# SmolLM2-135M-Instruct: FP vs W4A16g64 vs W4A4 on aq's kernels", "",
             f"{res['gpu']}, {res['date']}, {args.dtype} model (`{args.model}`), perplexity over "
             + (f"the first {args.eval_windows}" if args.eval_windows else "all")
             + f" {args.seqlen}-token windows of WikiText-2 test and held-out C4 (docs 800-999); zero-shot: "
             "lm-eval-style log-likelihood scoring of the "
             f"first {args.limit} examples of each task (acc_norm for PIQA, ARC, HellaSwag; acc for BoolQ, "
             "WinoGrande), in %.", "", aq_eval.format_table(res["rows"]), "",
             f"Equivalence of each patched model with the fake-quantized model it was made from ({args.dtype}): "
             "relative logit "
             f"error ||patched - fake|| / ||fake|| over the first {args.logit_windows} WikiText-2 windows, and "
             "perplexities.", "", "| model | logit rel. err | fake-quant WikiText-2 / C4 | patched WikiText-2 / C4 |",
             "|---|---|---|---|"]
    for name, e in res["equivalence"].items():
        if "error" in e:
            lines.append(f"| {name} | failed: {e['error'][:150]} | | |")
        else:
            f, p = e["fake_quant_ppl"], e["patched_ppl"]
            lines.append(f"| {name} | {e['logit_rel_err']:.2e} | {f['wikitext2']:.2f} / {f['c4']:.2f} | "
                         f"{p['wikitext2']:.2f} / {p['c4']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
        args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
