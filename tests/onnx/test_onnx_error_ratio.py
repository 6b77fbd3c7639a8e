"""The float32 verdict of the ONNX checks: onnxruntime's error ratio against the float64 reference."""

from __future__ import annotations

import copy
import importlib
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fcconv
from fcconv.certify import ERROR_RATIO_MAX

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

import fcconv.onnx as fonnx  # noqa: E402

rewrite_module = importlib.import_module("fcconv.onnx.rewrite")
surgery_module = importlib.import_module("fcconv.onnx.surgery")
SHAPE = (3, 12, 12)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def plain_export(model: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, *SHAPE),), str(path), dynamo=False)


def through_float16(proto: Any) -> Any:
    """``proto`` with its output rounded to float16 and back: the same function in float64 (the
    float64 cast turns both Casts into double), but float16's error in onnxruntime."""
    proto = copy.deepcopy(proto)
    out = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [f"{o}_raw" if o == out else o for o in node.output]
    proto.graph.node.extend([
        helper.make_node("Cast", [f"{out}_raw"], [f"{out}_half"], to=onnx.TensorProto.FLOAT16),
        helper.make_node("Cast", [f"{out}_half"], [out], to=onnx.TensorProto.FLOAT)])
    return proto


@pytest.mark.slow
def test_export_reports_the_error_ratio_at_every_size(tmp_path: Path) -> None:
    fcn = fcconv.convolutionalize(small_net(), SHAPE)
    report = fonnx.export(fcn, tmp_path / "fcn.onnx", SHAPE, certify="float32")  # also without float64
    assert len(report.checks) >= 2  # the training size and a larger odd one
    assert all(c.error_ratio is not None and c.error_ratio <= ERROR_RATIO_MAX for c in report.checks)
    assert report.error_ratio == max(c.error_ratio for c in report.checks if c.error_ratio is not None)
    text = str(report)
    assert "float32 error ratio (onnxruntime vs the reference in float32, against float64)" in text
    assert "; error ratio " in text


def test_linear_to_conv_and_convolutionalize_report_the_error_ratio(tmp_path: Path) -> None:
    plain_export(small_net(), tmp_path / "src.onnx")
    rewritten = fonnx.linear_to_conv(tmp_path / "src.onnx", tmp_path / "conv.onnx")
    ratio = rewritten.checks[0].error_ratio
    assert ratio is not None and ratio <= ERROR_RATIO_MAX
    fcn = fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "fcn.onnx", SHAPE)
    ratio = fcn.checks[0].error_ratio
    assert ratio is not None and ratio <= ERROR_RATIO_MAX and fcn.error_ratio is not None
    float32 = fonnx.linear_to_conv(tmp_path / "src.onnx", tmp_path / "f32.onnx", certify="float32")
    assert float32.error_ratio is None and "float32 error ratio: not measured" in str(float32)


def test_a_float16_rounding_passes_float64_but_not_the_error_ratio(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain_export(small_net(), tmp_path / "src.onnx")
    real = rewrite_module.linear_to_conv_model
    monkeypatch.setattr(rewrite_module, "linear_to_conv_model",
                        lambda p: (through_float16(real(p)[0]), real(p)[1]))
    with pytest.raises(fcconv.NotEquivalentError,
                       match=r"In float32 the rewritten model deviates from the float64 reference \S+ "
                             r"times as much as the original file does .* \(error ratio above 10\)"):
        fonnx.linear_to_conv(tmp_path / "src.onnx", tmp_path / "dst.onnx")
    assert not (tmp_path / "dst.onnx").exists()
    real_surgery = surgery_module.convolutionalize_model
    monkeypatch.setattr(surgery_module, "convolutionalize_model",
                        lambda *a: (through_float16(real_surgery(*a)[0]), real_surgery(*a)[1]))
    with pytest.raises(fcconv.NotEquivalentError, match=r"In float32 the convolutionalized file deviates"):
        fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "fcn.onnx", SHAPE)


def test_float16_error_ratio_of_a_convolutionalized_file(tmp_path: Path) -> None:
    pytest.importorskip("onnxconverter_common")
    plain_export(small_net(), tmp_path / "src.onnx")
    fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "fcn.onnx", SHAPE)
    good = fonnx.float16_error_ratio(tmp_path / "src.onnx", tmp_path / "fcn.onnx")
    assert good.ratio is not None and good.ratio <= ERROR_RATIO_MAX
    assert good.reference_error > 1e-5  # float16's own error, not float32's
    wrong = onnx.load(str(tmp_path / "fcn.onnx"))
    last_conv = [n for n in wrong.graph.node if n.op_type == "Conv"][-1]
    weight = next(i for i in wrong.graph.initializer if i.name == last_conv.input[1])
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] += 0.05  # one weight off by 0.05: float16 rounds weights by ~5e-4 of their size
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(wrong, str(tmp_path / "wrong.onnx"))
    bad = fonnx.float16_error_ratio(tmp_path / "src.onnx", tmp_path / "wrong.onnx")
    assert bad.ratio is not None and bad.ratio > ERROR_RATIO_MAX
