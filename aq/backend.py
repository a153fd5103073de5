"""The one place that decides how a kernel call runs.

- CUDA tensors run the compiled Triton kernel.
- CPU tensors with TRITON_INTERPRET=1 run the same Triton code through Triton's interpreter (how CI tests kernels).
- CPU tensors otherwise run the plain-torch reference in aq.primitives (also the ground truth of every kernel test).

AQ_BACKEND=torch forces the reference everywhere (useful to bisect a kernel bug on a GPU).
"""
from __future__ import annotations

import os

import torch

TRITON = "triton"
TORCH = "torch"


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter (must be set before triton.jit decorators execute)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose(*tensors: torch.Tensor) -> str:
    """Return TRITON or TORCH for a call on these tensors (all on one device)."""
    if os.environ.get("AQ_BACKEND", "").lower() == TORCH:
        return TORCH
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        raise ValueError(f"tensors are on different devices: {[str(t.device) for t in tensors]}")
    if dev.type == "cuda":
        return TRITON
    if dev.type == "cpu" and interpreting():
        return TRITON
    return TORCH


def first_config_when_interpreting(configs: list) -> list:
    """Triton's interpreter cannot autotune over several configs: keep only the first there."""
    return configs[:1] if interpreting() else configs
