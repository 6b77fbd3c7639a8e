"""The error ratio: the candidate's deviation from the float64 reference over the reference's own.

Correct conversions sit near 1 and within ERROR_RATIO_MAX; a weight off by 1e-4 and a transposed
kernel in a deep net sit far above; an exact reference gives no ratio and says so.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

import fcconv
from fcconv.certify import ERROR_RATIO_MAX, VACUOUS_FACTOR, compare, error_ratio
from fcconv.demo.digits import load_digits_model
from fcconv.layers import linear_to_conv

SHAPE = (1, 12, 12)  # the digits model's window is 8 x 8; a 12 x 12 input gives a 3 x 3 map


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, nn.Module]:
    model = load_digits_model()
    return model, fcconv.convolutionalize(model, SHAPE)


def test_error_ratio_of_known_deviations() -> None:
    r64 = torch.tensor([[1.0, -2.0], [100.0, 50.0]], dtype=torch.float64)
    ref = r64 + torch.tensor([[1e-7, 0.0], [0.0, 0.0]], dtype=torch.float64)
    cand = r64 + torch.tensor([[0.0, 0.0], [4e-5, 0.0]], dtype=torch.float64)
    measure = error_ratio([ref], [cand], [r64])
    # Each sample relative to its largest |float64 value|: 1e-7 / 2 and 4e-5 / 100.
    assert measure.reference_error == pytest.approx(5e-8)
    assert measure.candidate_error == pytest.approx(4e-7)
    assert measure.ratio == pytest.approx(8.0)


def test_linear_to_conv_has_a_ratio_near_one() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(75, 10)
    report = compare(lin, linear_to_conv(lin, (3, 5, 5)), (75,), input_map=lambda x: x.reshape(-1, 3, 5, 5))
    ratio = report.error_ratio
    assert ratio is not None and 0.1 < ratio <= ERROR_RATIO_MAX and report.error_ratio_ok
    out = report.output_agreement
    assert out.reference_error > 0 and out.candidate_error == pytest.approx(ratio * out.reference_error)
    assert not out.bound_vacuous  # one layer: the bound is tight
    text = str(report)
    assert f"error ratio (float32)    {ratio:.3g} ok" in text
    assert "vacuous" not in text and "times as much as the reference does (error ratio" in report.reason
    plain = report.as_dict()
    assert plain["error_ratio"] == ratio and plain["error_ratio_ok"] is True
    assert plain["output_agreement"]["error_ratio"] == ratio
    json.dumps(plain)


def test_small_deep_net_ratio_near_one(digits) -> None:
    model, fcn = digits
    report = compare(model, fcn, SHAPE)
    assert report.equivalent and report.error_ratio is not None and report.error_ratio <= ERROR_RATIO_MAX
    assert report.output_agreement.bound_looseness is not None  # 3e5 here: five layers


def deep_net() -> nn.Module:
    """Seven convs with batch norm: the compounded bound is about 1e9 times the real error."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(2, 4, 3, padding=1), nn.ReLU()]
    for _ in range(6):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


def test_deep_net_bound_is_labelled_vacuous() -> None:
    model = deep_net()
    report = compare(model, fcconv.convolutionalize(model, (2, 6, 6)), (2, 6, 6))
    assert report.equivalent and report.error_ratio is not None and report.error_ratio <= ERROR_RATIO_MAX
    out = report.output_agreement
    assert out.bound_ok and out.bound_looseness is not None and out.bound_looseness > VACUOUS_FACTOR
    assert out.bound_vacuous and report.as_dict()["output_agreement"]["bound_vacuous"] is True
    assert "(deep), vacuous (x" in str(report) and "a vacuous bound" in report.reason


