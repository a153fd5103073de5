"""Quantized checkpoints: what `python -m aq.calibrate --out DIR` writes, and how it is loaded back.

## Format (version 2)

A checkpoint is a folder:

```
DIR/
  config.json            the base model's Hugging Face config (model.config.to_json_string)
  model.safetensors      every tensor (below)
  quant_config.json      the manifest: format, version, QuantConfig, per-layer settings, integrity; written LAST
  tokenizer files        optional (tokenizer.json, tokenizer_config.json, ...) when a tokenizer was given
```

Tensors in `model.safetensors` (names are the model's module names, e.g. `model.layers.0.self_attn.q_proj`):

- For each quantized linear `L` (an aq.qmodel.FakeQuantLinear of the calibrated model: its codes, scales and zero
  points as they are, the codes packed), with N outputs, K inputs, wbits b and group size g (g = K when quantized per
  output channel):

  | tensor | dtype | shape | meaning |
  |---|---|---|---|
  | `L.qweight` | uint8 | [N, K * c / 8] | the integer codes q in [0, 2^b - 1], packed along K (below) |
  | `L.scale` | float32 | [N, K / g] | the scale s of each group, exactly as calibration produced it |
  | `L.zero` | uint8 | [N, K / g] | the integer zero point z of each group |
  | `L.bias` | model dtype | [N] | present when the layer has a bias (calibration's shifts are merged into it) |

  Packing (aq.packing's storage codes): c = 2 bits per code for b = 2, 4 for b = 3, 4, 8 for b = 5..8; code k of row
  n sits in byte k // (8 / c) at bit offset c * (k % (8 / c)) (lowest bits first).

  The weight is w = (q - z) * s, per group of g consecutive input columns. Activation bits (abits; 16 = weight-only)
  and the rest of the layer's settings are in the manifest.
- For each norm that carries a transform left after calibration (a norm-side A^-1 that could not be folded), at norm
  site `S`: `S.norm.<param>` (the norm's own parameters) and `S.transform` (float32): [K] for a diagonal,
  [K / h, h, h] for a block-diagonal (output block b = input block b @ T[b]) or [K, K] for a full matrix, always
  right-multiplied: norm_out @ T (the state of an aq.qmodel.TransformedNorm).
- Every other tensor of the model's state dict (embeddings, norms, lm_head, ...) under its own name, in its own dtype.
  Tensors shared by several names (tied embeddings) are stored once; the manifest's `aliases` maps the other names.

`quant_config.json` (`linears`, `norm_transforms` and `qkv_abits` are an aq.qmodel.QModelSpec, the description that
calibration's per-layer resume files also hold):

```
    {"format": "aq-checkpoint", "version": 2,
     "quant_config": {"wbits": 4, "abits": 16, "group_size": 64, "symmetric": false, "mode": "rtn", ...},
     "base_model": "smollm2", "model_type": "llama", "architectures": ["LlamaForCausalLM"], "dtype": "float32",
     "model_config": {"hidden_size": 576, "rms_norm_eps": 1e-05, "hidden_act": "silu", "rope_parameters": {...}, ...},
     "config_sha256": "...",                                  # sha256 of config.json as written
     "linears": {"model.layers.0.self_attn.q_proj": {"in_features": 576, "out_features": 576, "wbits": 4,
                 "group_size": 64, "abits": 16, "bias": false, "symmetric": false}, ...},
     "norm_transforms": {"model.layers.0.input_layernorm": {"form": "block", "shape": [9, 64, 64]}, ...},
     "qkv_abits": {"model.layers.0.self_attn": 4, ...},     # attention inputs quantized per token and head
     "aliases": {"lm_head.weight": "model.embed_tokens.weight"},
     "tensors": {"file": "model.safetensors", "bytes": 123456789, "sha256": "..."}}
```

`form` is `diagonal`, `block` or `full`; version-2 checkpoints written before aq.qmodel named the block form
`blockdiag`, which is read as `block` (nothing else changed, so they load unchanged).

## Loading

`load_checkpoint(DIR)` builds the model from `config.json` (no base weights needed: the checkpoint holds every
tensor), installs the modules the manifest's QModelSpec describes (aq.qmodel: a FakeQuantLinear per quantized
linear, a TransformedNorm per norm transform, the Q/K/V activation bits of attention modules) and loads every tensor
into them: the fake-quantized model calibration produced, with the same codes and the same fp32 scales. No path
goes codes -> floats -> codes. `load_checkpoint(DIR, model=m)` loads into an existing model of the same architecture
instead, after checking that its config and every linear's shape match. `aq.load_checkpoint(DIR, patch=True)` then
hands the model to aq.patch.patch_model (kernel-backed modules); aq.checkpoint itself knows only aq.qmodel.

## What is verified

Nothing a checkpoint is read from is believed unchecked:

- The tensors file: its size and sha256 are in the manifest (a truncated or altered file is refused).
- The manifest: the sha256 of its content (every entry but `tensors`, as sorted compact JSON) is stored in the
  tensors file's safetensors metadata (`manifest_sha256`), which the file's sha256 covers. An edited manifest, or one
  from another checkpoint, is refused.
- config.json: its sha256 is in the manifest (`config_sha256`), and `model_config` records every config field that
  changes the computation (shapes, `rms_norm_eps`, `hidden_act`, rope settings, `tie_word_embeddings`, biases, ...;
  `COMPUTE_KEYS`). A config.json that is not the file written is refused, naming the fields that differ.
- Per quantized linear, the manifest's wbits and group size against the stored tensors: the packed code shape for
  that many bits, the scale and zero shapes for that group size, codes and zero points within [0, 2^wbits - 1].
- `load_checkpoint(DIR, model=m)`: the model's config must agree with `model_config` on every field (a base model with
  another `rope_theta` or `rms_norm_eps` is refused, naming it), and every linear's shape must match.
- Missing or unexpected tensors, an unknown format, and format version 1 (written before config.json and the
  manifest were covered; calibrate again to write version 2) are refused.

Every file is written to a temporary name and renamed into place; the manifest goes last, so a folder with a manifest
is a complete checkpoint. `verify_hash=False` skips hashing the (large) tensors file only; the other checks stay.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from aq.packing import container_bits, pack_storage_codes, unpack_storage_codes
from aq import models, primitives
from aq.config import QuantConfig
from aq.qmodel import LinearSpec, QModelSpec, enable_qkv_quant

FORMAT = "aq-checkpoint"
VERSION = 2  # 2: config.json and the manifest are covered by the integrity check; 1 is refused (its were not)
MANIFEST = "quant_config.json"
TENSORS = "model.safetensors"
HF_CONFIG = "config.json"
# config fields that fix tensor shapes: a model to load into must agree on those it has
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "ffn_dim", "word_embed_proj_dim", "tie_word_embeddings")
# config fields that change the computation without changing a shape: the manifest records them (with the shape
# fields), and a config.json or a model to load into that disagrees is refused, naming the field
COMPUTE_KEYS = SHAPE_KEYS + (
    "hidden_act", "activation_function", "rms_norm_eps", "layer_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "partial_rotary_factor", "max_position_embeddings", "attention_bias", "mlp_bias",
    "pretraining_tp", "do_layer_norm_before", "_remove_final_layer_norm", "enable_bias",
    "layer_norm_elementwise_affine", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping",
    "query_pre_attn_scalar", "hidden_activation")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (incomplete, corrupted, or not for this model)."""


