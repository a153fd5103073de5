"""bench/patch_check.py (the lead's GPU check of patched vs fake-quantized perplexity) runs end to end on a tiny
model on the CPU, and its rows say what they measured."""
import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location("patch_check", Path(__file__).parents[1] / "bench" / "patch_check.py")
patch_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(patch_check)


def test_patch_check_runs_offline_on_a_tiny_model(tiny_model_dir, data_dir, tmp_path, one_thread):
    out = tmp_path / "pc.json"
    rc = patch_check.main(["--model", str(tiny_model_dir), "--settings", "W6A6", "--dtypes", "float32",
                           "--seqlen", "128", "--eval-windows", "2", "--logit-windows", "1", "--device", "cpu",
                           "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and res["ok"] and len(res["rows"]) == 1
    row = res["rows"][0]
    assert row["kernels"] == {"w8a8": 14} and row["modules"]["W8A8Linear"] == 8  # q/k/v and gate/up joined
    # fp32: the int8 GEMM on exact codes is the fake-quant model up to float summation order
    assert abs(row["rel_diff"]) < 1e-5 and row["logit_rel_err"] < 1e-5 and row["ppl_fake"] > 1
    # the noise floor row: the fake-quant model with float64 sums is another rounding of the same values
    assert 0 < row["floor_logit_rel_err"] < 1e-5 and abs(row["vs_exact_rel_diff"]) < 1e-5
