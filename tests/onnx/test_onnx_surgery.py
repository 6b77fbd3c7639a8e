"""fcconv.onnx.convolutionalize: surgery on ONNX files exported by someone else, checked against
fcconv.convolutionalize of the PyTorch model in float32 (within the bound compare derives); the
float64 verdict (onnx.reference) is tested in test_onnx_float64.py."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fcconv
from fcconv.certify import FLOAT64_RTOL

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import fcconv.onnx as fonnx  # noqa: E402
from fcconv.onnx._check import check_size  # noqa: E402
from fcconv.onnx._float64 import run_reference, to_float64  # noqa: E402
from fcconv.onnx._runtime import session  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def plain_export(model: nn.Module, shape: tuple[int, ...], path: Path, *, dynamo: bool) -> None:
    """What a user does: torch.onnx.export at the training size, no fcconv involved."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, *shape),), str(path), dynamo=dynamo)


class _Small(nn.Module):
    """conv -> global pool -> flatten -> Linear -> ReLU -> Linear -> softmax, and a flatten head."""

    def __init__(self, pool: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pool = pool
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 6, 3))
        self.fc1 = nn.Linear(6 if pool else 6 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        y = y.mean(dim=(2, 3)) if self.pool else torch.flatten(y, 1)
        return torch.softmax(self.fc2(torch.relu(self.fc1(y)) * 2.0 + 0.5), dim=1)


SHAPE = (3, 14, 14)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("pool", [False, True], ids=["flatten", "pool"])
def test_small_model_equals_fcconv_convolutionalize(tmp_path: Path, pool: bool, dynamo: bool) -> None:
    model = _Small(pool).eval()
    plain_export(model, SHAPE, tmp_path / "src.onnx", dynamo=dynamo)
    digest = hashlib.sha256((tmp_path / "src.onnx").read_bytes()).hexdigest()
    report = fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "fcn.onnx", SHAPE)
    assert report.conv_only and report.op_counts["Conv"] == 4
    assert report.checks[0].output_shape == (1, 4, 1, 1) and report.checks[0].max_rel < 1e-5
    fcn = fcconv.convolutionalize(model, SHAPE)
    sess = session(tmp_path / "fcn.onnx")
    for size in [SHAPE[1:], (20, 17), (31, 14)]:
        check = check_size(fcn, sess, torch.randn(2, 3, *size), "the surgery")
        assert check.output_shape == (2, 4, *fcn.grid_shape(size))
        assert check.bound_ratio is not None and check.bound_ratio <= 1
    assert hashlib.sha256((tmp_path / "src.onnx").read_bytes()).hexdigest() == digest


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vgg11", "mobilenet_v2"])
def test_torchvision_models(tmp_path: Path, name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    for bn in model.modules():  # batch norm at init with eps 0: the exporter folds it exactly
        if isinstance(bn, nn.BatchNorm2d):
            bn.eps = 0.0
    plain_export(model, (3, 224, 224), tmp_path / "src.onnx", dynamo=False)
    report = fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "fcn.onnx", (3, 224, 224))
    assert report.conv_only
    rel = report.checks[0].float64_max_rel
    assert rel is not None and rel <= 1e-13
    pools = {k for k in report.rewritten if "Pool" in k}
    assert pools == (set() if name == "vgg11" else {"GlobalAveragePool -> AveragePool 7x7"})
    assert report.rewritten.get("Gemm -> Conv 7x7" if name == "vgg11" else "Gemm -> Conv 1x1") == 1
    fcn = fcconv.convolutionalize(model, (3, 224, 224))
    check = check_size(fcn, session(tmp_path / "fcn.onnx"), torch.randn(1, 3, 320, 288), name)
    assert check.output_shape == (1, 1000, *fcn.grid_shape((320, 288)))
    assert check.bound_ratio is not None and check.bound_ratio <= 1
    x = torch.randn(1, 3, 320, 288, dtype=torch.float64)  # the float64 verdict at a larger size
    got = run_reference(to_float64(onnx.load(str(tmp_path / "fcn.onnx"))), x.numpy(), name)
    with torch.no_grad():
        want = fcn.to(torch.float64)(x).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() <= FLOAT64_RTOL


def _head_with(op: str, path: Path) -> None:
    """x (1, 2, 3, 3) -> Flatten -> Gemm -> <op> -> y."""
    w = numpy_helper.from_array(torch.randn(4, 18).numpy(), "w")
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w"], ["g"], name="fc", transB=1),
             helper.make_node(op, ["g"], ["y"], name="odd_one")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph(nodes, "head", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_an_op_the_surgery_cannot_handle_is_named(tmp_path: Path) -> None:
    _head_with("Round", tmp_path / "src.onnx")
    with pytest.raises(fcconv.FcconvError, match=r"Cannot convolutionalize node 'odd_one' \(Round\)"):
        fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "dst.onnx", (2, 3, 3))
    assert not (tmp_path / "dst.onnx").exists()
    _head_with("Relu", tmp_path / "ok.onnx")
    report = fonnx.convolutionalize(tmp_path / "ok.onnx", tmp_path / "dst.onnx", (2, 3, 3))
    assert report.rewritten["Gemm -> Conv 3x3"] == 1


def test_a_body_with_a_frozen_shape_is_refused(tmp_path: Path) -> None:
    """x -> Reshape(x, [1, 2, 3, 3]) -> Flatten -> Gemm: the reshape breaks at any other size."""
    frozen = numpy_helper.from_array(torch.tensor([1, 2, 3, 3]).numpy(), "frozen")
    w = numpy_helper.from_array(torch.randn(4, 18).numpy(), "w")
    nodes = [helper.make_node("Reshape", ["x", "frozen"], ["r"], name="body_reshape"),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph(nodes, "frozen", [x], [y], [frozen, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(tmp_path / "src.onnx"))
    with pytest.raises(fcconv.FcconvError, match=r"'body_reshape' \(Reshape\) reshapes the feature map "
                                                 r"\(1, 2, 3, 3\) to the fixed shape \[1, 2, 3, 3\]"):
        fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "dst.onnx", (2, 3, 3))
    assert not (tmp_path / "dst.onnx").exists()


def test_bad_files_and_shapes(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01garbage")
    with pytest.raises(fcconv.FcconvError, match="'.*junk.onnx' is not a valid ONNX model"):
        fonnx.convolutionalize(tmp_path / "junk.onnx", tmp_path / "dst.onnx", SHAPE)
    plain_export(_Small(True).eval(), SHAPE, tmp_path / "src.onnx", dynamo=False)
    for shape in [(3, 14), (3, 4, 14, 14)]:
        with pytest.raises(fcconv.FcconvError, match="fcconv.onnx.convolutionalize handles images"):
            fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "dst.onnx", shape)
    assert not (tmp_path / "dst.onnx").exists()
