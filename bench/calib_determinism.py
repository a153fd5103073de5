"""Is calibration bitwise reproducible on the GPU? Trains one SmolLM2-shaped layer (random weights, as in
bench/calib_step.py) in separate processes, twice with torch's defaults and twice under aq.calib.loop.use_deterministic,
and compares a hash of the trained parameters; also reports the time of each run.

    python bench/calib_determinism.py --out $OUT
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {"affinequant W4A4": dict(mode="affinequant", wbits=4, abits=4, group_size=None),
         "affinequant W4A16g64": dict(mode="affinequant", wbits=4, group_size=64)}


def worker(case: str, deterministic: bool) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import torch

    from aq.calib import loop
    if deterministic:
        loop.use_deterministic()
    from aq import models
    from aq.calib.attention import enable_qkv_quant
    from aq.calib.layer import LayerCalib
    from aq.config import QuantConfig
    from calib_step import SMOLLM2, one_layer_model
    dev = torch.device("cuda")
    model = one_layer_model(dev)
    cfg = QuantConfig(**CASES[case], batch_size=4, epochs=2)
    if cfg.abits < 16:
        enable_qkv_quant(model)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (16, 2048), generator=torch.Generator().manual_seed(0))
    inps, kws = loop.capture(model, ids, 8)
    layer = models.decoder_layers(model)[0]
    fp = inps.clone()
    loop.propagate(layer, fp, kws[0], 8)
    arch, geo = models.arch_of(model), models.geometry(model)
    calib = LayerCalib(layer, arch, geo, cfg, norm_form=cfg.norm_form, head_affine=True, alpha=0.1, name="layers.0")
    torch.cuda.synchronize()
    t = time.perf_counter()
    log = loop.LayerLog(index=0)
    loss = loop._train(calib, inps, fp, kws[0], cfg, 2, 1.0, torch.Generator().manual_seed(0), torch.bfloat16, "",
                       False, log)
    torch.cuda.synchronize()
    h = hashlib.sha256()
    for p in calib.transform_params() + calib.clip_params():
        h.update(p.detach().float().cpu().numpy().tobytes())
    print(json.dumps({"case": case, "deterministic": deterministic, "loss": loss, "steps": log.steps,
                      "seconds": time.perf_counter() - t, "sha256": h.hexdigest()[:16]}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cases", default="affinequant W4A4", help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "DETERMINISTIC"))
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1] == "1")
        return
    rows = []
    for case in args.cases.split(","):
        for det in ("0", "0", "1", "1"):
            r = subprocess.run([sys.executable, __file__, "--worker", case, det], capture_output=True, text=True)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("{")), None)
            row = json.loads(line) if line else {"case": case, "deterministic": det == "1",
                                                 "error": r.stderr.strip().splitlines()[-3:]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "calib_determinism.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
