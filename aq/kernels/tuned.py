"""Tuned kernel configs shipped as data: one JSON file per GPU, aq/kernels/configs/<GPU_NAME>.json, holding one entry
per kernel family ({"w4a16": {...}, "w4a4": {...}, "meta": {family: {gpu, date, torch, triton}}}). bench/ scripts write
them on the GPU they run on; kernels read them at run time, so a user's first call does not stall on tuning. A GPU
without a file (or a family without an entry) falls back to the family's heuristic or default configs.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")


def config_file(device_name: str) -> Path:
    return CONFIG_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


@functools.lru_cache(maxsize=None)
def tuned(family: str, device_name: str):
    """The family's entry in the GPU's config file, or None."""
    try:
        return json.loads(config_file(device_name).read_text()).get(family)
    except (OSError, ValueError):
        return None


def write_tuned(family: str, device_name: str, entry, meta: dict, path: Path | None = None) -> Path:
    """Merge one family's entry into the GPU's config file (atomically: temp file + rename)."""
    path = path or config_file(device_name)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[family] = entry
    data.setdefault("meta", {})[family] = meta
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    tuned.cache_clear()
    return path


# ----------------------------------------------------------------------------------------------- untuned shapes / GPUs
# Decision on self-tuning at the first call on an unknown GPU: not by default. A brief tune of one (shape, M) still
# compiles tens of Triton variants (seconds each, minutes per model), stalls the first forward pass unpredictably,
# cannot run inside a CUDA-graph capture (the usual decode setup) and makes results depend on whatever else loaded the
# GPU at that moment. The nearest tuned neighbour below is the default instead: configs transfer well between shapes
# of similar K, N and M on one architecture (the H100 winners change smoothly with log K, log N, log M), and the
# split-K count, the one knob that depends on the grid, is re-derived for the new grid and SM count. The recommended
# opt-in, not implemented yet: AQ_AUTOTUNE=1 running bench/autotune.py's search for the model's shapes once, cached
# per user under ~/.cache/aq/<gpu>.json (read after the shipped file), which bench/autotune.py --out can already write.
SHIPPED_SMS = {"NVIDIA_H100_80GB_HBM3": 132, "NVIDIA_H200": 132}  # SM counts of the GPUs the shipped files are for


def shipped_files() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.json"))


@functools.lru_cache(maxsize=None)
def donor_table(family: str, device_name: str, num_sms: int):
    """The family's table of this GPU, else of the shipped GPU with the closest SM count (same architecture
    generation assumed: the files are for Hopper parts), else None. Returns (table, donor GPU file stem, donor SMs)."""
    own = tuned(family, device_name)
    if own:
        return own, config_file(device_name).stem, num_sms
    best = None
    for f in shipped_files():
        try:
            entry = json.loads(f.read_text()).get(family)
        except (OSError, ValueError):
            continue
        if not entry:
            continue
        sms = SHIPPED_SMS.get(f.stem, 132)
        d = abs(math.log(sms / max(num_sms, 1)))
        if best is None or d < best[0]:
            best = (d, entry, f.stem, sms)
    return None if best is None else best[1:]


def nearest_shape(keys, cb: int, group: int, K: int, N: int, M: int, buckets_of):
    """The tuned (key, bucket) nearest to (K, N, M) in log space among keys "cb:group:K:N" of the same container bits;
    a key of another group size costs one extra unit (group size changes the scale traffic and folding). None if no
    key has this container width."""
    best = None
    for key in keys:
        try:
            kcb, kg, kK, kN = (int(v) for v in key.split(":"))
        except ValueError:
            continue
        if kcb != cb:
            continue
        dkn = abs(math.log2(kK / K)) + abs(math.log2(kN / N)) + (0 if kg == group else 1)
        for b in buckets_of(key):
            d = dkn + abs(math.log2(int(b) / M))
            if best is None or d < best[0]:
                best = (d, key, b)
    return None if best is None else best[1:]
