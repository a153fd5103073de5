"""aq: AffineQuant post-training quantization of LLMs, run on Triton kernels.

Public API (kept small): QuantConfig, load_model, quantize_rtn. See README.md for the map of the package.
"""
from aq.calib.rtn import quantize_rtn
from aq.config import QuantConfig
from aq.models import load_model

__all__ = ["QuantConfig", "load_model", "quantize_rtn"]
__version__ = "0.1.0"
