"""Tests of fcconv.certify.report: the numbers of the report by hand, its table and dict."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from fcconv.certify import EquivalenceReport, compare
from fcconv.layers import linear_to_conv


def flat_to(shape):
    return lambda x: x.reshape(-1, *shape)


# ------------------------------------------------------------------------------------------------
# Report arithmetic
# ------------------------------------------------------------------------------------------------


def identity_linear(scale_last: float = 1.0) -> nn.Linear:
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([1.0, scale_last])))
    return lin


def test_report_arithmetic_by_hand():
    # reference gives x itself, the candidate multiplies the second feature by 1.5.
    x = torch.tensor([[1.0, 4.0], [-8.0, 2.0]])
    report = compare(identity_linear(), identity_linear(1.5), inputs=x)
    # outputs [[1, 4], [-8, 2]] vs [[1, 6], [-8, 3]]: differences 0, 2, 0, 1
    assert report.max_abs == 2.0
    assert report.max_rel == 2.0 / 8.0  # over the largest reference magnitude, not per element
    assert report.bit_identical_fraction == 0.5
    assert report.max_ulp == 2**22  # 4 = 1.0 * 2**2 and 6 = 1.5 * 2**2: half a binade of 2**23
    assert report.num_compared == 4 and report.samples == 2 and report.batches == 1
    assert report.float64_max_rel == 0.25
    worst = report.output_agreement.worst
    assert (worst.batch, worst.sample, worst.index) == (0, 0, (1,))
    assert (worst.reference, worst.candidate) == (4.0, 6.0)
    assert not report.equivalent
    assert "largest difference at batch 0 (batch 0), sample 0, element (1,): reference 4" in report.reason


def test_single_layer_bound_is_the_dot_product_bound():
    # For one Linear vs its conv the bound per output is 2 * n * eps * sum|w x| (n counts the bias).
    lin = nn.Linear(75, 6)
    conv = linear_to_conv(lin, (3, 5, 5))
    x = torch.randn(4, 75) * torch.logspace(-3, 3, 4).unsqueeze(1)
    report = compare(lin, conv, inputs=x, input_map=flat_to((3, 5, 5)))
    with torch.no_grad():
        diff = (lin(x).double() - conv(x.reshape(-1, 3, 5, 5)).flatten(1).double()).abs()
        magnitude = x.double().abs() @ lin.weight.double().abs().t() + lin.bias.double().abs()
    bound = 2 * 76 * torch.finfo(torch.float32).eps * magnitude + torch.finfo(torch.float32).tiny
    expected = float(torch.where(diff == 0, 0.0, diff / bound).max())
    assert report.output_agreement.bound_single_layer is True
    assert report.output_agreement.bound_ratio == pytest.approx(expected, rel=1e-9)
    assert report.bound_ok and report.equivalent


def test_max_rel_uses_largest_reference_magnitude_not_elementwise():
    # A near-zero reference output with a small absolute error must not blow max_rel up.
    ref = nn.Linear(1, 2, bias=False)
    cand = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([[1e-6], [1.0]]))
        cand.weight.copy_(torch.tensor([[2e-6], [1.0]]))
    report = compare(ref, cand, inputs=torch.ones(1, 1))
    assert report.max_abs == pytest.approx(1e-6, rel=1e-3)
    assert report.max_rel == pytest.approx(1e-6, rel=1e-3)  # elementwise it would be 1.0



def test_report_table_and_dict():
    lin = nn.Linear(6, 3)
    report = compare(lin, linear_to_conv(lin, (6, 1)), (6,), input_map=flat_to((6, 1)), grad=True)
    text = str(report)
    for row in ("max abs difference", "max rel difference", "max ULP (float32)", "bit-identical",
                "diff / rounding bound", "float64 copies: max rel", "same function",
                "input gradients", "EQUIVALENT: same function"):
        assert row in text
    assert text.splitlines()[0] == "Linear (reference) vs Conv1d (candidate): 8 samples in 4 batches, float32"
    data = json.loads(json.dumps(report.as_dict()))
    assert data["dtype"] == "float32" and data["equivalent"] is True
    assert data["output_agreement"]["count"] == 24
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.equivalent = False  # type: ignore[misc]
    assert isinstance(report, EquivalenceReport)



def test_agreements_are_named_for_what_they_hold():
    lin = nn.Linear(6, 3)
    report = compare(lin, linear_to_conv(lin, (6, 1)), (6,), input_map=flat_to((6, 1)), grad=True)
    assert report.agreements == [report.output_agreement, report.gradient_agreement]
    assert report.output_agreement.quantity == "outputs" and report.num_compared == 8 * 3
    assert report.gradient_agreement.quantity == "input gradients"
    assert report.gradient_agreement.per_sample == 6
    assert set(report.as_dict()) >= {"output_agreement", "gradient_agreement"}
    assert not hasattr(report, "outputs") and not hasattr(report, "num_outputs")
