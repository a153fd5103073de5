import json
import math

import pytest
import torch

from aq import data, eval as aq_eval
from tests.conftest import make_tokenizer, tiny_llama

ZS_ROWS = {
    "piqa": [{"query": "Question: How to open a jar?\n", "choices": ["twist the lid", "eat the lid"], "gold": 0}] * 3,
    "arc_easy": [{"query": "Question: What is red?", "choices": ["a fox", "the sky", "grass", "snow"], "gold": 0}] * 3,
    "arc_challenge": [{"query": "Question: Which is fast?", "choices": ["fox", "dog", "lazy", "rock"], "gold": 1}] * 2,
    "boolq": [{"query": "Passage: The fox is quick.\nQuestion: is the fox quick?", "choices": ["no", "yes"],
               "gold": 1}] * 2,
    "hellaswag": [{"query": "Foxes: The quick brown fox", "choices": ["jumps over.", "sleeps.", "a b", "c d"],
                   "gold": 0}] * 2,
    "winogrande": [{"context_options": ["The fox jumped over the dog because the fox",
                                        "The fox jumped over the dog because the dog"],
                    "continuation": "was quick.", "gold": 0}] * 2,
}


@pytest.fixture
def zs_dir(data_dir):
    (data_dir / "zeroshot").mkdir()
    for task, rows in ZS_ROWS.items():
        (data_dir / "zeroshot" / f"{task}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return data_dir


def test_zeroshot_prompts_follow_lm_eval_templates(zs_dir):
    piqa = data.load_zeroshot("piqa")
    assert piqa[0]["contexts"] == ["Question: How to open a jar?\nAnswer:"] * 2
    assert piqa[0]["continuations"] == [" twist the lid", " eat the lid"]
    assert data.load_zeroshot("arc_easy", limit=2)[1]["contexts"][0] == "Question: What is red?\nAnswer:"
    assert len(data.load_zeroshot("arc_easy", limit=2)) == 2
    assert data.load_zeroshot("boolq")[0]["contexts"][0].endswith("is the fox quick?\nAnswer:")
    assert data.load_zeroshot("hellaswag")[0]["contexts"][0] == "Foxes: The quick brown fox"
    wg = data.load_zeroshot("winogrande")[0]
    assert wg["contexts"] == ZS_ROWS["winogrande"][0]["context_options"]
    assert wg["continuations"] == [" was quick."] * 2
    with pytest.raises(ValueError, match="unknown zero-shot task"):
        data.load_zeroshot("mmlu")


def test_zeroshot_bad_rows_are_refused(zs_dir):
    (zs_dir / "zeroshot" / "piqa.jsonl").write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 5}))
    with pytest.raises(ValueError, match="gold 5"):
        data.load_zeroshot("piqa")
    (zs_dir / "zeroshot" / "boolq.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="boolq.jsonl"):
        data.load_zeroshot("boolq")


def test_hub_rows_convert_to_the_local_format():
    h = data._from_hub("hellaswag", {"activity_label": "Roof", "ctx_a": "A man is on a roof.", "ctx_b": "he",
                                     "endings": ["falls [title] off.", "sits  down."], "label": "1"})
    assert h == {"query": "Roof: A man is on a roof. he", "choices": ["falls. off.", "sits down."], "gold": 1}
    w = data._from_hub("winogrande", {"sentence": "Sam helped Max because _ was kind.", "option1": "Sam",
                                      "option2": "Max", "answer": "2"})
    assert w == {"context_options": ["Sam helped Max because Sam", "Sam helped Max because Max"],
                 "continuation": "was kind.", "gold": 1}
    a = data._from_hub("arc_easy", {"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                                    "answerKey": "B"})
    assert data._zeroshot_example("arc_easy", a)["contexts"][0] == "Question: Q?\nAnswer:" and a["gold"] == 1
    p = data._from_hub("piqa", {"goal": "G", "sol1": "a", "sol2": "b", "label": 0})
    assert data._zeroshot_example("piqa", p)["contexts"][0] == "Question: G\nAnswer:"
    b = data._from_hub("boolq", {"passage": "P", "question": "is it", "label": 1})
    assert b["query"] == "Passage: P\nQuestion: is it?" and b["gold"] == 1


def test_encode_pairs_moves_trailing_space_and_splits_at_the_context(tmp_path):
    tok = make_tokenizer(tmp_path)
    (c, t), = aq_eval.encode_pairs(tok, [("The quick brown ", "fox")])
    whole = tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    assert c + t == whole
    assert c == tok("The quick brown", add_special_tokens=False)["input_ids"]


def test_loglikelihoods_match_unbatched_scoring(tmp_path):
    tok = make_tokenizer(tmp_path)
    model = tiny_llama()
    reqs = [("The quick brown", " fox jumps"), ("Quantization maps", " floats"), ("The lazy", " dog."),
            ("fox", " jumps over the lazy dog. The quick")]
    got = aq_eval.loglikelihoods(model, tok, reqs, batch_tokens=24)  # forces several batches with padding
    for (ctx, cont), ll in zip(reqs, got):
        c = tok(ctx, add_special_tokens=False)["input_ids"]
        full = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
        ref = sum(lp[i - 1, full[i]].item() for i in range(len(c), len(full)))
        assert ll == pytest.approx(ref, abs=1e-4)
        assert ll < 0
    # truncation from the left keeps the continuation whole
    short = aq_eval.loglikelihoods(model, tok, reqs[3:], max_length=5)
    assert math.isfinite(short[0]) and short[0] != pytest.approx(got[3])


def test_score_examples_acc_and_acc_norm():
    exs = [{"continuations": [" a", " bbbbbbbb"], "gold": 1}, {"continuations": [" x", " y"], "gold": 0}]
    s = aq_eval.score_examples([[-2.0, -4.0], [-1.0, -3.0]], exs)
    assert s == {"acc": 0.5, "acc_norm": 1.0, "n": 2}  # -4/8 > -2/1: the long option wins once normalised


def test_eval_cli_on_fp_fake_quantized_and_patched_models(tiny_model_dir, zs_dir, tmp_path, capsys):
    tasks = "wikitext2,piqa,winogrande"
    common = ["--model", str(tiny_model_dir), "--tasks", tasks, "--seqlen", "64", "--eval-windows", "2",
              "--device", "cpu", "--dtype", "float32"]
    fp = aq_eval.main(common + ["--out", str(tmp_path / "fp.json")])
    fq = aq_eval.main(common + ["--rtn", "W4A4"])
    pt = aq_eval.main(common + ["--rtn", "W4A4", "--patch", "--out", str(tmp_path / "pt.json")])
    out = capsys.readouterr().out
    assert "| RTN W4A4 (aq kernels) |" in out and "| FP |" in out
    for r in (fp, fq, pt):
        assert set(r["zeroshot"]) == {"piqa", "winogrande"}
        assert all(0 <= v["acc"] <= 1 and v["n"] > 0 for v in r["zeroshot"].values())
        assert r["perplexity"]["wikitext2"] > 1
    # fp32 W4A4 on the kernels' integer path is the fake-quantized model up to float rounding
    assert pt["perplexity"]["wikitext2"] == pytest.approx(fq["perplexity"]["wikitext2"], rel=1e-4)
    assert fp["perplexity"]["wikitext2"] != pytest.approx(fq["perplexity"]["wikitext2"], rel=1e-4)
    saved = json.loads((tmp_path / "pt.json").read_text())
    assert saved["setting"] == "RTN W4A4 (aq kernels)"
    assert (tmp_path / "pt.md").read_text().startswith("| setting |")


def test_eval_cli_refuses_bad_arguments(data_dir):
    with pytest.raises(SystemExit, match="W<bits>A<bits>"):
        aq_eval.main(["--rtn", "int4", "--tasks", "wikitext2"])
    with pytest.raises(SystemExit, match="unknown dataset"):
        aq_eval.main(["--tasks", "wikitext2,mmlu"])


def test_format_table():
    rows = {"FP": {"perplexity": {"wikitext2": 21.6123}, "zeroshot": {"piqa": {"acc": 0.7, "acc_norm": 0.71},
                                                                       "boolq": {"acc": 0.6, "acc_norm": 0.5}}}}
    t = aq_eval.format_table(rows)
    assert "| FP | 21.61 | 71.00 | 60.00 | 65.50 |" in t
