"""Why GPTQ W4A16g64 loses to RTN on SmolLM2-135M: weight-grid statistics of the dequantized GGUF, and GPTQ variants
(group qparams, damp, position 0 in the Hessian) against RTN on the same calibration and evaluation tokens.

    python bench/gptq_smollm2.py --out runs/gptq_diag                       # every variant, CPU-sized defaults
    python bench/gptq_smollm2.py --variants rtn,gptq --nsamples 128 --seqlen 2048 --eval-windows 0 --out runs/g

Writes <out>/gptq_smollm2.json (grid statistics, perplexity and per-layer hidden-state error per variant) and prints
a table. Variants: rtn, gptq (dynamic groups, damp 0.01), static (qparams from the un-updated weights), damp0.1,
nopos0 (position 0 out of the Hessian), normtok (--gptq-hessian normalized: every token's input at unit norm before
it enters H), normtok-damp0.1. Hidden-state errors are measured on 4 calibration segments (in-sample) and on the
first 4 x seqlen tokens of the first evaluation set (held out).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from aq import data, eval as aq_eval, models
from aq.calib import gptq
from aq.calib.rtn import quantize_rtn, quantizable_linears
from aq.config import QuantConfig
from aq.primitives import fake_quant

VARIANTS = {
    "rtn": {}, "gptq": {}, "static": {"groups": "static"}, "damp0.1": {"damp": 0.1},
    "nopos0": {"tokens": "nopos0"}, "normtok": {"hessian": "normalized"},
    "normtok-damp0.1": {"hessian": "normalized", "damp": 0.1},
}


def grid_stats(model) -> dict:
    """Distinct values per 32-group of the FP weights (GGUF Q4_1 has at most 16) and what RTN g64 / g32 change."""
    d32, same64, err64, err32 = [], [], [], []
    for _n, lin in quantizable_linears(model):
        w = lin.weight.detach().float()
        g = w.reshape(-1, 32)
        s, _ = g.sort(-1)
        d32.append(((s[:, 1:] != s[:, :-1]).sum(-1) + 1).float())
        q64, q32 = fake_quant(w, 4, 64), fake_quant(w, 4, 32)
        same64.append((q64 == w).float().mean())
        err64.append(((q64 - w).norm() / w.norm()))
        err32.append(((q32 - w).norm() / w.norm()))
    d32 = torch.cat(d32)
    return {"distinct_per_32_max": int(d32.max()), "distinct_per_32_median": float(d32.median()),
            "groups_with_le16_distinct": float((d32 <= 16).float().mean()),
            "rtn_g64_unchanged_fraction": float(torch.stack(same64).mean()),
            "rtn_g64_rel_err": float(torch.stack(err64).mean()), "rtn_g32_rel_err": float(torch.stack(err32).mean())}


def hidden_errors(qmodel, fpmodel, segs) -> list[dict]:
    """Per decoder layer output: MSE at position 0 and over the other positions, quantized vs FP model."""
    with torch.no_grad():
        hq = qmodel(segs, output_hidden_states=True, use_cache=False).hidden_states
        hf = fpmodel(segs, output_hidden_states=True, use_cache=False).hidden_states
    out = []
    for a, b in zip(hq[1:], hf[1:]):
        e = ((a - b) ** 2).mean(-1)  # [B, T]
        out.append({"pos0": float(e[:, 0].mean()), "rest": float(e[:, 1:].mean()),
                    "rest_rel": float(e[:, 1:].mean() / (b[:, 1:] ** 2).mean(-1).mean())})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-data", default="c4")
    p.add_argument("--eval-windows", type=int, default=2, help="first N 2048-token windows per set (0 = all)")
    p.add_argument("--eval-data", default="wikitext2")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration segments")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    fp, tok = models.load_model(models.DEFAULT_MODEL, torch.float32, a.device)
    segs = data.calib_segments(tok, a.calib_data, a.nsamples, a.seqlen, a.seed)
    sets = a.eval_data.split(",")
    toks = aq_eval.eval_token_sets(tok, sets, 2048)
    windows = a.eval_windows or None
    res = {"grid": grid_stats(fp), "args": {k: str(v) for k, v in vars(a).items()}, "rows": {}}
    print(json.dumps(res["grid"]), flush=True)
    probe = segs[:4].to(a.device)
    held = toks[sets[0]][:4 * a.seqlen].view(4, a.seqlen).to(a.device)
    add = gptq.Hessian.add
    for v in a.variants.split(","):
        kw = dict(VARIANTS[v])
        tokens = kw.pop("tokens", None)
        cfg = QuantConfig(wbits=a.wbits, group_size=a.group_size, mode="gptq", gptq_hessian=kw.pop("hessian", "raw"))
        m = copy.deepcopy(fp)
        t0 = time.time()
        if v == "rtn":
            quantize_rtn(m, cfg)
        else:
            if tokens == "nopos0":
                gptq.Hessian.add = lambda self, x: add(self, x[:, 1:] if x.dim() == 3 else x)
            try:
                gptq.quantize_gptq(m, segs, cfg, batch=4, progress=False, say=lambda _s: None, **kw)
            finally:
                gptq.Hessian.add = add
        secs = time.time() - t0
        ppl = {s: aq_eval.perplexity(m, toks[s], 2048, windows) for s in sets}
        errs, herrs = hidden_errors(m, fp, probe), hidden_errors(m, fp, held)
        res["rows"][v] = {"ppl": ppl, "seconds": secs, "layers": errs, "layers_heldout": herrs}
        at = (0, 9, 19, len(errs) - 1)
        print(f"{v}: " + " ".join(f"{s} {x:.2f}" for s, x in ppl.items()) + f" ({secs:.0f}s); rest-token rel MSE "
              f"layers 1/10/20/30 in-sample " + " ".join(f"{errs[i]['rest_rel']:.2e}" for i in at)
              + ", held-out " + " ".join(f"{herrs[i]['rest_rel']:.2e}" for i in at)
              + f"; pos0 MSE layer 20: {errs[19]['pos0']:.3g}", flush=True)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "gptq_smollm2.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
