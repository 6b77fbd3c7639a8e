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
    with pytest.raises(fcconv.FcconvError, match=r"2 Gemm/MatMul node\(s\) of '.*src.onnx' could not be "
                       r"rewritten \(Gemm 'scaled': transA or alpha is set;"
                       r" MatMul 'data_matmul': its weight B"):
        fonnx.linear_to_conv(src, dst)
    assert not dst.exists()
    report = fonnx.linear_to_conv(src, dst, allow_partial=True)
    assert report.rewritten == {"Gemm -> Conv": 2}
    assert report.left == {"Gemm 'scaled'": "transA or alpha is set",
                           "MatMul 'data_matmul'": "its weight B is computed, not a constant"}
    assert "LEFT MatMul 'data_matmul': its weight B is computed" in str(report)
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


@pytest.mark.parametrize("opset", [11, 12, 13, 17])
@pytest.mark.parametrize("shape", [(6,), (5, 6), (2, 5, 6)], ids=["rank2", "rank3", "rank4"])
def test_rewrites_keep_the_files_opset(tmp_path: Path, opset: int, shape: tuple[int, ...]) -> None:
    model = _Mlp().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, *shape),), str(tmp_path / "mlp.onnx"), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}}, opset_version=opset)
    report = fonnx.linear_to_conv(tmp_path / "mlp.onnx", tmp_path / "conv.onnx")
    assert report.conv_only and not report.left
    out = onnx.load(str(tmp_path / "conv.onnx"))
    assert [o.version for o in out.opset_import if o.domain == ""] == [opset]
    onnx.checker.check_model(out, full_check=True)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.allclose(run(session(out), x), model(x), atol=1e-5)


def _shared(path: Path) -> None:
    """Two Gemms sharing one weight through Identity and a zero bias through Identity (vgg11's exporter),
    a MatMul whose float16 weight is reached through Cast, and two outputs."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Identity", ["b0"], ["b0_dedup"]),
             helper.make_node("Identity", ["w"], ["w_dedup"]),
             helper.make_node("Cast", ["w16"], ["w_cast"], to=TensorProto.FLOAT),
             helper.make_node("Gemm", ["x", "w", "b0"], ["h"], name="first", transB=1),
             helper.make_node("Gemm", ["h", "w_dedup", "b0_dedup"], ["y"], name="second", transB=1),
             helper.make_node("MatMul", ["h", "w_cast"], ["z"], name="cast_weight")]
    graph = helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 3])],
        [_init("w", rng.standard_normal((4, 4))), _init("b0", np.zeros(4)),
         numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float16), "w16")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_constants_through_identity_and_cast_and_every_output(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _shared(tmp_path / "src.onnx")
    report = fonnx.linear_to_conv(tmp_path / "src.onnx", tmp_path / "dst.onnx")
    assert report.conv_only and report.rewritten == {"Gemm -> Conv": 2, "MatMul -> Conv": 1}
    assert [c.output for c in report.checks] == ["y", "z"]
    assert all(c.float64_max_rel is not None and c.float64_max_rel <= 1e-12 for c in report.checks)
    from fcconv.onnx import rewrite as rewrite_module

    real = rewrite_module.linear_to_conv_model

    def second_output_wrong(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
        out, done = real(proto)
        out.graph.node.append(helper.make_node("Neg", ["z"], ["z_wrong"]))
        out.graph.output[1].name = "z_wrong"
        return out, done

    monkeypatch.setattr(rewrite_module, "linear_to_conv_model", second_output_wrong)
    with pytest.raises(fcconv.NotEquivalentError, match=r"In float64 the rewritten model \(output 'z'\)"):
        fonnx.linear_to_conv(tmp_path / "src.onnx", tmp_path / "wrong.onnx")


def test_an_unknown_rank_is_left_and_named(tmp_path: Path) -> None:
    """Squeeze without axes of (n, 1, 8): the rank depends on n, so shape inference cannot give it."""
    graph = helper.make_graph(
        [helper.make_node("Squeeze", ["x"], ["s"]),
         helper.make_node("MatMul", ["s", "w"], ["y"], name="dense")],
        "norank", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m"])], [_init("w", np.ones((8, 2)))])
    src = tmp_path / "src.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(src))
    with pytest.raises(fcconv.FcconvError, match=r"1 Gemm/MatMul node\(s\) of .* \(MatMul 'dense': the rank "
                       "of its input A is not inferred"):
        fonnx.linear_to_conv(src, tmp_path / "dst.onnx")
    report = fonnx.linear_to_conv(src, tmp_path / "dst.onnx", allow_partial=True)
    assert list(report.left) == ["MatMul 'dense'"] and not report.conv_only


def test_a_zipmap_output_is_refused_clearly(tmp_path: Path) -> None:
    """skl2onnx's default: probabilities as a sequence of maps (ZipMap)."""
    nodes = [helper.make_node("Gemm", ["x", "w"], ["scores"], transB=1),
             helper.make_node("Softmax", ["scores"], ["probs"], axis=1),
             helper.make_node("ZipMap", ["probs"], ["output_probability"], domain="ai.onnx.ml",
                              classlabels_int64s=[0, 1, 2])]
    maps = helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    seq = helper.make_value_info("output_probability", helper.make_sequence_type_proto(maps))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph(nodes, "zipmap", [x], [seq], [_init("w", np.ones((3, 4)))])
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.save(model, str(tmp_path / "src.onnx"))
    with pytest.raises(fcconv.FcconvError, match=r"The model's output 'output_probability' is a sequence of "
                       r"maps \(ZipMap\); fcconv.onnx rewrites and checks graphs whose outputs are tensors"):
        fonnx.linear_to_conv(tmp_path / "src.onnx", tmp_path / "dst.onnx")
