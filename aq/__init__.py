"""aq: AffineQuant post-training quantization of LLMs, run on Triton kernels.

Public API (kept small; README.md maps the package):
- QuantConfig: the plain dataclass describing a run (bits, group size, mode, schedule); .resolve() decides its "auto"s.
- calibrate(model, tokenizer, QuantConfig(...), data="c4", out=None): quantize in place and return the model.
- load_model: a causal LM by path, .gguf file, hub id or "smollm2" (the default), with its tokenizer.
- quantize_rtn: round-to-nearest fake quantization (the baseline).
- save_checkpoint / load_checkpoint: the safetensors checkpoint format (docs/checkpoint.md); load_checkpoint(...,
  patch=True) also patches the loaded model.
- patch_model: replace quantized linears (and the norms before them) by modules running aq's Triton kernels.
"""
from aq import checkpoint as _checkpoint
from aq.calib.rtn import quantize_rtn
from aq.checkpoint import save_checkpoint
from aq.config import QuantConfig
from aq.models import load_model
from aq.patch import patch_model

__all__ = ["QuantConfig", "calibrate", "load_model", "quantize_rtn", "save_checkpoint", "load_checkpoint",
           "patch_model"]
__version__ = "0.1.0"


def load_checkpoint(ckpt_dir, model=None, *, patch: bool = False, device="cpu", dtype=None, verify_hash: bool = True,
                    **patch_kw):
    """aq.checkpoint.load_checkpoint (the fake-quantized model), then with patch=True aq.patch.patch_model(model,
    **patch_kw): the model on aq's kernels."""
    model = _checkpoint.load_checkpoint(ckpt_dir, model, device=device, dtype=dtype, verify_hash=verify_hash)
    return patch_model(model, **patch_kw) if patch else model


def __getattr__(name):
    # aq.calibrate is imported on first use: importing it here would make `python -m aq.calibrate` run a module that
    # is already in sys.modules (runpy warns). The module is callable: aq.calibrate(model, tokenizer, cfg, ...).
    if name == "calibrate":
        import importlib
        return importlib.import_module("aq.calibrate")
    raise AttributeError(f"module 'aq' has no attribute {name!r}")
