"""QuantConfig: the one plain dataclass that describes a quantization run (what to quantize and how to calibrate)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from aq.checks import positive_int
from aq.primitives import check_bits

MODES = ("rtn", "gptq", "omniquant", "affinequant")
# Form of the transforms that follow a norm (A_qkv, A_up) in weight-only affinequant runs. Weight-activation runs and
# omniquant always use "diagonal" there (it folds into the norm weight; the activations are quantized right after).
NORM_TRANSFORMS = ("full", "block", "diagonal")
# final rounding of the merged weights in omniquant/affinequant: round-to-nearest, or GPTQ with the learned clipping
ROUNDINGS = ("rtn", "gptq")
# block:64 on SmolLM2 W4A16g64 (paper data and epochs): 24.58 / 24.19 in two runs vs full 24.23, diagonal 24.44 --
# within noise of the paper's full form at 1/9 of its inference cost (bench/results/calib_smollm2.md)
DEFAULT_NORM_TRANSFORM = "block"
DEFAULT_NORM_BLOCK = 64
# Token weights of GPTQ's Hessian (aq.calib.gptq.Hessian): "raw" is the paper's H = 2 X^T X / n, which on SmolLM2 the
# massive-activation tokens own; "normalized" scales every token's input row to unit norm first, so each token counts
# once (bench/NOTES-accuracy.md, GPTQ).
GPTQ_HESSIANS = ("raw", "normalized")
# Block-wise reconstruction loss (aq.calib.loss): "mse" is the paper's; "token" weighs every token by its error relative
# to its own size (what the next RMSNorm sees), so the attention-sink token no longer owns the loss.
LOSSES = ("mse", "token")
# Rotation of the residual stream folded into the weights before calibration (aq.calib.rotation).
ROTATIONS = ("none", "hadamard", "random")
# SmoothQuant migration strength of the initial transforms (aq.calib.loop): stronger when activations get few bits
SMOOTH_ALPHA = {"low_abits": 0.75, "other": 0.5}
CPU_SCHEDULE = {"nsamples": 4, "seqlen": 256, "epochs": 2}  # the short schedule used without a GPU (minutes on a CPU)
GPU_SCHEDULE = {"nsamples": 128, "seqlen": 2048}           # the paper's
AUTO = "auto"


@dataclass
class QuantConfig:
    # what is quantized
    wbits: int = 4
    abits: int = 16              # 16 = activations stay in floating point (weight-only)
    group_size: int | str | None = AUTO  # None = per output channel; auto = 64 weight-only, per channel otherwise
    symmetric: bool = False
    mode: str = "affinequant"
    # transforms (mode affinequant / omniquant)
    norm_transform: str = DEFAULT_NORM_TRANSFORM
    norm_block: int = DEFAULT_NORM_BLOCK  # block size of the "block" form
    alpha_sf: float | None = None  # stability factor; None = by model size and bits (auto_alpha_sf); omniquant: 0
    smooth_alpha: float | None = None  # SmoothQuant alpha of the initial scales; None = 0.75 at abits <= 4, else 0.5
    act_order: bool = False      # mode gptq: columns in order of decreasing Hessian diagonal
    rounding: str = "rtn"        # omniquant / affinequant: final rounding of the merged weights (ROUNDINGS)
    gptq_hessian: str = "raw"    # GPTQ (mode gptq, rounding gptq): token weights of the Hessian (GPTQ_HESSIANS)
    lwc: bool = True             # learnable weight clipping
    shifts: bool | None = None   # learnable shifts; None = weight-activation runs where the producer has a bias
    # a learnable diagonal transform between up_proj's rows and down_proj's columns (not in the paper; exact for
    # SwiGLU, folded into both weights); None = weight-activation runs, where down_proj's input is quantized per token
    down_transform: bool | None = None
    # schedule
    epochs: int | None = None    # None = 20 (40 for 2-bit weights), the paper's schedule
    # None: the paper's 128 x 2048 (epochs above: 20/40), or the short CPU schedule when resolved for a CPU with all
    # three of nsamples, seqlen and epochs left None
    nsamples: int | None = None
    seqlen: int | None = None
    batch_size: int = 1          # segments per optimizer step (the paper: 1)
    calib_data: str = "c4"
    lr_transform: float = 5e-3
    lr_clip: float = 1e-2
    loss: str = "mse"            # aq.calib.loss.layer_loss kind
    sink_weight: float = 1.0     # weight of position 0 in the "token" loss
    rotate: str = "none"         # residual-stream rotation before calibration (aq.calib.rotation)
    seed: int = 0

    def __post_init__(self):
        check_bits(self.wbits, "wbits")
        if self.abits != 16:
            check_bits(self.abits, "abits")
        g = self.group_size
        if g is not None and g != AUTO and (isinstance(g, bool) or not isinstance(g, int) or g <= 0):
            raise ValueError(f"group size must be a positive integer or None (per channel) or 'auto', "
                             f"got {self.group_size!r}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: choose from {', '.join(MODES)}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}: choose from {', '.join(ROUNDINGS)}")
        if self.gptq_hessian not in GPTQ_HESSIANS:
            raise ValueError(f"unknown GPTQ Hessian {self.gptq_hessian!r}: choose from {', '.join(GPTQ_HESSIANS)}")
        if self.rounding != "rtn" and self.mode not in ("omniquant", "affinequant"):
            raise ValueError(f"rounding {self.rounding!r} is for omniquant/affinequant (learned transforms, then "
                             f"{self.rounding}); mode {self.mode} has its own rounding")
        if self.norm_transform not in NORM_TRANSFORMS:
            raise ValueError(f"unknown norm transform {self.norm_transform!r}: choose from "
                             f"{', '.join(NORM_TRANSFORMS)}")
        positive_int(self.norm_block, "norm block")
        if self.alpha_sf is not None and not 0 <= self.alpha_sf <= 1:
            raise ValueError(f"alpha_sf (stability factor) must be in [0, 1], got {self.alpha_sf}")
        if self.smooth_alpha is not None and not 0 <= self.smooth_alpha <= 1:
            raise ValueError(f"smooth_alpha (SmoothQuant alpha) must be in [0, 1], got {self.smooth_alpha}")
        if self.epochs is not None:
            positive_int(self.epochs, "epochs")
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) is not None or name == "batch_size":
                positive_int(getattr(self, name), name)
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: choose from {', '.join(LOSSES)}")
        if self.rotate not in ROTATIONS:
            raise ValueError(f"unknown rotation {self.rotate!r}: choose from {', '.join(ROTATIONS)}")
        if not self.sink_weight >= 0:
            raise ValueError(f"sink weight must be >= 0, got {self.sink_weight!r}")
        for name in ("lr_transform", "lr_clip"):
            v = getattr(self, name)
            if not v > 0:
                raise ValueError(f"{name} must be positive, got {v!r}")

    def short_schedule(self, device=None) -> bool:
        """Whether resolving for `device` picks the short CPU schedule (a trained mode, schedule left unset)."""
        on_cpu = device is not None and str(device).split(":")[0] == "cpu"
        return on_cpu and self.mode != "rtn" and self.nsamples is None and self.seqlen is None and self.epochs is None

    def resolve(self, model_or_hidden=None, device=None) -> "QuantConfig":
        """A copy with every "auto" / None decided, the one place where they are (the API and the CLI both use it;
        everything downstream reads the resolved fields): group size, stability factor, SmoothQuant alpha, the form
        of the norm-side transforms, shifts, the down transform and the schedule.
        model_or_hidden: the model (or its hidden size) -- alpha_sf depends on it and stays None without one (but for
        omniquant, whose transforms are diagonal: 0); device: "cpu" picks the short CPU schedule when nsamples, seqlen
        and epochs are all None. Idempotent."""
        short = self.short_schedule(device)
        sched = CPU_SCHEDULE if short else {**GPU_SCHEDULE, "epochs": 40 if self.wbits <= 2 else 20}
        group = self.group_size
        if group == AUTO:  # the W4A4 kernel takes per-channel weights; weight-only runs use groups of 64
            group = 64 if self.weight_only else None
        alpha = self.alpha_sf
        if self.mode == "omniquant":
            alpha = 0.0  # diagonal transforms only: nothing off the diagonal to scale
        elif alpha is None and model_or_hidden is not None:
            hidden = model_or_hidden if isinstance(model_or_hidden, int) else _hidden_size(model_or_hidden)
            alpha = auto_alpha_sf(hidden, self.wbits, self.abits)
        smooth = self.smooth_alpha
        if smooth is None:
            smooth = SMOOTH_ALPHA["low_abits" if self.abits <= 4 else "other"]
        trained = self.mode != "rtn"
        return replace(
            self, group_size=group, alpha_sf=alpha, smooth_alpha=smooth, norm_transform=self.norm_form,
            # shifts: weight-activation runs, where the producer has a bias (the loop skips bias-free producers)
            shifts=self.shifts if self.shifts is not None else (trained and not self.weight_only),
            down_transform=self.down_on,
            epochs=self.epochs if self.epochs is not None else sched["epochs"],
            nsamples=self.nsamples if self.nsamples is not None else sched["nsamples"],
            seqlen=self.seqlen if self.seqlen is not None else sched["seqlen"])

    @property
    def weight_only(self) -> bool:
        return self.abits >= 16

    @property
    def down_on(self) -> bool:
        """Whether the up -> down diagonal transform is used (trained modes only)."""
        if self.mode in ("rtn", "gptq"):
            return False
        return self.down_transform if self.down_transform is not None else not self.weight_only

    @property
    def norm_form(self) -> str:
        """Form of A_qkv / A_up actually used: diagonal unless affinequant weight-only."""
        if self.mode != "affinequant" or not self.weight_only:
            return "diagonal"
        return self.norm_transform

    @property
    def label(self) -> str:
        group = self.resolve().group_size
        g = f"g{group}" if group else ""
        return f"W{self.wbits}A{self.abits}{g}"

    def to_dict(self) -> dict:
        return asdict(self)


def auto_alpha_sf(hidden: int, wbits: int, abits: int) -> float:
    """Stability factor by the paper's settings: 1.0 for small models (hidden <= 1024, as OPT-125M) at >= 3 bits,
    0.1 for W4A4-like settings, small models at 2 bits and larger models with activation quantization, 1e-2 for larger
    models weight-only (the paper's LLaMA setting)."""
    if abits <= 4:
        return 0.1
    if hidden <= 1024:
        return 1.0 if wbits >= 3 else 0.1
    return 1e-2 if abits >= 16 else 0.1


def _hidden_size(model) -> int:
    from aq import models  # lazy: models imports heavy libraries
    return models.geometry(model).hidden
