"""Calibration and evaluation data, by name ("wikitext2", "c4") or by file path.

Names resolve from the folder in the environment variable AQ_DATA_DIR when it is set (layout:
wikitext-2-raw-v1/test.jsonl, c4/c4-train.00000-of-01024.first1000.jsonl, zeroshot/*.jsonl), else from the Hugging Face
hub. Everything goes through `datasets.load_dataset`.

- wikitext2: evaluation on the test split; calibration on the train split (hub only: the local folder has no train
  split).
- c4: the first 1000 documents of train shard 0; documents [0, 800) calibrate, [800, 1000) are the held-out evaluation
  set.
- a file: .txt (the whole text) or .json/.jsonl (rows with a "text" field), used as is for either purpose.
Evaluation text is the "\\n\\n"-join of the rows (the GPTQ / OmniQuant / AffineQuant protocol).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

DATA_ENV = "AQ_DATA_DIR"
NAMES = ("wikitext2", "c4")
C4_CALIB_DOCS = (0, 800)
C4_EVAL_DOCS = (800, 1000)
_LOCAL = {
    "wikitext2": "wikitext-2-raw-v1/test.jsonl",
    "c4": "c4/c4-train.00000-of-01024.first1000.jsonl",
}


def data_dir() -> Path | None:
    """The local data folder from AQ_DATA_DIR, or None when unset. A set but missing folder is an error."""
    d = os.environ.get(DATA_ENV)
    if not d:
        return None
    p = Path(d).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{DATA_ENV}={d} is not a folder (it should hold wikitext-2-raw-v1/, c4/, zeroshot/)")
    return p


def _is_file_spec(name: str) -> bool:
    return name not in NAMES and (os.sep in name or Path(name).suffix in (".txt", ".json", ".jsonl"))


def check_name(name: str) -> None:
    """Fail early on a dataset that is neither a known name nor an existing file."""
    if name in NAMES:
        return
    if _is_file_spec(name):
        if not Path(name).expanduser().is_file():
            raise FileNotFoundError(f"data file {name} does not exist")
        return
    raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(NAMES)} or a path to a .txt/.json/.jsonl file")


def _load_json_rows(path: Path) -> list[str]:
    import datasets

    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    if "text" not in ds.column_names:
        raise ValueError(f"{path} has no 'text' field (columns: {ds.column_names})")
    return list(ds["text"])


def _load_hub_rows(name: str, split: str) -> list[str]:
    import datasets

    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        else:
            ds = datasets.load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                                       split="train[:1000]")
    except Exception as e:  # offline, hub down, auth...: one clear message
        raise FileNotFoundError(
            f"dataset {name!r} is not reachable: {DATA_ENV} is not set and the hub failed ({type(e).__name__}: {e}). "
            f"Set {DATA_ENV} to a local data folder."
        ) from e
    return list(ds["text"])


def load_rows(name: str, purpose: str) -> list[str]:
    """Text rows of a dataset for purpose "eval" or "calib"."""
    if purpose not in ("eval", "calib"):
        raise ValueError(f"purpose must be 'eval' or 'calib', got {purpose!r}")
    check_name(name)
    if name not in NAMES:
        p = Path(name).expanduser()
        return [p.read_text()] if p.suffix == ".txt" else _load_json_rows(p)
    root = data_dir()
    if name == "wikitext2" and purpose == "calib":
        if root is not None:
            raise FileNotFoundError(
                f"wikitext2 calibration needs the train split, which {DATA_ENV}={root} does not hold; "
                "calibrate on c4 or a file instead")
        return _load_hub_rows(name, "train")
    if root is not None:
        f = root / _LOCAL[name]
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found in {DATA_ENV}={root}")
        rows = _load_json_rows(f)
    else:
        rows = _load_hub_rows(name, "test")
    if name == "c4":
        lo, hi = C4_EVAL_DOCS if purpose == "eval" else C4_CALIB_DOCS
        rows = rows[lo:hi]
    return rows


def _encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, return_tensors=None)["input_ids"], dtype=torch.long)


def eval_tokens(tokenizer, name: str) -> torch.Tensor:
    """1-D token ids of the evaluation text ("\\n\\n"-joined rows)."""
    return _encode(tokenizer, "\n\n".join(load_rows(name, "eval")))


def calib_segments(tokenizer, source, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] random token windows of the calibration text, reproducible by seed. source: a data name or
    file (its calibration rows, "\n\n"-joined), a list of texts ("\n\n"-joined), a 1-D token tensor (windows drawn
    from it) or a 2-D [N, T] token tensor (used as the segments themselves)."""
    if isinstance(source, torch.Tensor):
        if source.dim() == 2:
            return source.long()
        if source.dim() != 1:
            raise ValueError(f"calibration tokens must be 1-D ids or [N, T] segments, got shape {tuple(source.shape)}")
        ids, what = source.long(), "the calibration token tensor"
    elif isinstance(source, str):
        ids, what = _encode(tokenizer, "\n\n".join(load_rows(source, "calib"))), f"calibration data {source!r}"
    elif isinstance(source, (list, tuple)) and all(isinstance(t, str) for t in source):
        ids, what = _encode(tokenizer, "\n\n".join(source)), "the calibration texts"
    else:
        raise ValueError("calibration data must be a data name or file, a list of texts or a token tensor, "
                         f"got {type(source).__name__}")
    if ids.numel() <= seqlen:
        raise ValueError(f"{what} has {ids.numel()} tokens, fewer than one segment of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


# ------------------------------------------------------------------------------------------------- zero-shot tasks
# The six zero-shot tasks of the AffineQuant paper. Every task loads as a list of examples
#   {"contexts": [str, ...], "continuations": [str, ...], "gold": int, "choices": [str, ...]}
# (one (context, continuation) pair per option; the answer is the option whose continuation is most likely).
# Prompts follow lm-eval's templates: an "Answer:" cue after the question for PIQA, ARC and BoolQ, the continuation
# separated from its context by one space; WinoGrande is partial scoring (the same continuation after each context).
ZEROSHOT_TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande")
_HUB_ZEROSHOT = {  # (dataset, config, split) on the Hugging Face hub
    "piqa": ("ybisk/piqa", None, "validation"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "boolq": ("super_glue", "boolq", "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
}


def _hellaswag_clean(text: str) -> str:
    import re

    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _from_hub(task: str, row: dict) -> dict:
    """A hub row in the local files' format ({"query", "choices", "gold"} or winogrande's fields)."""
    if task == "piqa":
        return {"query": f"Question: {row['goal']}\n", "choices": [row["sol1"], row["sol2"]], "gold": int(row["label"])}
    if task.startswith("arc"):
        labels = list(row["choices"]["label"])
        return {"query": f"Question: {row['question']}", "choices": list(row["choices"]["text"]),
                "gold": labels.index(row["answerKey"])}
    if task == "boolq":
        return {"query": f"Passage: {row['passage']}\nQuestion: {row['question']}?", "choices": ["no", "yes"],
                "gold": int(row["label"])}
    if task == "hellaswag":
        ctx = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b']}"
        return {"query": _hellaswag_clean(ctx), "choices": [_hellaswag_clean(e) for e in row["endings"]],
                "gold": int(row["label"])}
    if task == "winogrande":
        s = row["sentence"]
        i = s.index("_")
        return {"context_options": [s[:i] + row["option1"], s[:i] + row["option2"]],
                "continuation": s[i + 1:].strip(), "gold": int(row["answer"]) - 1}
    raise ValueError(task)


def _zeroshot_example(task: str, row: dict) -> dict:
    """A stored row -> {"contexts", "continuations", "gold", "choices"} (the prompts lm-eval scores)."""
    if task == "winogrande":
        ctxs = list(row["context_options"])
        return {"contexts": ctxs, "continuations": [" " + row["continuation"]] * len(ctxs), "gold": int(row["gold"]),
                "choices": ctxs}
    q, choices = row["query"], list(row["choices"])
    if task in ("piqa", "arc_easy", "arc_challenge", "boolq"):
        q = q + ("Answer:" if q.endswith("\n") else "\nAnswer:")
    return {"contexts": [q] * len(choices), "continuations": [" " + c for c in choices], "gold": int(row["gold"]),
            "choices": choices}


def load_zeroshot(task: str, limit: int | None = None) -> list[dict]:
    """Examples of a zero-shot task (see ZEROSHOT_TASKS), from $AQ_DATA_DIR/zeroshot/<task>.jsonl when the variable
    is set, else from the hub. limit: the first N examples (in file order)."""
    if task not in ZEROSHOT_TASKS:
        raise ValueError(f"unknown zero-shot task {task!r}: use one of {', '.join(ZEROSHOT_TASKS)}")
    import datasets

    root = data_dir()
    if root is not None:
        f = root / "zeroshot" / f"{task}.jsonl"
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found in {DATA_ENV}={root}")
        rows = list(datasets.load_dataset("json", data_files=str(f), split="train"))
    else:
        name, config, split = _HUB_ZEROSHOT[task]
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:
            raise FileNotFoundError(
                f"zero-shot task {task!r} is not reachable: {DATA_ENV} is not set and the hub failed "
                f"({type(e).__name__}: {e}). Set {DATA_ENV} to a local data folder with zeroshot/{task}.jsonl."
            ) from e
        rows = [_from_hub(task, r) for r in ds]
    if limit is not None:
        rows = rows[:limit]
    out = []
    for i, r in enumerate(rows):
        try:
            ex = _zeroshot_example(task, r)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{task} row {i} is malformed ({type(e).__name__}: {e})") from None
        if not 0 <= ex["gold"] < len(ex["contexts"]):
            raise ValueError(f"{task} row {i}: gold {ex['gold']} is not one of its {len(ex['contexts'])} options")
        out.append(ex)
    return out