# ------------------------------------------------------------------------------------------------------------ helpers
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _body_sha256(man: dict) -> str:
    """Hash of the manifest without its `tensors` entry; stored in the tensors file's metadata, which the manifest's
    sha256 covers, so neither file can change without the other noticing."""
    body = {k: v for k, v in man.items() if k != "tensors"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# --------------------------------------------------------------------------------------------------------------- save
@torch.no_grad()
def save_checkpoint(model: nn.Module, cfg: QuantConfig, out_dir: str | os.PathLike, tokenizer=None,
                    base_model: str | None = None) -> Path:
    """Write the calibrated (fake-quantized) `model` and its QuantConfig to out_dir (format in the module doc)."""
    cfg = cfg.resolve(model)
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        (out / MANIFEST).unlink()  # the folder is not a valid checkpoint until the new manifest lands
    spec = QModelSpec.of(model)
    if not spec.linears:
        raise ValueError("the model has no FakeQuantLinear modules: nothing quantized to save")
    tensors: dict[str, torch.Tensor] = {}
    for name, info in spec.linears.items():  # the codes packed, zero points as bytes (docs/checkpoint.md)
        m = model.get_submodule(name)
        tensors[f"{name}.qweight"] = pack_storage_codes(m.codes(), info.wbits)
        tensors[f"{name}.scale"] = m.scale.float()
        tensors[f"{name}.zero"] = m.zero.round().to(torch.uint8)
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias
    covered = {name + "." for name in spec.linears}  # state-dict prefixes written in the quantized form above
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, v in model.state_dict().items():
        if any(k.startswith(p) for p in covered):
            continue
        key = (v.data_ptr(), v.numel(), v.dtype, tuple(v.shape))
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        # norm transforms in float32 whatever the model's dtype (docs/checkpoint.md)
        tensors[k] = v.float() if k.endswith(".transform") and k[:-len(".transform")] in spec.norm_transforms else v
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    config_bytes = model.config.to_json_string(use_diff=False).encode()
    config_dict = json.loads(config_bytes)
    manifest = {
        "format": FORMAT, "version": VERSION, "quant_config": cfg.to_dict(), "base_model": base_model,
        "model_type": model.config.model_type, "architectures": getattr(model.config, "architectures", None)
        or [type(model).__name__], "dtype": _dtype_name(models.model_dtype(model)),
        "model_config": {k: config_dict[k] for k in COMPUTE_KEYS if k in config_dict},
        "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
        **spec.to_json(), "aliases": aliases,
    }
    tmp = out / (TENSORS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION),
                                           "manifest_sha256": _body_sha256(manifest)})
    os.replace(tmp, out / TENSORS)
    _atomic_write_bytes(out / HF_CONFIG, config_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    manifest["tensors"] = {"file": TENSORS, "bytes": (out / TENSORS).stat().st_size, "sha256": _sha256(out / TENSORS)}
    _atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return out


# --------------------------------------------------------------------------------------------------------------- load
def read_manifest(ckpt_dir: str | os.PathLike) -> dict:
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint folder {d} does not exist")
    p = d / MANIFEST
    if not p.is_file():
        raise CheckpointError(f"{d} is not a complete aq checkpoint: {MANIFEST} is missing (the manifest is written "
                              "last, so the write that made this folder did not finish)")
    try:
        man = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON ({e}): the checkpoint is damaged") from None
    if man.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not an aq checkpoint (format {man.get('format')!r})")
    if man.get("version") == 1:
        raise CheckpointError(f"{p}: checkpoint format version 1 (older aq) is refused: its config.json and manifest "
                              "were not covered by the integrity check, so what they say cannot be trusted; "
                              "calibrate again (or save the model again with this aq) to write version 2")
    if man.get("version") != VERSION:
        raise CheckpointError(f"{p}: checkpoint format version {man.get('version')} is not supported "
                              f"(this aq reads version {VERSION})")
    return man


def _check_tensor_file(d: Path, man: dict, verify_hash: bool) -> Path:
    info = man["tensors"]
    f = d / info["file"]
    if not f.is_file():
        raise CheckpointError(f"{f} is missing")
    size = f.stat().st_size
    if size != info["bytes"]:
        what = "truncated" if size < info["bytes"] else "longer than written"
        raise CheckpointError(f"{f} is {what}: {size} bytes, the manifest says {info['bytes']}")
    if verify_hash and _sha256(f) != info["sha256"]:
        raise CheckpointError(f"{f} does not match the sha256 in the manifest: the file was altered or damaged")
    return f


def _config_diffs(saved: dict, cur: dict, keys=COMPUTE_KEYS) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r}, {{other}} {cur.get(k)!r}" for k in keys
            if (k in saved or k in cur) and saved.get(k) != cur.get(k)]


