"""Export an aq checkpoint as a Hugging Face folder that transformers and vLLM load (compressed-tensors pack-quantized).

    python -m aq.export --checkpoint runs/w4a16 --format compressed-tensors --out runs/w4a16-ct
    python -m aq.calibrate --norm-transform diagonal --out runs/w4a16 --export-format compressed-tensors

The folder holds config.json (the model's config plus `quantization_config`), the tokenizer files and
model.safetensors. Every linear aq quantized keeps its integer codes, scales and zero points exactly: per group or
per output channel, 2..8 bits, asymmetric (zero points) or symmetric. The layout is built and checked with the
`compressed-tensors` package itself (its int32 packing, its config schema, its decompressor, which must give back
aq's dequantized weight bit for bit), so it is that package's format by construction. Format and limits:
docs/export.md.

Only what the format's plain model can compute is exported, and a run that needs more is refused before anything is
written, naming the calibrate flag that makes it exportable:
- a full or block-diagonal transform left after a norm (`--norm-transform full|block`): the Hugging Face model has
  no place for a d x d (or per-block) product after its RMSNorm; `--norm-transform diagonal` folds into the norm;
- weight-activation runs (abits < 16, Q/K/V quantized per head): aq quantizes activations per token, asymmetric,
  including attention's inputs; the pack-quantized weight-only format cannot say so (`--abits 16`);
- a bias calibration's shifts put on a linear that the architecture cannot be given one through its config
  (`--shifts off`). Where the config can (LLaMA's attention_bias / mlp_bias), it is set and the other linears of that
  kind get zero biases, which changes nothing.
Transforms already folded into weights by calibration (v -> o, q -> k, up -> down, diagonal norm transforms, residual
rotations) need nothing: the checkpoint's weights are the exported weights. A diagonal transform a checkpoint still
stores after a norm is folded into that norm's weight (and bias) here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from aq import primitives
from aq.checkpoint import HF_CONFIG, MANIFEST, TENSORS, load_checkpoint, read_manifest
from aq.packing import unpack_storage_codes

FORMATS = ("compressed-tensors",)
DTYPES = ("auto", "float32", "bfloat16", "float16")
# config fields that give every linear of one kind a bias, per architecture family that has them
BIAS_FLAGS = ("attention_bias", "mlp_bias")
# files of an aq checkpoint folder that are not the model's (everything else there, the tokenizer, is copied)
AQ_FILES = {HF_CONFIG, MANIFEST, TENSORS, "results.json"}


class ExportError(ValueError):
    """A checkpoint that this format cannot express exactly (the message names the calibrate flag that would)."""


# ------------------------------------------------------------------------------------------------------ refusals
def _norm_flag(forms) -> str:
    return (f"the run left {' and '.join(sorted(forms))} transforms after its norms, which the Hugging Face model "
            "cannot apply (they are a product after RMSNorm); calibrate with --norm-transform diagonal (folded into "
            "the norm weights, exported exactly)")


def _act_flag(abits: int) -> str:
    return (f"the run quantizes activations (abits={abits}) per token at run time, attention's Q/K/V included; the "
            "pack-quantized format is weight-only and cannot express that; calibrate with --abits 16")


def config_refusals(cfg) -> list[str]:
    """Why a run with this QuantConfig could not be exported (empty: it can); checked by calibrate before any work."""
    out = []
    if not cfg.weight_only:
        out.append(_act_flag(cfg.abits))
    elif cfg.norm_form != "diagonal":
        out.append(_norm_flag({cfg.norm_form}))
    return out


def manifest_refusals(man: dict) -> list[str]:
    """Why the checkpoint with this manifest cannot be exported (empty: it can)."""
    out = []
    abits = sorted({i["abits"] for i in man["linears"].values() if i["abits"] < 16} | set(man.get("qkv_abits", {})
                                                                                          .values()))
    if abits:
        out.append(_act_flag(abits[0]))
    forms = {t["form"] for t in man.get("norm_transforms", {}).values()} - {"diagonal"}  # diagonal: folded
    if forms:
        out.append(_norm_flag(forms))
    return out


def _refuse(problems: list[str], what: str) -> None:
    if problems:
        raise ExportError(f"{what} cannot be exported as compressed-tensors: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------- the layout
def require_package() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ImportError("exporting needs the compressed-tensors package: pip install -e '.[export]'") from None


def check_out(out: Path) -> None:
    """The export folder must be new or empty (an export is never merged into other files)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"export folder {out} exists and is not an empty folder: choose a new one or remove it")


