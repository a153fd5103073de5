"""What aq refuses (docs/errors.md): each case a new user hit (issue 16's table) reproduced, now failing early with a
message that names the problem and what to do."""
import pytest
import torch

from aq import calibrate, checks, eval as aq_eval
from aq.config import QuantConfig
from aq.primitives import check_group_size
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _refused(main, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    return str(e.value)


# ------------------------------------------------------------------------------------------------ counts and lengths
@pytest.mark.parametrize("flag,name", [("--nsamples", "nsamples"), ("--seqlen", "seqlen"), ("--epochs", "epochs"),
                                       ("--batch-size", "batch_size")])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_zero_or_negative_counts_are_refused_not_read_as_defaults(flag, name, value, tiny_model_dir, data_dir):
    msg = _refused(calibrate.main, ["--model", str(tiny_model_dir), flag, value])
    assert f"{name} must be a positive integer, got {value}" in msg


@pytest.mark.parametrize("flag", ["--eval-windows", "--eval-batch"])
def test_zero_evaluation_counts_are_refused(flag, tiny_model_dir, data_dir):
    assert f"{flag} must be a positive integer, got 0" in _refused(calibrate.main, ["--model", str(tiny_model_dir),
                                                                                  flag, "0"])


def test_seqlen_beyond_the_model_context_is_refused_before_any_work(tiny_model_dir, data_dir, capsys):
    msg = _refused(calibrate.main, ["--model", str(tiny_model_dir), "--seqlen", "100000"])
    assert "100000 is longer than the model's context of 2048 tokens (max_position_embeddings" in msg
    assert "loaded" not in capsys.readouterr().out  # refused before the run went on


@pytest.mark.parametrize("spelling", ["0", "-1", "channel"])
def test_per_channel_has_one_spelling(spelling, capsys):
    with pytest.raises(SystemExit) as e:
        calibrate.build_parser().parse_args(["--group-size", spelling])
    assert e.value.code == 2
    assert "'none'" in capsys.readouterr().err
    assert calibrate.build_parser().parse_args(["--group-size", "none"]).group_size is None


def test_group_size_zero_is_refused_by_the_api():
    with pytest.raises(ValueError, match="positive integer or None"):
        QuantConfig(group_size=0)
    with pytest.raises(ValueError, match="positive integer or None"):
        check_group_size(64, 0)
    with pytest.raises(ValueError, match="positive integer or None"):
        check_group_size(64, -1)


def test_an_evaluation_text_shorter_than_a_window_is_refused_before_calibration(tiny_model_dir, data_dir, tmp_path,
                                                                                capsys, monkeypatch):
    monkeypatch.setenv("AQ_BACKEND", "torch")
    short = tmp_path / "short.txt"
    short.write_text("a few words only. " * 20)
    msg = _refused(calibrate.main, ["--model", str(tiny_model_dir), "--eval-data", f"wikitext2,{short}",
                                    "--no-progress", "--epochs", "1", "--nsamples", "2"])
    assert f"evaluation text '{short}' has" in msg and "fewer than one window of 2048" in msg
    assert "calibrating" not in capsys.readouterr().out


def test_api_refuses_windows_beyond_the_context_and_zero_counts():
    model = tiny_llama()  # context 256
    toks = torch.randint(0, 300, (1024,))
    with pytest.raises(ValueError, match="longer than the model's context of 256"):
        aq_eval.perplexity(model, toks, seqlen=512)
    with pytest.raises(ValueError, match="max_windows must be a positive integer, got 0"):
        aq_eval.perplexity(model, toks, seqlen=64, max_windows=0)
    with pytest.raises(ValueError, match="nsamples must be a positive integer, got 0"):
        QuantConfig(nsamples=0)
    with pytest.raises(ValueError, match="seqlen must be a positive integer, got True"):
        QuantConfig(seqlen=True)


def test_api_calibrate_refuses_segments_beyond_the_context():
    from aq.calib.loop import calibrate as run_calibration

    with pytest.raises(ValueError, match="calibration segment length 512 is longer than the model's context of 256"):
        run_calibration(tiny_llama(), torch.zeros(2, 512, dtype=torch.long), QuantConfig(mode="omniquant"))


def test_context_length_reads_the_config():
    assert checks.context_length(tiny_llama().config) == (256, "max_position_embeddings")
    assert checks.context_length(None) is None


# -------------------------------------------------------------------------------------------- ignored combinations
def test_eval_refuses_model_beside_a_checkpoint_with_a_tokenizer(tmp_path, data_dir):
    from aq.calib.rtn import quantize_rtn
    from aq.checkpoint import save_checkpoint
    from tests.conftest import make_tokenizer

    cfg = QuantConfig(wbits=4, abits=16, group_size=32, mode="rtn")
    save_checkpoint(quantize_rtn(tiny_llama(), cfg), cfg, tmp_path / "ck", tokenizer=make_tokenizer(tmp_path))
    msg = _refused(aq_eval.main, ["--checkpoint", str(tmp_path / "ck"), "--model", "other", "--tasks", "wikitext2"])
    assert "--model other is not used with --checkpoint" in msg and "drop --model" in msg


@pytest.mark.parametrize("flag", ["--seqlen", "--limit", "--eval-windows", "--ppl-batch", "--batch-tokens"])
def test_eval_refuses_zero_counts(flag, data_dir):
    assert f"{flag} must be a positive integer, got 0" in _refused(aq_eval.main, ["--tasks", "wikitext2", flag, "0"])


def test_eval_seqlen_beyond_the_context_is_refused(tiny_model_dir, data_dir):
    msg = _refused(aq_eval.main, ["--model", str(tiny_model_dir), "--tasks", "wikitext2", "--seqlen", "4096",
                                  "--device", "cpu"])
    assert "--seqlen 4096 is longer than the model's context of 2048" in msg


def test_arguments_a_mode_ignores_are_named():
    assert checks.ignored_calibration_args("rtn", True, {"epochs", "seed", "wbits"}) == [
        "--epochs is not used with --mode rtn (round-to-nearest does not train)",
        "--seed is not used with --mode rtn (round-to-nearest does not train)"]
    assert checks.ignored_calibration_args("omniquant", True, {"alpha_sf"})[0].startswith("--alpha-sf is not used")
    assert checks.ignored_calibration_args("affinequant", False, {"norm_transform"})[0].startswith("--norm-transform")
    assert checks.ignored_calibration_args("affinequant", True, {"norm_transform", "alpha_sf"}) == []


def test_cli_warns_about_ignored_arguments(tiny_model_dir, data_dir, capsys):
    calibrate.main(["--model", str(tiny_model_dir), "--mode", "rtn", "--epochs", "3", "--seqlen", "64",
                    "--eval-windows", "1", "--skip-fp", "--eval-data", "wikitext2"])
    assert "warning: --epochs is not used with --mode rtn" in capsys.readouterr().out
