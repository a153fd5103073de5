"""Does a patched model compute what its fake-quantized model computes? WikiText-2 perplexity of both, per setting.

    PYTHONPATH=$PWD AQ_DATA_DIR=/path/to/data python bench/patch_check.py --model /path/SmolLM2-135M-Instruct.gguf \
        --settings W8A8,W6A6 --out /tmp/patch_check.json                  # round-to-nearest (seconds per setting)
    ... --mode affinequant --nsamples 16 --seqlen 512 --epochs 2          # a short calibration instead
    ... --ckpt runs/aq_w6a6 --ckpt runs/aq_w8a8                           # checkpoints of earlier calibrations

Per setting the model is quantized once in float32 (RTN, or calibrated by aq.calibrate with the schedule given),
written with aq.save_checkpoint, and then, for each --dtypes entry, read back twice: fake-quantized
(aq.load_checkpoint) and patched (aq.load_checkpoint(patch=True): the kernel-backed modules aq.patch.kernel_for
picks, e.g. W8A8Linear on the int8 GEMM for W8A8 / W6A6). Both are evaluated on WikiText-2 test (windows of
--seqlen tokens, all of them unless --eval-windows), with the relative logit error over the first --logit-windows.
A row passes when |ppl_patched / ppl_fake - 1| <= --tolerance (default 0.5%, issue 16). Exit code 1 if any row fails.

Noise floor: low-bit per-token activation quantization makes a model sensitive to float rounding (a 1e-7 change of
a layer's output moves a few codes by one step at near-ties in the next layer, and those steps grow through the
layers; SmolLM2's massive activations make the steps large). The integer GEMM sums exactly where the fake-quantized
model sums in fp32, so the two differ by that much even when the kernel is exact. Each row therefore also evaluates
the fake-quantized model with its linears summed in float64 ("fake, exact sum": the same values, another rounding),
and reports how far that is from the fake-quantized model (floor_*) and from the patched one (vs_exact_*).
Offline: the model is a local path or .gguf file, the text comes from AQ_DATA_DIR (aq.data).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from aq import calibrate as aq_calibrate
from aq import data, models
from aq import eval as aq_eval
from aq import load_checkpoint
from aq.checkpoint import read_manifest
from aq.config import MODES
from aq.kernels.fake_quant import fake_quant
from aq.patch import kernel_for, patched_summary
from aq.qmodel import FakeQuantLinear


def with_exact_sums(model):
    """The model with each FakeQuantLinear's product in float64 (same fake-quantized operands, no fp32 summation
    rounding), in place."""
    def f64(self, x):
        xq = fake_quant(x, self.abits, None) if self.abits < 16 else x
        b = None if self.bias is None else self.bias.double()
        return torch.nn.functional.linear(xq.double(), self.weight.double(), b).to(x.dtype)

    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            m.forward = types.MethodType(f64, m)
    return model


def _kernels(man: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for info in man["linears"].values():
        k = kernel_for(info["wbits"], info["abits"], info["group_size"], info["in_features"])
        out[k] = out.get(k, 0) + 1
    return out


def check_checkpoint(ckpt: Path, label: str, tok, toks, dtypes, args) -> list[dict]:
    man = read_manifest(ckpt)
    rows = []
    for dt in dtypes:
        t = time.time()
        dtype = getattr(torch, dt)
        fq = load_checkpoint(ckpt, device=args.device, dtype=dtype)
        pm = load_checkpoint(ckpt, device=args.device, dtype=dtype, patch=True)
        ppl = lambda m, what: aq_eval.perplexity(m, toks, args.seqlen, args.eval_windows, args.batch,  # noqa: E731
                                                 f"{label} {dt} {what}")
        err = lambda a, b: aq_eval.logit_error(a, b, toks, args.logit_windows, args.seqlen)  # noqa: E731
        ppl_f, ppl_p = ppl(fq, "fake"), ppl(pm, "patched")
        row = dict(setting=label, dtype=dt, ppl_fake=ppl_f, ppl_patched=ppl_p, rel_diff=ppl_p / ppl_f - 1,
                   logit_rel_err=err(fq, pm))
        row["ok"] = abs(row["rel_diff"]) <= args.tolerance
        if args.floor:
            fq64 = with_exact_sums(copy.deepcopy(fq))
            ppl_e = ppl(fq64, "fake, exact sums")
            row.update(ppl_fake_exact=ppl_e, floor_rel_diff=ppl_e / ppl_f - 1, floor_logit_rel_err=err(fq, fq64),
                       vs_exact_rel_diff=ppl_p / ppl_e - 1, vs_exact_logit_rel_err=err(fq64, pm))
            del fq64
        row.update(kernels=_kernels(man), modules=patched_summary(pm), quant_config=man["quant_config"],
                   seconds=round(time.time() - t, 1))
        print(json.dumps({k: v for k, v in row.items() if k not in ("modules", "quant_config")}), flush=True)
        rows.append(row)
        del fq, pm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="path, .gguf file or 'smollm2'")
    ap.add_argument("--settings", default="W8A8,W6A6", help="comma-separated W<b>A<b>[g<group>] (empty: none)")
    ap.add_argument("--mode", default="rtn", choices=MODES, help="how the settings are quantized")
    ap.add_argument("--nsamples", type=int, default=16, help="calibration segments (trained modes)")
    ap.add_argument("--seqlen-calib", type=int, default=512, help="calibration segment length (trained modes)")
    ap.add_argument("--epochs", type=int, default=2, help="calibration epochs (trained modes)")
    ap.add_argument("--calib-data", default="c4")
    ap.add_argument("--ckpt", action="append", default=[], help="also check this aq checkpoint (repeatable)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="dtypes both models are evaluated in")
    ap.add_argument("--seqlen", type=int, default=2048, help="perplexity window")
    ap.add_argument("--eval-windows", type=int, default=None, help="perplexity windows (default: all)")
    ap.add_argument("--logit-windows", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="perplexity windows per forward")
    ap.add_argument("--tolerance", type=float, default=0.005, help="allowed |ppl_patched / ppl_fake - 1|")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the noise-floor evaluation (fake-quantized model with float64 sums)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            ap.error(f"--dtypes: unknown dtype {d!r} (float32, bfloat16, float16)")
    settings = [aq_eval._parse_setting(s) for s in args.settings.split(",") if s]
    if not settings and not args.ckpt:
        ap.error("nothing to check: give --settings or --ckpt")

    t0 = time.time()
    base, tok = models.load_model(args.model, torch.float32, "cpu")
    toks = data.eval_tokens(tok, "wikitext2")
    print(f"loaded {args.model} in {time.time() - t0:.0f}s; WikiText-2 {toks.numel()} tokens", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in settings:
            if args.mode != "rtn":
                cfg = cfg.__class__(**{**cfg.to_dict(), "mode": args.mode, "nsamples": args.nsamples,
                                       "seqlen": args.seqlen_calib, "epochs": args.epochs})
            t = time.time()
            model = copy.deepcopy(base).to(args.device)
            ck = Path(tmp) / cfg.label
            aq_calibrate.run(model, tok, cfg, args.calib_data, ck, model_name=args.model, say=lambda *_: None)
            print(f"{cfg.label} {args.mode}: {time.time() - t:.0f}s", flush=True)
            del model
            rows += check_checkpoint(ck, f"{cfg.label} {args.mode}", tok, toks, dtypes, args)
        for c in args.ckpt:
            rows += check_checkpoint(Path(c), f"checkpoint {c}", tok, toks, dtypes, args)

    res = dict(gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               date=str(datetime.date.today()), model=args.model, tolerance=args.tolerance, seqlen=args.seqlen,
               eval_windows=args.eval_windows, rows=rows, ok=all(r["ok"] for r in rows),
               seconds=round(time.time() - t0, 1))
    print("\n| setting | dtype | ppl fake | ppl patched | rel. diff | logit rel. err | ok | floor: fake, exact sums "
          "| floor rel. diff | patched vs exact |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        floor = (f"{r['ppl_fake_exact']:.3f} | {100 * r['floor_rel_diff']:+.3f}% | {100 * r['vs_exact_rel_diff']:+.3f}%"
                 if "ppl_fake_exact" in r else "- | - | -")
        print(f"| {r['setting']} | {r['dtype']} | {r['ppl_fake']:.3f} | {r['ppl_patched']:.3f} | "
              f"{100 * r['rel_diff']:+.3f}% | {r['logit_rel_err']:.2e} | {'yes' if r['ok'] else 'NO'} | {floor} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