def _ct():
    require_package()
    from compressed_tensors.compressors import ModelCompressor, PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus)

    return dict(ModelCompressor=ModelCompressor, Packed=PackedQuantizationCompressor, pack=pack_to_int32,
                format=CompressionFormat.pack_quantized.value, Args=QuantizationArgs, Config=QuantizationConfig,
                Scheme=QuantizationScheme, compressed=QuantizationStatus.COMPRESSED)


def _scheme_key(info: dict, zero: torch.Tensor) -> tuple[int, int | None, bool]:
    """(bits, group size or None = per channel, symmetric) of a linear; symmetric when every zero point is aq's
    symmetric one, 2^(b-1) (the signed format's 0)."""
    b, K = info["wbits"], info["in_features"]
    g = primitives.check_group_size(K, info["group_size"])
    return b, (None if g == K else g), bool((zero == 2 ** (b - 1)).all())


def _scheme_args(ct, key):
    b, g, sym = key
    return ct["Args"](num_bits=b, type="int", symmetric=sym, strategy="channel" if g is None else "group",
                      group_size=g, dynamic=False)


def _pack_linear(ct, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, key, dtype) -> dict:
    """aq's unsigned codes / zero points [0, 2^b) -> the format's signed ones (both shifted by 2^(b-1), so
    (q - z) * s is unchanged), packed with compressed-tensors' own int32 packing."""
    b, _, sym = key
    off = 2 ** (b - 1)
    t = {"weight_packed": ct["pack"]((codes.to(torch.int16) - off).to(torch.int8), b),
         "weight_scale": scale.to(dtype).contiguous(),
         "weight_shape": torch.tensor(codes.shape)}
    if not sym:
        t["weight_zero_point"] = ct["pack"]((zero.to(torch.int16) - off).to(torch.int8), b, packed_dim=0)
    return t


def _verify_linear(ct, name: str, packed: dict, scheme, weight: torch.Tensor) -> None:
    """compressed-tensors' decompressor must give back aq's dequantized weight bit for bit."""
    got = ct["Packed"].decompress(dict(packed), scheme)["weight"].to(weight.dtype)
    if not torch.equal(got, weight):
        err = (got.float() - weight.float()).abs().max().item()
        raise ExportError(f"{name}: compressed-tensors decompresses the exported weight to other values than aq's "
                          f"(max difference {err:.3g}): the layout was not written as that package reads it")


@torch.no_grad()
def _fold_diagonal_norms(model, man: dict) -> None:
    """A diagonal transform t stored after a norm (norm(x) * t) becomes the norm's weight (and bias) times t; the
    norm goes back in its place. Calibration folds these itself; a checkpoint may still carry one."""
    from aq.patch import split_norm

    for site, info in man.get("norm_transforms", {}).items():
        if info["form"] != "diagonal":
            continue
        norm, t = split_norm(model.get_submodule(site))
        w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
        if w is None:
            raise ExportError(f"{site}: a diagonal transform after a norm without a weight cannot be folded")
        for p in (w, b) if b is not None else (w,):
            p.copy_((p.double() * t.double()).to(p.dtype))
        parent, _, child = site.rpartition(".")
        model.get_submodule(parent).register_module(child, norm)


