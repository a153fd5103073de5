"""Evaluation: perplexity with the GPTQ / OmniQuant / AffineQuant protocol.

Perplexity: the evaluation text's tokens are cut into non-overlapping windows of `seqlen` (2048) tokens (the tail that
does not fill a window is dropped); ppl = exp(mean over windows of the mean next-token cross-entropy in each window).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from aq import data


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, desc: str = "ppl") -> float:
    n = tokens.numel() // seqlen
    if n == 0:
        raise ValueError(f"{tokens.numel()} tokens are fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    dev = next(model.parameters()).device
    windows = tokens[: n * seqlen].view(n, seqlen)
    total = 0.0
    for i in tqdm(range(0, n, batch_size), desc=desc, leave=False):
        batch = windows[i:i + batch_size].to(dev)
        logits = model(batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
        total += loss.view(batch.shape[0], -1).mean(1).double().sum().item()
    return math.exp(total / n)


def perplexities(model, tokenizer, names=("wikitext2", "c4"), seqlen: int = 2048, max_windows: int | None = None,
                 batch_size: int = 1, label: str = "") -> dict[str, float]:
    out = {}
    for name in names:
        toks = data.eval_tokens(tokenizer, name)
        out[name] = perplexity(model, toks, seqlen, max_windows, batch_size, desc=f"{label} {name}".strip())
    return out
