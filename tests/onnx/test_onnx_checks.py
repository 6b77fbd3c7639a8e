"""The checks of fcconv.onnx.convolutionalize at every size: opset-respecting Softmax, each cell against
the original file on its crop (padding-free nets), onnx2torch translations (padded nets), and wrong maps
refused (issue 16, items 1 and 2)."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fcconv

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import fcconv.onnx as fonnx  # noqa: E402
from fcconv.onnx._cells import check_larger_size  # noqa: E402
from fcconv.onnx._runtime import run, session  # noqa: E402
from fcconv.onnx.surgery import convolutionalize_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (3, 8, 8)


def _export(model: nn.Module, path: Path, opset: int) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, *SHAPE),), str(path), dynamo=False, opset_version=opset)
    return onnx.load(str(path))


def _unpadded(last: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 2), nn.Flatten(),
                         nn.Linear(5 * 2 * 2, 3), last).eval()


def _padded() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 3)).eval()


@pytest.mark.parametrize("opset", [11, 12, 13, 17])
@pytest.mark.parametrize("last", [nn.Softmax(1), nn.LogSoftmax(1)], ids=["Softmax", "LogSoftmax"])
def test_softmax_normalises_each_cell_at_every_opset(tmp_path: Path, opset: int, last: nn.Module) -> None:
    model = _unpadded(last)
    _export(model, tmp_path / "src.onnx", opset)
    report = fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "fcn.onnx", SHAPE)
    assert report.checks[1].verified_by is not None and "on its crop" in report.checks[1].verified_by
    assert not report.unverified
    x = torch.randn(1, 3, 13, 12)
    y = run(session(tmp_path / "fcn.onnx"), x).double()
    probs = y.exp() if isinstance(last, nn.LogSoftmax) else y
    assert torch.allclose(probs.sum(1), torch.ones(1, *y.shape[2:], dtype=torch.float64), atol=1e-6)
    with torch.no_grad():  # stride 2: each cell is the classifier on its crop
        for i in range(y.shape[2]):
            for j in range(y.shape[3]):
                crop = model(x[:, :, 2 * i:2 * i + 8, 2 * j:2 * j + 8])
                assert torch.allclose(y[0, :, i, j].float(), crop[0], atol=1e-5)


def test_hardmax_before_opset_13_is_per_cell(tmp_path: Path) -> None:
    model = _export(_unpadded(nn.Identity()), tmp_path / "src.onnx", 11)
    last = model.graph.node[-1]
    model.graph.node.append(onnx.helper.make_node("Hardmax", [last.output[0]], ["hard"], axis=1))
    model.graph.output[0].name = "hard"
    onnx.save(model, str(tmp_path / "hard.onnx"))
    fonnx.convolutionalize(tmp_path / "hard.onnx", tmp_path / "fcn.onnx", SHAPE)
    y = run(session(tmp_path / "fcn.onnx"), torch.randn(1, 3, 12, 14))
    assert (y.sum(1) == 1).all()  # one 1 per cell, not one per map


def _tamper(fcn: Any, how: str) -> Any:
    """A wrong surgery result: the bug a naive surgery would make."""
    bad = copy.deepcopy(fcn)
    nodes = {n.op_type: n for n in bad.graph.node}
    if how == "softmax over C x h x w":  # opset 11: axis 1 flattens every dim from 1 on
        for node in bad.graph.node:
            for attr in node.attribute:
                if attr.name == "perm":
                    attr.ints[:] = [0, 1, 2, 3]
                elif attr.name == "axis":
                    attr.i = 1
    elif how == "transposed kernel":
        conv = [n for n in bad.graph.node if n.op_type == "Conv"][-1]
        init = next(i for i in bad.graph.initializer if i.name == conv.input[1])
        kernel = numpy_helper.to_array(init).transpose(0, 1, 3, 2).copy()
        init.CopyFrom(numpy_helper.from_array(kernel, init.name))
    elif how == "padded head conv":
        conv = [n for n in bad.graph.node if n.op_type == "Conv"][-1]
        conv.attribute.append(onnx.helper.make_attribute("pads", [0, 0, 1, 1]))
    elif how == "pool window off by one":
        pool = nodes["AveragePool"]
        for attr in pool.attribute:
            if attr.name == "kernel_shape":
                attr.ints[:] = [attr.ints[0] - 1, attr.ints[1]]
    return bad


@pytest.mark.parametrize("how", ["softmax over C x h x w", "transposed kernel", "padded head conv"])
def test_wrong_maps_of_an_unpadded_net_are_refused(tmp_path: Path, how: str) -> None:
    original = _export(_unpadded(nn.Softmax(1)), tmp_path / "src.onnx", 11)
    fcn, _ = convolutionalize_model(original, SHAPE)
    assert check_larger_size(original, fcn, session(fcn), SHAPE, True).float64_max_rel is not None
    bad = _tamper(fcn, how)
    with pytest.raises(fcconv.NotEquivalentError):
        check_larger_size(original, bad, session(bad), SHAPE, True)


def test_padded_net_is_checked_against_its_onnx2torch_translation(tmp_path: Path) -> None:
    pytest.importorskip("onnx2torch")
    original = _export(_padded(), tmp_path / "src.onnx", 13)
    report = fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "fcn.onnx", SHAPE)
    assert "onnx2torch translation" in str(report.checks[1].verified_by)
    assert report.float64_max_rel is not None and report.float64_max_rel <= 1e-12
    fcn, _ = convolutionalize_model(original, SHAPE)
    for how in ["pool window off by one", "padded head conv"]:
        bad = _tamper(fcn, how)
        with pytest.raises(fcconv.NotEquivalentError):
            check_larger_size(original, bad, session(bad), SHAPE, True)


def test_a_size_nothing_can_check_is_reported_unverified(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # not installed
    _export(_padded(), tmp_path / "src.onnx", 13)
    report = fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "fcn.onnx", SHAPE)
    assert len(report.unverified) == 1 and report.unverified[0].input_shape == (1, 3, 13, 13)
    text = str(report)
    assert "map NOT verified: node" in text and "pads its input, and onnx2torch is not installed" in text
    assert "UNVERIFIED at input (1, 3, 13, 13)" in text
    assert np.isnan(report.checks[1].max_abs)


class _ChannelsLast(nn.Module):
    """A Keras-like net: (N, H, W, C) in, Transpose to channels first (as tf2onnx writes), unpadded convs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _unpadded(nn.Softmax(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("opset", [11, 13])
def test_channels_last_input_finds_its_spatial_dims_from_the_graph(tmp_path: Path, opset: int) -> None:
    model = _ChannelsLast().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 8, 8, 3),), str(tmp_path / "src.onnx"), dynamo=False,
                          opset_version=opset)
    report = fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "fcn.onnx", (8, 8, 3))
    assert report.dynamic == {0: "batch", 1: "height", 2: "width"}
    assert "on its crop (stride 2x2)" in str(report.checks[1].verified_by)
    assert report.checks[1].input_shape == (1, 3, 10, 12)  # reported channels first
    x = torch.randn(1, 13, 12, 3)
    y = run(session(tmp_path / "fcn.onnx"), x)
    assert y.shape == (1, 3, 3, 3)
    with torch.no_grad():
        assert torch.allclose(y[0, :, 1, 2], model(x[:, 2:10, 4:12])[0], atol=1e-6)
