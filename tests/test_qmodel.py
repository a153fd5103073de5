import json

import pytest
import torch

from aq.primitives import dequantize
from aq.qmodel import FakeQuantLinear, QModelSpec, TransformedNorm, set_qkv_abits


def _layer(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(48, 20, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(20, 48, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(20, generator=g))
    return lin


def test_fake_quant_linear_state_is_its_codes_and_the_weight_follows_them():
    fq = FakeQuantLinear.from_linear(_layer(), 3, 16, symmetric=True)
    assert set(fq.state_dict()) == {"qcodes", "scale", "zero", "bias"}  # the weight is derived, never stored
    assert fq.qcodes.dtype == torch.uint8 and int(fq.qcodes.max()) <= 7 and fq.symmetric
    assert torch.equal(fq.weight, dequantize(fq.codes(), fq.scale, fq.zero, 16))
    other = FakeQuantLinear.from_linear(_layer(1), 3, 16, symmetric=True)
    assert not torch.equal(other.weight, fq.weight)
    other.load_state_dict(fq.state_dict())
    assert torch.equal(other.weight, fq.weight)  # recomputed from the loaded codes
    x = torch.randn(5, 48)
    assert torch.equal(other(x), fq(x))


def test_spec_round_trips_through_json_and_rebuilds_the_quantized_tree():
    fp = torch.nn.Sequential(_layer(), torch.nn.LayerNorm(48), torch.nn.Module())
    q = torch.nn.Sequential(FakeQuantLinear.from_linear(fp[0], 4, None, abits=8),
                            TransformedNorm(torch.nn.LayerNorm(48), torch.eye(16) + 0.1 * torch.randn(3, 16, 16)),
                            torch.nn.Module())
    set_qkv_abits(q[2], 6)
    spec = QModelSpec.of(q)
    j = json.loads(json.dumps(spec.to_json()))
    assert j["linears"]["0"]["abits"] == 8 and j["norm_transforms"]["1"] == {"form": "block", "shape": [3, 16, 16]}
    assert QModelSpec.from_json(j) == spec
    back = QModelSpec.from_json(j).rebuild(fp, q.state_dict())
    x = torch.randn(2, 48)
    assert torch.equal(back[0](x), q[0](x)) and torch.equal(back[1](x), q[1](x)) and back[2].aq_qkv_abits == 6


def test_transformed_norm_refuses_a_form_its_shape_does_not_have():
    with pytest.raises(ValueError, match="is full"):
        TransformedNorm(torch.nn.LayerNorm(8), torch.randn(8, 8), "block")
    with pytest.raises(ValueError, match="must be"):
        TransformedNorm(torch.nn.LayerNorm(8), torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="unknown form 'banded'"):
        QModelSpec.from_json({"norm_transforms": {"n": {"form": "banded", "shape": [8]}}})
