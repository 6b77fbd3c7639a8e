"""fcconv.onnx.linear_to_conv: Gemm / MatMul(+Add) with constant weights become 1x1 Convs."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fcconv

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import fcconv.onnx as fonnx  # noqa: E402
from fcconv.onnx._check import check_size  # noqa: E402
from fcconv.onnx._runtime import run, session  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def hand_made(path: Path) -> None:
    """x (N, 6) -> Gemm(transB=0, bias (1, 5)) -> Relu -> Gemm(transB=1) -> Gemm(alpha=2) -> MatMul(x, y)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="g1"),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "w2"], ["h2"], name="g2", transB=1),
        helper.make_node("Gemm", ["h2", "w3"], ["h3"], name="scaled", alpha=2.0),
        helper.make_node("MatMul", ["h3", "h3t"], ["y"], name="data_matmul"),
        helper.make_node("Transpose", ["h3"], ["h3t"], perm=[1, 0]),
    ]
    nodes = [nodes[0], nodes[1], nodes[2], nodes[3], nodes[5], nodes[4]]
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "n"])],
        [_init("w1", rng.standard_normal((6, 5))), _init("b1", rng.standard_normal((1, 5))),
         _init("w2", rng.standard_normal((4, 5))), _init("w3", rng.standard_normal((4, 3)))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_hand_made_gemms(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.onnx", tmp_path / "dst.onnx"
    hand_made(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    report = fonnx.linear_to_conv(src, dst)
    assert report.rewritten == {"Gemm -> Conv": 2}
    left = ops(dst)
    assert left.count("Conv") == 2 and left.count("Gemm") == 1  # alpha=2: computed weights, left alone
    assert left.count("MatMul") == 1  # no constant weight
    x = torch.randn(3, 6)
    got, want = run(session(dst), x), run(session(src), x)
    assert got.shape == want.shape == (3, 3)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert report.checks[0].output_shape == (1, 1)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 7), nn.Linear(7, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("shape", [(6,), (5, 6), (2, 5, 6)], ids=["rank2", "rank3", "rank4"])
def test_torch_linears_certified_against_pytorch(tmp_path: Path, shape: tuple[int, ...]) -> None:
    model = _Mlp().eval()
    x = torch.randn(2, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation: a user's export
        torch.onnx.export(model, (x,), str(tmp_path / "mlp.onnx"), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    report = fonnx.linear_to_conv(tmp_path / "mlp.onnx", tmp_path / "conv.onnx")
    assert report.conv_only and sum(report.rewritten.values()) == 2
    check = check_size(model, session(tmp_path / "conv.onnx"), torch.randn(4, *shape), "the rewrite")
    assert check.bound_ratio is not None and check.bound_ratio <= 1


def test_not_onnx_is_refused_and_nothing_written(tmp_path: Path) -> None:
    (tmp_path / "notes.onnx").write_text("not a model")
    with pytest.raises(fcconv.FcconvError, match="'.*notes.onnx' is not a valid ONNX model"):
        fonnx.linear_to_conv(tmp_path / "notes.onnx", tmp_path / "out.onnx")
    with pytest.raises(fcconv.FcconvError, match="'.*missing.onnx' is not a file"):
        fonnx.linear_to_conv(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    hand_made(tmp_path / "src.onnx")
    with pytest.raises(fcconv.FcconvError, match="The output '.*src.onnx' is the input file"):
        fonnx.linear_to_conv(tmp_path / "src.onnx", tmp_path / "src.onnx")
    with pytest.raises(fcconv.FcconvError,
                       match="Cannot write the ONNX model to '.*out.onnx': folder '.*nowhere' does not"):
        fonnx.linear_to_conv(tmp_path / "src.onnx", tmp_path / "nowhere" / "out.onnx")
