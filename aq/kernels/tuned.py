"""Tuned kernel configs shipped as data: one JSON file per GPU, aq/kernels/configs/<GPU_NAME>.json, holding one entry
per kernel family ({"w4a16": {...}, "w4a4": {...}, "meta": {family: {gpu, date, torch, triton}}}). bench/ scripts write
them on the GPU they run on; kernels read them at run time, so a user's first call does not stall on tuning. A GPU
without a file (or a family without an entry) falls back to the family's heuristic or default configs.
"""
from __future__ import annotations

import functools
import json
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
