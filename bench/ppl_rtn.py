"""RTN perplexity table: FP and round-to-nearest settings of one model, loaded once.

    python bench/ppl_rtn.py --model smollm2 --out bench/results/ppl_rtn_smollm2.md

Protocol (matches the H100 baseline measured for the project): fp32 model; every nn.Linear but lm_head quantized;
weights asymmetric min-max with the range extended to include 0, per group or per output channel; weight-activation
settings quantize each such linear's input per token with the same scheme; WikiText-2 test and held-out C4
(docs 800..999) perplexity over non-overlapping 2048-token windows.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
from pathlib import Path

import torch

from aq import eval as aq_eval, models
from aq.calib.rtn import quantize_rtn
from aq.config import QuantConfig

# (wbits, abits, group): the rows of the project's RTN baseline
SETTINGS = [(4, 16, 64), (4, 16, None), (3, 16, 64), (2, 16, 64), (6, 6, None), (4, 4, None)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval-windows", type=int, default=None, help="limit windows per set (default: all)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="markdown file (a .json beside it)")
    args = ap.parse_args()

    fp, tok = models.load_model(args.model, torch.float32, args.device)
    sets = ("wikitext2", "c4")
    rows = {"FP": aq_eval.perplexities(fp, tok, sets, 2048, args.eval_windows, args.batch, "FP")}
    print("FP", rows["FP"], flush=True)
    for wb, ab, g in SETTINGS:
        cfg = QuantConfig(wbits=wb, abits=ab, group_size=g)
        t = time.time()
        m = quantize_rtn(copy.deepcopy(fp), cfg)
        rows[cfg.label] = aq_eval.perplexities(m, tok, sets, 2048, args.eval_windows, args.batch, cfg.label)
        print(cfg.label, rows[cfg.label], f"{time.time() - t:.1f}s", flush=True)
        del m

    gpu = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    lines = [f"# RTN perplexity, {args.model}", "",
             f"{gpu}, {datetime.date.today()}, fp32 model, windows of 2048 tokens"
             + (f" (first {args.eval_windows} per set)" if args.eval_windows else " (all)"), "",
             "| setting | WikiText-2 | C4 (held-out docs 800-999) |", "|---|---|---|"]
    lines += [f"| {k} | {v['wikitext2']:.2f} | {v['c4']:.2f} |" for k, v in rows.items()]
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"gpu": gpu, "model": args.model, "ppl": rows}, indent=2))


if __name__ == "__main__":
    main()
