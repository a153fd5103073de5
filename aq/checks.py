"""Checks of run arguments shared by the command lines and the Python API, so that both refuse the same things with
the same words, before any work (docs/errors.md lists what is refused and why).

- ``positive_int``: counts (segments, tokens, epochs, windows, batch sizes) are positive integers; 0 is refused, never
  read as "not given".
- ``check_seqlen``: a window or segment fits the model's context (``context_length`` of its config).
- ``check_windows``: a text has at least one window of the requested length.
- ``ignored_calibration_args``: command-line arguments that a mode or setting does not use (the caller warns).
"""
from __future__ import annotations

# config fields that bound the positions a model can take, first match wins (LLaMA family / OPT, GPT-2, others)
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def positive_int(value, name: str) -> int:
    """value itself when it is an integer >= 1; else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def context_length(config) -> tuple[int, str] | None:
    """(the most positions the model takes, the config field that says so), or None when its config names none."""
    for field in CONTEXT_FIELDS:
        v = getattr(config, field, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, field
    return None


def check_seqlen(config, seqlen: int, what: str = "seqlen") -> int:
    """seqlen when it is a positive integer no longer than the model's context."""
    positive_int(seqlen, what)
    ctx = context_length(config)
    if ctx is not None and seqlen > ctx[0]:
        raise ValueError(f"{what} {seqlen} is longer than the model's context of {ctx[0]} tokens ({ctx[1]} in its "
                         f"config): choose {ctx[0]} or fewer")
    return seqlen


def check_windows(n_tokens: int, seqlen: int, name: str, what: str = "evaluation") -> None:
    """A text of n_tokens tokens must hold at least one window of seqlen tokens."""
    if n_tokens < seqlen:
        raise ValueError(f"{what} text {name!r} has {n_tokens} tokens, fewer than one window of {seqlen}: give a "
                         "longer text or a smaller --seqlen")


# command-line destinations that only training uses (mode rtn ignores them), with their flags
_TRAINING_ARGS = {"epochs": "--epochs", "nsamples": "--nsamples", "calib_data": "--calib-data",
                  "batch_size": "--batch-size", "alpha_sf": "--alpha-sf", "smooth_alpha": "--smooth-alpha",
                  "lr_transform": "--lr-transform", "lr_clip": "--lr-clip", "no_lwc": "--no-lwc", "shifts": "--shifts",
                  "down_transform": "--down-transform", "norm_transform": "--norm-transform", "amp": "--amp",
                  "resume": "--resume", "seed": "--seed", "loss": "--loss", "sink_weight": "--sink-weight",
                  "gptq_hessian": "--gptq-hessian"}


def ignored_calibration_args(mode: str, weight_only: bool, given: set[str]) -> list[str]:
    """One message per given argument (argparse destinations that differ from their defaults) that the run will not
    use: training arguments under --mode rtn, --alpha-sf under omniquant (diagonal transforms only), and
    --norm-transform outside weight-only affinequant runs (those use diagonal transforms after the norms)."""
    out = []
    if mode == "rtn":
        for dest, flag in _TRAINING_ARGS.items():
            if dest in given:
                out.append(f"{flag} is not used with --mode rtn (round-to-nearest does not train)")
        return out
    if "gptq_hessian" in given and mode != "gptq" and "rounding" not in given:
        out.append("--gptq-hessian is not used here: it weighs GPTQ's Hessian (--mode gptq or --rounding gptq)")
    if "sink_weight" in given and "loss" not in given:
        out.append("--sink-weight is not used with the mse loss: it weighs position 0 in --loss token")
    if mode == "omniquant" and "alpha_sf" in given:
        out.append("--alpha-sf is not used with --mode omniquant (its transforms are diagonal)")
    if "norm_transform" in given and (mode != "affinequant" or not weight_only):
        out.append("--norm-transform is not used here: it sets the form of the transforms after the norms in "
                   "weight-only affinequant runs; this run uses diagonal ones (folded into the norms)")
    return out
