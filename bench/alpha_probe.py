"""Does the dominance cap limit what AffineQuant's off-diagonal part learns? Calibrates the first N layers of SmolLM2
(AffineQuant W3A16g64 block:64, 16 x 256 C4 tokens, 4 epochs, batch 4, on whatever device the model loads on) with a
given stability factor and prints, per layer, the probe loss before -> after training, the off-diagonal share of the
norm-side transforms (0.487 = the cap at margin 0.05) and the smallest dominance margin. bench/NOTES-accuracy.md, 4.

    AQ_DATA_DIR=../shared/data PYTHONPATH=$PWD python bench/alpha_probe.py --alpha-sf 1.0 --layers 14 --seed 0
"""
from __future__ import annotations

import argparse
import json

import torch

import aq
from aq.calib import loop
from aq.calib.transforms import Transform
from aq.data import calib_segments

KEYS = ("index", "loss_init", "loss_probe", "offdiag", "margin_min", "init")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alpha-sf", type=float, required=True)
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-margin", type=float, default=None,
                   help="dominance floor of the projection (aq's MIN_MARGIN, 0.05) for this probe only")
    p.add_argument("--out", default=None, help="JSON file (default alpha_probe_<alpha>_<seed>.json)")
    a = p.parse_args()
    if a.min_margin is not None:  # the projection's default argument (bound at definition, under no_grad's wrapper)
        fn = Transform.keep_dominant_
        getattr(fn, "__wrapped__", fn).__defaults__ = (a.min_margin,)
    torch.manual_seed(a.seed)
    model, tok = aq.load_model("smollm2")
    seg = calib_segments(tok, "c4", 16, 256, seed=a.seed)
    cfg = aq.QuantConfig(mode="affinequant", wbits=3, abits=16, group_size=64, epochs=4, alpha_sf=a.alpha_sf)
    cfg = cfg.resolve(model, "cpu")
    info = loop.calibrate(model, seg, cfg, batch=4, progress=False, say=lambda *_: None, max_layers=a.layers)
    rows = [{k: layer[k] for k in KEYS} for layer in info["layers"]]
    with open(a.out or f"alpha_probe_{a.alpha_sf}_{a.min_margin}_{a.seed}.json", "w") as f:
        json.dump(rows, f, indent=1)
    for r in rows:
        gain = 100 * (1 - r["loss_probe"] / r["loss_init"])
        print(f"alpha_sf {a.alpha_sf} floor {a.min_margin} layer {r['index'] + 1}: "
              f"{r['loss_init']:.4g} -> {r['loss_probe']:.4g} "
              f"({gain:.1f}%), offdiag {r['offdiag']:.3f}, margin_min {r['margin_min']:.3f}, init {r['init']}")


if __name__ == "__main__":
    main()
