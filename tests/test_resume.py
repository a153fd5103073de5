"""Kill and resume, for real: `python -m aq.calibrate` in a subprocess, SIGKILLed at a known point of a layer
checkpoint write (aq.calib.pipeline's AQ_TEST_PAUSE_WRITE hook stops the write there), then resumed with --resume; the
final checkpoint must equal an uninterrupted run's tensor for tensor."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aq.calib.pipeline import PAUSE_ENV
from aq.checkpoint import TENSORS

ROOT = Path(__file__).resolve().parents[1]
# the smallest calibration that still trains every layer (2 layers); eval of one window only
ARGS = ["--mode", "affinequant", "--wbits", "4", "--group-size", "32", "--nsamples", "2", "--seqlen", "128",
        "--epochs", "1", "--eval-data", "wikitext2", "--eval-windows", "1", "--skip-fp", "--no-progress"]


def _env(pause: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), AQ_BACKEND="torch", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop(PAUSE_ENV, None)
    if pause:
        env[PAUSE_ENV] = pause
    return env


def _cmd(model_dir, out, *extra):
    return [sys.executable, "-m", "aq.calibrate", "--model", str(model_dir), "--out", str(out), *ARGS, *extra]


def _run_and_kill(model_dir, out, pause: str) -> None:
    """Start a run, wait until the hook has paused it at `pause`, SIGKILL it."""
    marker = out / "ckpt" / (pause.split(":", 1)[1] + ".paused")
    p = subprocess.Popen(_cmd(model_dir, out), env=_env(pause), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not marker.exists():
        if p.poll() is not None:
            raise AssertionError(f"the run ended (rc {p.returncode}) before reaching {pause}:\n"
                                 + p.stdout.read().decode()[-3000:])
        if time.time() > deadline:
            p.kill()
            raise AssertionError(f"the run did not reach {pause} within 120 s")
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    p.stdout.close()
    assert p.returncode == -signal.SIGKILL
    marker.unlink()


def _tensors(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / TENSORS))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ from the uninterrupted run: {different[:5]}"


def _main(model_dir, out, *extra):
    """In-process (the imports are paid once): the uninterrupted run, the refusals and the resumes."""
    from aq import calibrate

    return calibrate.main(["--model", str(model_dir), "--out", str(out), *ARGS, *extra])


def test_a_killed_calibration_resumes_to_the_uninterrupted_result(tiny_model_dir, data_dir, tmp_path, monkeypatch,
                                                                  one_thread, capsys):
    monkeypatch.setenv("AQ_BACKEND", "torch")  # as in the subprocesses (one thread there too: OMP_NUM_THREADS=1)
    _main(tiny_model_dir, tmp_path / "whole")
    reference = _tensors(tmp_path / "whole")
    for pause, left in [
        ("after:layer_000.pt", ["layer_000.pt", "run.json"]),  # killed once the first layer file is written
        ("mid:layer_001.pt", ["layer_000.pt", "layer_001.pt.tmp", "run.json"]),  # killed in the middle of writing one
    ]:
        out = tmp_path / pause.replace(":", "_")
        _run_and_kill(tiny_model_dir, out, pause)
        assert sorted(p.name for p in (out / "ckpt").iterdir()) == left, pause
        assert not (out / TENSORS).exists()  # no final checkpoint from a killed run

        with pytest.raises(SystemExit, match="pass --resume"):  # not resuming: refused, nothing overwritten
            _main(tiny_model_dir, out)
        with pytest.raises(SystemExit, match="cannot resume .* other settings .*wbits"):
            _main(tiny_model_dir, out, "--wbits", "3", "--resume")
        assert json.loads((out / "ckpt" / "run.json").read_text())["config"]["wbits"] == 4

        capsys.readouterr()
        res = _main(tiny_model_dir, out, "--resume")
        assert res["resumed_layers"] == 1 and "layer 1/2: resumed from layer_000.pt" in capsys.readouterr().out
        assert not (out / "ckpt" / "layer_001.pt.tmp").exists()
        _assert_same(_tensors(out), reference)
