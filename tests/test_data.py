import os
from pathlib import Path

import pytest

from aq import data
from tests.conftest import make_tokenizer


def test_eval_rows_from_local_folder(data_dir):
    rows = data.load_rows("wikitext2", "eval")
    assert len(rows) == 40 and rows[0].startswith(" = Section 0")
    c4_eval = data.load_rows("c4", "eval")
    c4_cal = data.load_rows("c4", "calib")
    assert len(c4_eval) == 200 and c4_eval[0].startswith("doc 800:")
    assert len(c4_cal) == 800 and c4_cal[-1].startswith("doc 799:")


def test_wikitext_calibration_needs_the_train_split(data_dir):
    with pytest.raises(FileNotFoundError, match="train split"):
        data.load_rows("wikitext2", "calib")


def test_tokens_and_segments(data_dir, tmp_path):
    tok = make_tokenizer(tmp_path)
    ids = data.eval_tokens(tok, "wikitext2")
    assert ids.ndim == 1 and ids.numel() > 1000
    seg = data.calib_segments(tok, "c4", nsamples=5, seqlen=64, seed=3)
    assert seg.shape == (5, 64)
    assert (seg == data.calib_segments(tok, "c4", nsamples=5, seqlen=64, seed=3)).all()
    assert not (seg == data.calib_segments(tok, "c4", nsamples=5, seqlen=64, seed=4)).all()


def test_file_datasets(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("some text " * 50)
    assert data.load_rows(str(txt), "calib") == ["some text " * 50]
    js = tmp_path / "rows.jsonl"
    js.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert data.load_rows(str(js), "eval") == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "a"}\n')
    with pytest.raises(ValueError, match="no 'text' field"):
        data.load_rows(str(bad), "eval")


def test_unknown_name_and_missing_file():
    with pytest.raises(ValueError, match="unknown dataset 'ptb'"):
        data.check_name("ptb")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.check_name("/no/such/file.jsonl")


def test_missing_data_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("AQ_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="AQ_DATA_DIR=.*is not a folder"):
        data.load_rows("wikitext2", "eval")


def test_no_folder_and_no_hub_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("AQ_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not reachable: AQ_DATA_DIR is not set"):
        data.load_rows("c4", "eval")


@pytest.mark.skipif(not os.environ.get("AQ_REAL_DATA"), reason="set AQ_REAL_DATA to a real data folder (the README's "
                    "test command points it at ../shared/data)")
def test_real_data_folder_layout(monkeypatch):
    monkeypatch.setenv("AQ_DATA_DIR", os.environ["AQ_REAL_DATA"])
    wt = data.load_rows("wikitext2", "eval")
    assert len(wt) == 4358
    assert len(data.load_rows("c4", "eval")) == 200 and len(data.load_rows("c4", "calib")) == 800
    assert Path(os.environ["AQ_REAL_DATA"], "zeroshot").is_dir()
