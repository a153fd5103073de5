"""Evaluation: perplexity with the GPTQ / OmniQuant / AffineQuant protocol, zero-shot accuracy, `python -m aq.eval`.

Perplexity: the evaluation text's tokens are cut into non-overlapping windows of `seqlen` (2048) tokens (the tail that
does not fill a window is dropped); ppl = exp(mean over windows of the mean next-token cross-entropy in each window).

Zero-shot (PIQA, ARC-easy, ARC-challenge, BoolQ, HellaSwag, WinoGrande; examples from aq.data.load_zeroshot): each
option is a (context, continuation) pair scored by the summed log-probability of the continuation's tokens, as lm-eval
scores multiple choice: acc takes the option of highest log-likelihood, acc_norm divides each by the option's length
in characters first. WinoGrande is partial scoring: the same continuation after each filled-in context.

    python -m aq.eval --model smollm2                          # FP
    python -m aq.eval --model smollm2 --rtn W4A16g64 --patch  # round-to-nearest, run on aq's kernels
    python -m aq.eval --checkpoint runs/aq_w4a4 --patch        # a calibrated checkpoint (aq.checkpoint)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from aq import checks, data


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, desc: str = "ppl") -> float:
    config = getattr(model, "config", None)
    checks.check_seqlen(config, seqlen, "perplexity window (seqlen)")
    checks.positive_int(batch_size, "batch_size")
    if max_windows is not None:
        checks.positive_int(max_windows, "max_windows")
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


@torch.no_grad()
def logit_error(reference, model, tokens: torch.Tensor, windows: int, seqlen: int = 2048) -> float:
    """||logits(model) - logits(reference)|| / ||logits(reference)|| over the first `windows` windows of tokens (how
    far a patched model is from the fake-quantized one it was made from)."""
    num = den = 0.0
    dev = next(reference.parameters()).device
    for i in range(min(windows, tokens.numel() // seqlen)):
        x = tokens[i * seqlen:(i + 1) * seqlen][None].to(dev)
        a = reference(x, use_cache=False).logits.float()
        b = model(x, use_cache=False).logits.float()
        num += (a - b).pow(2).sum().item()
        den += a.pow(2).sum().item()
    return (num / den) ** 0.5


def eval_token_sets(tokenizer, names, seqlen: int = 2048) -> dict[str, torch.Tensor]:
    """{name: token ids} of each evaluation text, after checking that each holds at least one window of seqlen
    (so that a short text is refused before a run spends any time, not after)."""
    out = {}
    for name in names:
        out[name] = data.eval_tokens(tokenizer, name)
        checks.check_windows(out[name].numel(), seqlen, name)
    return out


def perplexities(model, tokenizer, names=("wikitext2", "c4"), seqlen: int = 2048, max_windows: int | None = None,
                 batch_size: int = 1, label: str = "") -> dict[str, float]:
    """Perplexity of each set; names: set names or files, or the {name: token ids} of eval_token_sets."""
    sets = names if isinstance(names, dict) else eval_token_sets(tokenizer, names, seqlen)
    return {name: perplexity(model, toks, seqlen, max_windows, batch_size, desc=f"{label} {name}".strip())
            for name, toks in sets.items()}


# ---------------------------------------------------------------------------------------------------------- zero-shot
def _split_trailing_spaces(context: str, continuation: str) -> tuple[str, str]:
    n_sp = len(context) - len(context.rstrip(" "))
    return (context[:-n_sp], context[-n_sp:] + continuation) if n_sp else (context, continuation)


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of each (context, continuation) as lm-eval splits them: spaces that end the context move to the
    continuation, the pair is encoded as one string and cut where the context's own encoding ends (so a token that
    merges across the boundary is not counted twice). No special tokens (lm-eval's default for causal LMs).
    Encoded in batches (one tokenizer call per 4096 strings)."""
    pairs = [_split_trailing_spaces(c, t) for c, t in pairs]
    ctxs = sorted({c for c, _ in pairs})
    wholes = [c + t for c, t in pairs]

    def enc(texts):
        out = []
        for i in range(0, len(texts), 4096):
            out += tokenizer(texts[i:i + 4096], add_special_tokens=False)["input_ids"]
        return out

    ctx_ids = dict(zip(ctxs, enc(ctxs)))
    res = []
    for (c, _), w in zip(pairs, enc(wholes)):
        n = len(ctx_ids[c])
        res.append((w[:n], w[n:]))
    return res


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], max_length: int = 2048,
                   batch_tokens: int = 8192, desc: str = "loglik") -> list[float]:
    """Sum of log p(continuation | context) for each (context, continuation), scored in batches of similar length.

    Sequences longer than max_length lose tokens from the left of the context. An empty context is scored after the
    tokenizer's EOS (or BOS) token."""
    dev = next(model.parameters()).device
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    seqs = []
    for (_ctx, cont), (c, t) in zip(requests, encode_pairs(tokenizer, requests)):
        if not t:
            raise ValueError(f"continuation {cont!r} encodes to no tokens")
        if not c:
            c = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id]
        ids = (c + t)[-(max_length + 1):]
        # inputs, targets, how many targets (at the end) are scored
        seqs.append((ids[:-1], ids[1:], min(len(t), len(ids) - 1)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out = [0.0] * len(seqs)
    batches, cur = [], []
    for i in order:  # longest first: the first batch shows at once whether memory suffices
        if cur and (len(cur) + 1) * len(seqs[cur[0]][0]) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    for b in tqdm(batches, desc=desc, leave=False):
        T = len(seqs[b[0]][0])
        inp = torch.full((len(b), T), pad, dtype=torch.long)
        for r, i in enumerate(b):  # right padding: causal attention keeps real tokens from seeing the pads
            x = seqs[i][0]
            inp[r, :len(x)] = torch.tensor(x)
        logits = model(inp.to(dev), use_cache=False).logits
        rows, cols, tgt, seg = [], [], [], []
        for r, i in enumerate(b):  # the scored positions of the whole batch, gathered at once
            x, y, n = seqs[i]
            rows += [r] * n
            cols += range(len(x) - n, len(x))
            tgt += y[-n:]
            seg += [r] * n
        sel = logits[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)].float()
        lp = F.log_softmax(sel, dim=-1).gather(-1, torch.tensor(tgt, device=dev)[:, None]).squeeze(-1)
        sums = torch.zeros(len(b), dtype=torch.float64, device=dev).index_add_(0, torch.tensor(seg, device=dev),
                                                                                lp.double())
        for r, v in zip(b, sums.tolist()):
            out[r] = v
    return out


def score_examples(lls: list[list[float]], examples: list[dict]) -> dict[str, float]:
    """acc: the option of highest log-likelihood is the gold one; acc_norm: the same with each log-likelihood divided
    by its option's length in characters (lm-eval's acc_norm)."""
    acc = accn = 0
    for ll, ex in zip(lls, examples):
        acc += int(max(range(len(ll)), key=lambda j: ll[j]) == ex["gold"])
        norm = [v / max(1, len(ex["continuations"][j].lstrip(" "))) for j, v in enumerate(ll)]
        accn += int(max(range(len(norm)), key=lambda j: norm[j]) == ex["gold"])
    n = len(examples)
    return {"acc": acc / n, "acc_norm": accn / n, "n": n}


def zeroshot(model, tokenizer, tasks=data.ZEROSHOT_TASKS, limit: int | None = None, batch_tokens: int = 8192,
             max_length: int = 2048, label: str = "") -> dict[str, dict[str, float]]:
    """Zero-shot accuracy (acc, acc_norm) of each task by log-likelihood scoring; limit: first N examples per task.
    WinoGrande reports acc_norm equal to acc (its options share one continuation)."""
    out = {}
    for task in tasks:
        exs = data.load_zeroshot(task, limit)
        reqs = [(c, t) for ex in exs for c, t in zip(ex["contexts"], ex["continuations"])]
        flat = loglikelihoods(model, tokenizer, reqs, max_length, batch_tokens, desc=f"{label} {task}".strip())
        lls, k = [], 0
        for ex in exs:
            lls.append(flat[k:k + len(ex["contexts"])])
            k += len(ex["contexts"])
        out[task] = score_examples(lls, exs)
        if task == "winogrande":
            out[task]["acc_norm"] = out[task]["acc"]
    return out


# ------------------------------------------------------------------------------------------------------------- CLI
PPL_SETS = data.NAMES
# acc_norm where lm-eval-based papers report it (length-normalised), acc elsewhere
HEADLINE_METRIC = {"piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "boolq": "acc",
                   "hellaswag": "acc_norm", "winogrande": "acc"}


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per setting; perplexities, then each task's headline metric (%), then their mean."""
    ppl_cols = [s for s in PPL_SETS if any(s in r.get("perplexity", {}) for r in rows.values())]
    zs_cols = [t for t in data.ZEROSHOT_TASKS if any(t in r.get("zeroshot", {}) for r in rows.values())]
    head = ["setting"] + [f"{s} ppl" for s in ppl_cols] + [f"{t} ({HEADLINE_METRIC[t]})" for t in zs_cols]
    if zs_cols:
        head.append("avg")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name] + [f"{r['perplexity'][s]:.2f}" if s in r.get("perplexity", {}) else "-" for s in ppl_cols]
        accs = [100 * r["zeroshot"][t][HEADLINE_METRIC[t]] for t in zs_cols if t in r.get("zeroshot", {})]
        cells += [f"{100 * r['zeroshot'][t][HEADLINE_METRIC[t]]:.2f}" if t in r.get("zeroshot", {}) else "-"
                  for t in zs_cols]
        if zs_cols:
            cells.append(f"{sum(accs) / len(accs):.2f}" if len(accs) == len(zs_cols) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate(model, tokenizer, tasks, *, seqlen=2048, eval_windows=None, ppl_batch=1, limit=None,
             batch_tokens=8192, label="") -> dict:
    """Perplexity of the tasks that are perplexity sets and zero-shot accuracy of the others."""
    ppl = [t for t in tasks if t in PPL_SETS or t.endswith((".txt", ".json", ".jsonl"))]
    zs = [t for t in tasks if t in data.ZEROSHOT_TASKS]
    res = {}
    if ppl:
        res["perplexity"] = perplexities(model, tokenizer, ppl, seqlen, eval_windows, ppl_batch, label)
    if zs:
        res["zeroshot"] = zeroshot(model, tokenizer, zs, limit, batch_tokens, seqlen, label)
    return res


def _parse_setting(s: str):
    """'W4A16g64', 'W4A4', 'w3a16g128' -> QuantConfig."""
    import re

    from aq.config import QuantConfig

    m = re.fullmatch(r"[wW](\d)[aA](\d+)(?:[gG](\d+))?", s)
    if not m:
        raise ValueError(f"setting {s!r} is not of the form W<bits>A<bits>[g<group>], e.g. W4A16g64 or W4A4")
    return QuantConfig(wbits=int(m[1]), abits=int(m[2]), group_size=int(m[3]) if m[3] else None, mode="rtn")


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m aq.eval",
        description="Evaluate a causal LM: perplexity (WikiText-2, C4) and zero-shot accuracy (PIQA, ARC-e, ARC-c, "
                    "BoolQ, HellaSwag, WinoGrande) by log-likelihood scoring. The model is FP (--model), "
                    "fake-quantized (--checkpoint DIR from `python -m aq.calibrate --out DIR`, or --rtn W4A16g64) or, "
                    "with --patch, running aq's W4A16 / W4A4 / W8A8 kernels (every setting aq calibrates). Data "
                    "resolve from $AQ_DATA_DIR, else the hub.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="FP model: folder, .gguf, hub id or 'smollm2' (default when no "
                   "--checkpoint); with --checkpoint, where the tokenizer comes from if the checkpoint has none")
    p.add_argument("--checkpoint", default=None, help="an aq checkpoint folder (the fake-quantized model)")
    p.add_argument("--rtn", default=None, help="quantize the FP model round-to-nearest first, e.g. W4A16g64, W4A4")
    p.add_argument("--patch", action="store_true", help="run the quantized linears on aq's Triton kernels")
    p.add_argument("--tasks", default=",".join(PPL_SETS + data.ZEROSHOT_TASKS),
                   help="comma-separated: wikitext2, c4 (or a text file) for perplexity; zero-shot task names")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each zero-shot task (default all)")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window and zero-shot max length")
    p.add_argument("--eval-windows", type=int, default=None, help="first N perplexity windows (default all)")
    p.add_argument("--ppl-batch", type=int, default=None, help="windows per forward (default 8 on GPU, 1 on CPU)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="zero-shot tokens per forward (default 16384 on GPU, 2048 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--label", default=None, help="row name in the table (default from the settings)")
    p.add_argument("--out", default=None, help="write the results as JSON here (and the table beside it as .md)")
    return p


def load_for_eval(args):
    """(model, tokenizer, label) from the CLI arguments."""
    from aq import models
    from aq.calib.rtn import quantize_rtn

    dtype = getattr(torch, args.dtype)
    tok = None
    if args.checkpoint:
        from pathlib import Path

        from aq.checkpoint import load_checkpoint, read_manifest

        man = read_manifest(args.checkpoint)
        model = load_checkpoint(args.checkpoint, device=args.device, dtype=dtype)
        mode = man["quant_config"].get("mode", "")
        label = f"{_MODE_NAMES.get(mode, mode)} " + _label(man["quant_config"])
        if (Path(args.checkpoint) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args.checkpoint)
        else:
            src = args.model or man.get("base_model") or models.DEFAULT_MODEL
            if args.model and man.get("base_model") and args.model != man["base_model"]:
                print(f"warning: the tokenizer comes from --model {args.model}, the checkpoint was made from "
                      f"{man['base_model']}", flush=True)
            from transformers import AutoTokenizer

            s, gguf = models._resolve(src)
            tok = AutoTokenizer.from_pretrained(s, **({"gguf_file": gguf} if gguf else {}))
    else:
        model, tok = models.load_model(args.model or models.DEFAULT_MODEL, dtype, args.device)
        label = "FP"
        if args.rtn:
            cfg = _parse_setting(args.rtn)
            quantize_rtn(model, cfg)
            label = f"RTN {cfg.label}"
    if args.patch:
        from aq.patch import patch_model

        patch_model(model)
        label += " (aq kernels)"
    return model, tok, args.label or label


_MODE_NAMES = {"rtn": "RTN", "omniquant": "OmniQuant", "affinequant": "AffineQuant"}


def _label(qc: dict) -> str:
    g = f"g{qc['group_size']}" if qc.get("group_size") else ""
    return f"W{qc['wbits']}A{qc['abits']}{g}"


def main(argv: list[str] | None = None) -> dict:
    import json
    import sys
    import time
    from pathlib import Path

    args = build_parser().parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    try:
        for t in tasks:
            if t not in data.ZEROSHOT_TASKS:
                data.check_name(t)
        if args.rtn:
            _parse_setting(args.rtn)
        if args.checkpoint and args.rtn:
            raise ValueError("--checkpoint and --rtn exclude each other")
        if args.checkpoint and args.model and (Path(args.checkpoint) / "tokenizer_config.json").is_file():
            raise ValueError(f"--model {args.model} is not used with --checkpoint: the checkpoint holds the model and "
                             "its tokenizer (--model names the tokenizer only for a checkpoint saved without one); "
                             "drop --model")
        checks.positive_int(args.seqlen, "--seqlen")
        for flag in ("limit", "eval_windows", "ppl_batch", "batch_tokens"):
            if getattr(args, flag) is not None:
                checks.positive_int(getattr(args, flag), "--" + flag.replace("_", "-"))
        data.data_dir()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    ppl_tasks = [t for t in tasks if t not in data.ZEROSHOT_TASKS]
    zs, ppl = tasks != ppl_tasks, bool(ppl_tasks)
    for flag, needs, kind in (("limit", zs, "zero-shot"), ("batch_tokens", zs, "zero-shot"),
                              ("eval_windows", ppl, "perplexity"), ("ppl_batch", ppl, "perplexity")):
        if getattr(args, flag) is not None and not needs:
            print(f"warning: --{flag.replace('_', '-')} is not used: --tasks has no {kind} task", flush=True)
    on_gpu = torch.device(args.device).type == "cuda"
    t0 = time.time()
    try:
        model, tok, label = load_for_eval(args)
        checks.check_seqlen(model.config, args.seqlen, "--seqlen")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"{label}: loaded in {time.time() - t0:.1f}s on {args.device}", flush=True)
    res = evaluate(model, tok, tasks, seqlen=args.seqlen, eval_windows=args.eval_windows,
                   ppl_batch=args.ppl_batch or (8 if on_gpu else 1), limit=args.limit,
                   batch_tokens=args.batch_tokens or (16384 if on_gpu else 2048), label=label)
    res.update(setting=label, seconds=time.time() - t0, limit=args.limit, eval_windows=args.eval_windows,
               device=torch.cuda.get_device_name() if on_gpu else "cpu", dtype=args.dtype)
    table = format_table({label: res})
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for path, text in ((out, json.dumps(res, indent=2)), (out.with_suffix(".md"), table + "\n")):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return res


if __name__ == "__main__":
    main()