def test_a_weight_off_by_1e4_is_far_above(digits) -> None:
    model, fcn = digits
    wrong = copy.deepcopy(fcn)
    with torch.no_grad():
        next(wrong.parameters()).view(-1)[0] += 1e-4  # the first conv's first weight
    report = compare(model, wrong, SHAPE)
    assert report.error_ratio is not None and report.error_ratio > 10 * ERROR_RATIO_MAX
    assert report.error_ratio_ok is False and not report.equivalent
    assert f"{report.error_ratio:.3g} ABOVE {ERROR_RATIO_MAX:g}" in str(report)


def test_a_transposed_kernel_is_far_above(digits) -> None:
    model, fcn = digits
    wrong = copy.deepcopy(fcn)
    conv = [m for m in wrong.modules() if isinstance(m, nn.Conv2d)][1]
    with torch.no_grad():
        conv.weight.copy_(conv.weight.transpose(2, 3).clone())
    report = compare(model, wrong, SHAPE)
    assert report.error_ratio is not None and report.error_ratio > 1e3 and report.error_ratio_ok is False


def test_bfloat16_ratio_against_the_original_in_bfloat16(digits) -> None:
    model, fcn = digits
    report = compare(model, fcn, SHAPE, dtype=torch.bfloat16)
    assert report.dtype == torch.bfloat16 and report.equivalent
    assert report.error_ratio is not None and report.error_ratio <= ERROR_RATIO_MAX
    assert report.output_agreement.reference_error > 1e-4  # bfloat16's own error, not float32's
    assert "error ratio (bfloat16)" in str(report)
    assert next(model.parameters()).dtype == torch.float32  # copies ran, the modules are unchanged
    wrong = copy.deepcopy(fcn)
    conv = [m for m in wrong.modules() if isinstance(m, nn.Conv2d)][1]
    with torch.no_grad():
        conv.weight.copy_(conv.weight.transpose(2, 3).clone())
    bad = compare(model, wrong, SHAPE, dtype=torch.bfloat16)
    assert bad.error_ratio is not None and bad.error_ratio > 10 * ERROR_RATIO_MAX


def test_dtype_must_be_floating() -> None:
    lin = nn.Linear(2, 2)
    with pytest.raises(fcconv.FcconvError, match="dtype must be a floating torch dtype"):
        compare(lin, lin, (2,), dtype=torch.int32)


def test_exact_reference_has_no_ratio_and_falls_back() -> None:
    # Integer weights and inputs: float32 computes the float64 values exactly.
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(12.0).reshape(3, 4) - 5)
        lin.bias.copy_(torch.tensor([1.0, -2.0, 0.0]))
    x = torch.arange(-8.0, 8.0).reshape(4, 4)
    conv = linear_to_conv(lin, (4, 1, 1))
    report = compare(lin, conv, inputs=[x], input_map=lambda t: t.reshape(-1, 4, 1, 1))
    assert report.error_ratio is None and report.error_ratio_ok is True
    assert "undefined (both exact)" in str(report) and "no error ratio" in report.reason
    # A candidate that is not exact: the rounding bound decides instead, and says so.
    off = copy.deepcopy(conv)
    with torch.no_grad():
        off.weight.view(-1)[0] += 1e-4
    bad = compare(lin, off, inputs=[x], input_map=lambda t: t.reshape(-1, 4, 1, 1))
    assert bad.error_ratio is None and bad.error_ratio_ok is False
    assert "undefined (reference exact); bound EXCEEDED" in str(bad)


def test_float64_modules_have_no_ratio() -> None:
    lin = nn.Linear(6, 2).double()
    report = compare(lin, linear_to_conv(lin, (6, 1, 1)), (6,), input_map=lambda x: x.reshape(-1, 6, 1, 1))
    assert report.equivalent and report.error_ratio is None and "error ratio" not in report.reason


@pytest.mark.slow
def test_resnet18_convolutionalized_has_a_ratio_near_one() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    report = compare(model, fcconv.convolutionalize(model, (3, 224, 224)), (3, 224, 224))
    assert report.equivalent and report.error_ratio is not None and report.error_ratio <= ERROR_RATIO_MAX
    assert report.output_agreement.bound_vacuous  # the compounded bound: ~1e28 times the real error