def _check_config(model: nn.Module, man: dict) -> None:
    """A model to load into must agree with the checkpoint on every field that changes the computation."""
    diffs = _config_diffs(man["model_config"], json.loads(model.config.to_json_string(use_diff=False)))
    if diffs:
        raise CheckpointError("the checkpoint was made for another model: "
                              + "; ".join(diffs).replace("{other}", "model")
                              + " (fields that change the computation must agree)")


def _check_signed(d: Path, f: Path, man: dict) -> dict:
    """The manifest and config.json are the ones the tensors file was written with; returns config.json's content."""
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as sf:
        meta = sf.metadata() or {}
    if meta.get("manifest_sha256") != _body_sha256(man):
        raise CheckpointError(f"{d / MANIFEST} differs from the one written with {f.name} (its hash in the tensors "
                              "file does not match): the manifest was edited or belongs to another checkpoint")
    c = d / HF_CONFIG
    if not c.is_file():
        raise CheckpointError(f"{c} is missing")
    raw = c.read_bytes()
    try:
        saved_cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{c} is not valid JSON ({e}): the checkpoint is damaged") from None
    if hashlib.sha256(raw).hexdigest() != man["config_sha256"]:
        diffs = _config_diffs(man["model_config"], saved_cfg)
        named = ("; ".join(diffs).replace("{other}", "config.json") if diffs
                 else "no field that changes the computation, but the file is not the one written")
        raise CheckpointError(f"{c} differs from the config the checkpoint was written with: {named}")
    return saved_cfg


