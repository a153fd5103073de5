"""QuantConfig: the one plain dataclass that describes a quantization run."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from aq.primitives import check_bits

MODES = ("rtn",)


@dataclass
class QuantConfig:
    wbits: int = 4
    abits: int = 16              # 16 = activations stay in floating point (weight-only)
    group_size: int | None = 64  # None = per output channel
    symmetric: bool = False
    mode: str = "rtn"

    def __post_init__(self):
        check_bits(self.wbits, "wbits")
        if self.abits != 16:
            check_bits(self.abits, "abits")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group size must be a positive integer or None (per channel), got {self.group_size!r}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: choose from {', '.join(MODES)}")

    @property
    def weight_only(self) -> bool:
        return self.abits >= 16

    @property
    def label(self) -> str:
        g = f"g{self.group_size}" if self.group_size else ""
        return f"W{self.wbits}A{self.abits}{g}"

    def to_dict(self) -> dict:
        return asdict(self)