# ------------------------------------------------------------------------------------------- config and biases
def _skeleton_keys(config_dict: dict) -> set[str]:
    """State-dict keys of the plain Hugging Face model this config builds (on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "quantization_config"})
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    return set(m.state_dict().keys())


def _fit_biases(config_dict: dict, biased: set[str]) -> tuple[dict, set[str]]:
    """A config whose model has a bias wherever a quantized linear has one: the config as is, or with BIAS_FLAGS
    switched on; returns it and the bias keys to fill with zeros (linears the flag gives a bias they do not have)."""
    have = _skeleton_keys(config_dict)
    needed = {f"{n}.bias" for n in biased}
    if needed <= have:
        return config_dict, set()
    off = [k for k in BIAS_FLAGS if config_dict.get(k) is False]
    for flags in [[k] for k in off] + ([off] if len(off) > 1 else []):
        trial = {**config_dict, **{k: True for k in flags}}
        keys = _skeleton_keys(trial)
        if needed <= keys:
            return trial, {k for k in keys - have if k.endswith(".bias")} - needed
    missing = sorted(n[: -len(".bias")] for n in needed - have)
    raise ExportError(f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} carry a bias (calibration's "
                      f"shifts merged into it) that a {config_dict.get('model_type')} model cannot be given through "
                      "its config; calibrate with --shifts off")


# ------------------------------------------------------------------------------------------------------- export
@torch.no_grad()
def export(checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str = "compressed-tensors",
           dtype: str = "auto", say=print) -> Path:
    """Write the aq checkpoint folder `checkpoint` to `out` in `fmt` (module doc). dtype: of the float tensors and
    scales ("auto" = the checkpoint's); exact in float32, while bfloat16 / float16 round each scale once (the format
    keeps scales in the model's dtype).
    Refusals (ExportError) happen before anything is written; `out` appears complete or not at all."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: aq exports {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    src, out = Path(checkpoint), Path(out)
    man = read_manifest(src)
    _refuse(manifest_refusals(man), f"checkpoint {src}")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the checkpoint folder itself: choose another folder")
    check_out(out)
    ct = _ct()
    model = load_checkpoint(src)  # every integrity check of docs/checkpoint.md
    _fold_diagonal_norms(model, man)
    foreign = sorted({type(m).__module__ + "." + type(m).__name__ for n, m in model.named_modules()
                      if type(m).__module__.startswith("aq.") and n not in man["linears"]})
    _refuse([f"it holds modules only aq computes ({', '.join(foreign)})"] if foreign else [], f"checkpoint {src}")
    dt = getattr(torch, man.get("dtype", "float32") if dtype == "auto" else dtype)

    from safetensors import safe_open

    groups: dict[tuple, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(src / TENSORS), framework="pt") as f:
        for name, info in man["linears"].items():
            codes = unpack_storage_codes(f.get_tensor(f"{name}.qweight"), info["wbits"], info["in_features"])
            scale, zero = f.get_tensor(f"{name}.scale"), f.get_tensor(f"{name}.zero")
            key = _scheme_key(info, zero)
            groups.setdefault(key, []).append(name)
            packed = _pack_linear(ct, codes, scale, zero, key, dt)
            # what the format computes: (q - z) * s with s in dt -- aq's own weight when dt is float32
            ref = primitives.dequantize(codes, scale.to(dt).float(), zero.float(), key[1], dt)
            _verify_linear(ct, name, packed, ct["Scheme"](targets=["Linear"], weights=_scheme_args(ct, key)), ref)
            tensors.update({f"{name}.{k}": v for k, v in packed.items()})

    # everything else of the model, under the Hugging Face names, in the export dtype
    config_dict = json.loads((src / HF_CONFIG).read_text())
    aliases = man.get("aliases", {})
    skip = tuple(n + "." for n in man["linears"])
    tied = {k for k in aliases if config_dict.get("tie_word_embeddings")}  # the loader ties them back
    for k, v in model.state_dict().items():
        if k.startswith(skip) or k in tied:
            continue
        tensors[k] = v.to(dt) if v.is_floating_point() else v
    for name in man["linears"]:
        b = model.get_submodule(name).bias
        if b is not None:
            tensors[f"{name}.bias"] = b.to(dt)
    biased = {n for n, i in man["linears"].items() if i["bias"]}
    config_dict, zeros = _fit_biases(config_dict, biased)
    for k in zeros:
        name = k[: -len(".bias")]
        tensors[k] = torch.zeros(model.get_submodule(name).out_features, dtype=dt)
    expected = _skeleton_keys(config_dict)
    dense = {k for k in tensors if not k.startswith(skip)} | {f"{n}.weight" for n in man["linears"]} \
        | {f"{n}.bias" for n in man["linears"] if f"{n}.bias" in tensors} | tied
    if dense != expected:
        raise ExportError(f"internal: the exported tensors do not match the Hugging Face model: missing "
                          f"{sorted(expected - dense)[:5]}, unexpected {sorted(dense - expected)[:5]}")
    config_dict["dtype"] = str(dt).replace("torch.", "")
    config_dict["architectures"] = config_dict.get("architectures") or man.get("architectures")  # vLLM needs it
    config_dict.pop("torch_dtype", None)
    config_dict.pop("quantization_config", None)

    quantized = set(man["linears"])
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or n in quantized]
    if len(groups) == 1:
        (key,) = groups
        config_groups = {"group_0": ct["Scheme"](targets=["Linear"], weights=_scheme_args(ct, key))}
    else:  # layers with different settings: one group each, targeted by exact name
        config_groups = {f"group_{i}": ct["Scheme"](targets=[f"re:^{n.replace('.', '[.]')}$" for n in names],
                                                     weights=_scheme_args(ct, key))
                         for i, (key, names) in enumerate(sorted(groups.items(), key=str))}
    qconfig = ct["Config"](config_groups=config_groups, format=ct["format"], quantization_status=ct["compressed"],
                           ignore=sorted(n for n in linears if n not in quantized))

    # write into a fresh sibling folder, then rename it into place: `out` is complete or absent
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / HF_CONFIG).write_text(json.dumps(config_dict, indent=2))
    ct["ModelCompressor"](quantization_config=qconfig).update_config(str(tmp))
    for p in src.iterdir():  # the tokenizer files
        if p.is_file() and p.name not in AQ_FILES and not p.name.endswith(".tmp"):
            shutil.copy2(p, tmp / p.name)
    if out.exists():
        out.rmdir()  # checked empty above
    os.replace(tmp, out)
    schemes = ", ".join(f"{len(n)} linears W{k[0]}{'g' + str(k[1]) if k[1] else ' per channel'}"
                        f"{' symmetric' if k[2] else ''}" for k, n in groups.items())
    rounded = "" if dt == torch.float32 else f", scales rounded to {config_dict['dtype']}"
    say(f"exported {src} to {out} as compressed-tensors pack-quantized ({schemes}; {config_dict['dtype']}{rounded})")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aq.export",
        description="Write an aq checkpoint (python -m aq.calibrate --out DIR) as a Hugging Face folder in "
                    "compressed-tensors' pack-quantized layout, loadable by transformers (with compressed-tensors "
                    "installed) and vLLM. Exact: the same integer codes, scales and zero points. Runs with block or "
                    "full norm transforms or quantized activations are refused (docs/export.md).")
    p.add_argument("--checkpoint", type=Path, required=True, help="aq checkpoint folder")
    p.add_argument("--format", default="compressed-tensors", choices=FORMATS, help="export format")
    p.add_argument("--out", type=Path, required=True, help="folder to write (new or empty)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype of the float tensors and scales; auto = the checkpoint's. Exact in float32 (aq's "
                        "default); bfloat16 / float16 (for serving) round each scale once")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    try:
        return export(args.checkpoint, args.out, args.format, args.dtype)
    except (ValueError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