def _check_linear_tensors(name: str, info: LinearSpec, tensors: dict) -> None:
    """The manifest's bits, groups and shapes agree with the stored tensors (codes and zero points in range)."""
    N, K, b, g = info.out_features, info.in_features, info.wbits, info.group_size
    qw, scale, zero = (tensors.get(f"{name}.{t}") for t in ("qweight", "scale", "zero"))
    if qw is None or scale is None or zero is None:
        return  # reported as an incomplete checkpoint by the caller
    ng = K // primitives.check_group_size(K, g)
    packed = (N, K * container_bits(b) // 8)
    if tuple(qw.shape) != packed:
        raise CheckpointError(f"{name}: qweight has shape {list(qw.shape)}, but {b}-bit codes of a [{N}, {K}] linear "
                              f"pack to {list(packed)}: the manifest's wbits={b} is not how the codes were stored")
    if tuple(scale.shape) != (N, ng) or tuple(zero.shape) != (N, ng):
        raise CheckpointError(f"{name}: scale {list(scale.shape)} / zero {list(zero.shape)}, but groups of {g} over "
                              f"K={K} need [{N}, {ng}]: the manifest's group size disagrees with the stored tensors")
    top = 2**b - 1
    if int(zero.max()) > top or int(unpack_storage_codes(qw, b, K).max()) > top:
        raise CheckpointError(f"{name}: stored codes or zero points exceed {top}, the largest {b}-bit code: the "
                              f"manifest's wbits={b} is not what the layer was quantized with")


def _build_model(d: Path, dtype: torch.dtype, device):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(str(d))
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights skips init_weights, which is where tying happens
    return model.eval()


@torch.no_grad()
def load_checkpoint(ckpt_dir: str | os.PathLike, model: nn.Module | None = None, *, device="cpu",
                    dtype: torch.dtype | None = None, verify_hash: bool = True) -> nn.Module:
    """Load a checkpoint written by save_checkpoint: the fake-quantized model (aq.qmodel), in eval mode.

    model: load into this model (same architecture, checked) instead of building one from the saved config.
    dtype: dtype of the float tensors (default: the one saved). For the kernel-backed model, aq.load_checkpoint(...,
    patch=True) or aq.patch.patch_model on the result.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(ckpt_dir)
    man = read_manifest(d)
    f = _check_tensor_file(d, man, verify_hash)
    saved_cfg = _check_signed(d, f, man)
    if saved_cfg.get("model_type") != man.get("model_type"):
        raise CheckpointError(f"{d}: config.json and the manifest disagree on the model type")
    try:
        spec = QModelSpec.from_json(man)
    except ValueError as e:
        raise CheckpointError(f"{d / MANIFEST}: {e}") from None
    dtype = dtype or getattr(torch, man.get("dtype", "float32"))
    try:
        tensors = load_file(str(f), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f} cannot be read ({e}): the file is damaged") from None

    if model is None:
        model = _build_model(d, dtype, "cpu")
    else:
        _check_config(model, man)
    qcfg = QuantConfig(**{k: v for k, v in man["quant_config"].items() if k in QuantConfig.__dataclass_fields__})

    # the model must have every quantized linear, with these shapes
    problems = []
    for name, info in spec.linears.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module in the model")
            continue
        shape = (getattr(lin, "out_features", None), getattr(lin, "in_features", None))
        if shape != (info.out_features, info.in_features):
            problems.append(f"{name}: model has {shape}, checkpoint {(info.out_features, info.in_features)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError("the checkpoint does not match the model: " + "; ".join(problems[:5]) + more)
    for site, info in spec.norm_transforms.items():
        t = tensors.get(f"{site}.transform")
        if t is None:
            raise CheckpointError(f"{f} has no tensor '{site}.transform': the checkpoint is incomplete")
        if tuple(t.shape) != info.shape:
            raise CheckpointError(f"{site}.transform has shape {list(t.shape)}, the manifest says {list(info.shape)}")

    def take(key: str) -> torch.Tensor:
        if key not in tensors:
            raise CheckpointError(f"{f} has no tensor {key!r}: the checkpoint is incomplete")
        return tensors.pop(key)

    for name, info in spec.linears.items():
        _check_linear_tensors(name, info, tensors)
    # the stored form -> the state of aq.qmodel.FakeQuantLinear (codes unpacked, zero points as floats)
    state: dict[str, torch.Tensor] = {}
    for name, info in spec.linears.items():
        state[f"{name}.qcodes"] = unpack_storage_codes(take(f"{name}.qweight"), info.wbits, info.in_features)
        state[f"{name}.scale"] = take(f"{name}.scale").float()
        state[f"{name}.zero"] = take(f"{name}.zero").float()
        if info.bias:
            state[f"{name}.bias"] = take(f"{name}.bias").to(dtype)
    for alias, target in man.get("aliases", {}).items():
        if target not in tensors:
            raise CheckpointError(f"alias {alias} -> {target}: {target} is not in {f}")
        tensors[alias] = tensors[target]
    state.update((k, v.to(dtype) if v.is_floating_point() and not k.endswith(".transform") else v)
                 for k, v in tensors.items())
    try:
        spec.install(model, dtype)  # the quantized modules in place, to be filled by their state
    except AttributeError as e:
        raise CheckpointError(f"the checkpoint does not match the model: {e}") from None
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{f} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=True)
    if spec.qkv_abits:  # per-token quantization of attention's Q, K, V (weight-activation calibration), simulated
        enable_qkv_quant(model)
    model.to(device)
    model.aq_quant_config = qcfg
    return model.eval()
