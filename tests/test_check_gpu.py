"""bench/check_gpu.py's quick mode runs every family under the interpreter, and fails on a wrong kernel."""
import importlib.util
import json
from pathlib import Path

import torch

from aq.kernels import w4a16 as W

_spec = importlib.util.spec_from_file_location("check_gpu", Path(__file__).parents[1] / "bench" / "check_gpu.py")
check_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_gpu)


def test_quick_mode_passes(tmp_path):
    assert check_gpu.main(["--quick", "--device", "cpu", "--families", "fake_quant,norm,w4a16,w4a4,w8a8",
                           "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "check_gpu.json").read_text())
    assert s["failed"] == 0 and s["cases"] >= 10
    assert set(s["families"]) == {"fake_quant", "norm", "w4a16", "w4a4", "w8a8"}


def test_a_wrong_kernel_fails_the_check(tmp_path, monkeypatch):
    real = W.w4a16_linear_triton
    monkeypatch.setattr(W, "w4a16_linear_triton", lambda *a, **k: real(*a, **k) * 1.05)  # 5% off
    assert check_gpu.main(["--quick", "--device", "cpu", "--families", "w4a16", "--out", str(tmp_path)]) == 1
    s = json.loads((tmp_path / "check_gpu.json").read_text())
    assert s["failed"] == s["cases"] > 0 and torch.isfinite(torch.tensor(s["failures"][0]["errs"]["y"]))


def test_a_wrong_w8a8_kernel_fails_the_check(tmp_path, monkeypatch):
    from aq.kernels import w8a8

    real = w8a8.w8a8_matmul_triton
    monkeypatch.setattr(w8a8, "w8a8_matmul_triton", lambda *a, **k: real(*a, **k) * 1.01)  # 1% off
    assert check_gpu.main(["--quick", "--device", "cpu", "--families", "w8a8", "--out", str(tmp_path)]) == 1
    s = json.loads((tmp_path / "check_gpu.json").read_text())
    assert s["failed"] > 0 and {f["name"] for f in s["failures"]} <= {"matmul", "linear"}
