"""The float64 verdict of fcconv.onnx (``onnx.reference`` on float64 graphs, FLOAT64_RTOL).

The float32 check's bound compounds through depth (docs/deploy.md, "How well is it checked"): on a
deep net it lets wrong graphs pass. These tests make the graph wrong (as an exporter or surgery bug
would) and show that ``certify="float32"`` lets it through while the float64 verdict refuses it.
"""

from __future__ import annotations

import copy
import importlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fcconv
from fcconv.certify import FLOAT64_RTOL

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

import fcconv.onnx as fonnx  # noqa: E402
from fcconv.onnx._float64 import run_reference, to_float64  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

export_module = importlib.import_module("fcconv.onnx.export")
surgery_module = importlib.import_module("fcconv.onnx.surgery")
rewrite_module = importlib.import_module("fcconv.onnx.rewrite")


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, bn: bool) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not bn), norm(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=not bn), norm(c_out)
        self.down = None if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """resnet18's shape at a small scale: stem, four residual stages (9 convs deep), pool, fc."""

    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.layers = nn.Sequential(_Block(8, 8, 1, bn), _Block(8, 16, 2, bn), _Block(16, 16, 1, bn),
                                    _Block(16, 32, 2, bn))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)
        for m in self.modules():  # batch norm with statistics, as after training
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(torch.relu(self.stem(x)))), 1))


SHAPE = (3, 16, 16)


def _transposed(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(w, -1, -2))


def _zeroed(w: np.ndarray) -> np.ndarray:
    return np.zeros_like(w)


def _scaled(w: np.ndarray) -> np.ndarray:
    w = w.copy()
    w.flat[np.abs(w).argmax()] *= 1 + 1e-3
    return w


#: (what, op type whose weight is changed, first or last such node, how)
WRONG = [("transposed conv kernel", "Conv", 0, _transposed), ("zeroed final Gemm", "Gemm", -1, _zeroed),
         ("weight x (1 + 1e-3)", "Conv", 0, _scaled)]
WRONG_IDS = [w[0] for w in WRONG]


def corrupt(proto: Any, op: str, which: int, how: Callable[[np.ndarray], np.ndarray]) -> Any:
    """A copy of ``proto`` with the weight of its first / last ``op`` node changed by ``how``."""
    proto = copy.deepcopy(proto)
    node = [n for n in proto.graph.node if n.op_type == op][which]
    init = next(i for i in proto.graph.initializer if i.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array(how(numpy_helper.to_array(init)), init.name))
    return proto


def wrong_exporter(monkeypatch: pytest.MonkeyPatch, op: str, which: int,
                   how: Callable[[np.ndarray], np.ndarray]) -> None:
    """Every file export() makes (float32 and float64) comes out wrong, as with an exporter bug."""
    real = export_module._export
    monkeypatch.setattr(export_module, "_export", lambda *a: corrupt(real(*a), op, which, how))


def plain_export(model: nn.Module, shape: tuple[int, ...], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, *shape),), str(path), dynamo=False)


def test_to_float64_casts_initializers_constants_casts_and_types(tmp_path: Path) -> None:
    nodes = [helper.make_node("Constant", [], ["c"], value_float=0.1),
             helper.make_node("Cast", ["x"], ["x32"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Mul", ["x32", "w"], ["m"]), helper.make_node("Add", ["m", "c"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array([0.1, 3.0], dtype=np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    before = model.SerializeToString()
    model64 = to_float64(model)
    assert model.SerializeToString() == before  # the input is not changed
    assert model64.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert model64.graph.initializer[0].data_type == onnx.TensorProto.DOUBLE
    onnx.checker.check_model(model64, full_check=True)
    y = run_reference(model64, np.array([1.0, 2.0]), "the model")
    assert y.dtype == np.float64
    w, c = np.array([0.1, 3.0], dtype=np.float32).astype(np.float64), np.float64(np.float32(0.1))
    np.testing.assert_array_equal(y, np.array([1.0, 2.0]) * w + c)  # the float32 values, computed in float64


def test_export_of_a_deep_net_gets_a_float64_verdict(tmp_path: Path) -> None:
    model = TinyResNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = fonnx.export(model, tmp_path / "m.onnx", SHAPE)
    assert "BatchNormalization" not in report.op_counts  # folded by the exporter: in float64 in the copy
    rel = report.checks[0].float64_max_rel
    assert rel is not None and rel < 1e-13  # float64 noise; folding in float32 would give ~1e-7
    assert report.float64_max_rel == rel and "float64 verdict (onnx.reference, 1 size(s))" in str(report)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    skipped = fonnx.export(model, tmp_path / "f.onnx", SHAPE, certify="float32")
    assert skipped.float64_max_rel is None and "float64 verdict: not run" in str(skipped)
    with pytest.raises(fcconv.FcconvError, match="certify must be one of 'float64', 'float32'; got 'no'"):
        fonnx.export(model, tmp_path / "x.onnx", SHAPE, certify="no")


@pytest.mark.parametrize(("what", "op", "which", "how"), WRONG, ids=WRONG_IDS)
def test_export_a_wrong_graph_is_caught_in_float64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str,
                                                   op: str, which: int, how: Any) -> None:
    model = TinyResNet().eval()
    wrong_exporter(monkeypatch, op, which, how)
    # The compounded float32 bound would let it pass; the error ratio does not, even with certify="float32".
    with pytest.raises(fcconv.NotEquivalentError,
                       match=r"In float32 the exported ONNX model deviates from the float64 reference \S+ "
                             r"times as much as the PyTorch module does .* \(error ratio above 10\)"):
        fonnx.export(model, tmp_path / "f32.onnx", SHAPE, certify="float32")
    with pytest.raises(fcconv.NotEquivalentError,
                       match=r"In float64 the exported ONNX model differs from the PyTorch module at input "
                             r"\(1, 3, 16, 16\) by \S+ of the largest output, above the 1e-10 threshold"):
        fonnx.export(model, tmp_path / "m.onnx", SHAPE)
    assert not (tmp_path / "m.onnx").exists()


def test_export_fcn_checks_every_size_in_float64(tmp_path: Path) -> None:
    fcn = fcconv.convolutionalize(TinyResNet().eval(), SHAPE)
    report = fonnx.export(fcn, tmp_path / "fcn.onnx", SHAPE, conv_only=True)
    assert len(report.checks) == 3 and report.conv_only
    assert all(c.float64_max_rel is not None and c.float64_max_rel < 1e-13 for c in report.checks)


@pytest.mark.parametrize(("what", "op", "which", "how"), WRONG, ids=WRONG_IDS)
def test_surgery_gone_wrong_is_caught_in_float64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str,
                                                 op: str, which: int, how: Any) -> None:
    plain_export(TinyResNet().eval(), SHAPE, tmp_path / "src.onnx")
    real = surgery_module.convolutionalize_model
    # The surgery's Gemm is now a Conv: "the final Gemm" is the last Conv.
    op, which = ("Conv", -1) if op == "Gemm" else (op, which)
    monkeypatch.setattr(surgery_module, "convolutionalize_model",
                        lambda *a: (corrupt(real(*a)[0], op, which, how), real(*a)[1]))
    report = fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "f32.onnx", SHAPE, certify="float32")
    assert report.checks[0].float64_max_rel is None  # only shapes and finiteness were checked
    with pytest.raises(fcconv.NotEquivalentError, match=r"In float64 the convolutionalized file differs from "
                                                        r"the original file at input \(1, 3, 16, 16\)"):
        fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "dst.onnx", SHAPE)
    assert not (tmp_path / "dst.onnx").exists()


def test_surgery_in_float64_equals_fcconv_convolutionalize_at_a_larger_size(tmp_path: Path) -> None:
    model = TinyResNet(bn=False).eval()  # no batch norm: the file holds the module's weights exactly
    plain_export(model, SHAPE, tmp_path / "src.onnx")
    report = fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "fcn.onnx", SHAPE)
    rel = report.checks[0].float64_max_rel
    assert rel is not None and rel < 1e-13
    fcn64 = fcconv.convolutionalize(model, SHAPE).to(torch.float64)
    x = torch.randn(1, 3, 37, 29, dtype=torch.float64)
    got = run_reference(to_float64(onnx.load(str(tmp_path / "fcn.onnx"))), x.numpy(), "the surgery")
    with torch.no_grad():
        want = fcn64(x).numpy()
    assert got.shape == want.shape == (1, 10, *fcn64.grid_shape((37, 29)))
    assert np.abs(got - want).max() / np.abs(want).max() <= FLOAT64_RTOL


@pytest.mark.parametrize(("what", "op", "which", "how"), WRONG, ids=WRONG_IDS)
def test_linear_to_conv_gone_wrong_is_caught_in_float64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        what: str, op: str, which: int, how: Any) -> None:
    plain_export(TinyResNet().eval(), SHAPE, tmp_path / "src.onnx")
    good = fonnx.linear_to_conv(tmp_path / "src.onnx", tmp_path / "good.onnx")
    assert good.checks[0].float64_max_rel is not None and good.checks[0].float64_max_rel < 1e-13
    real = rewrite_module.linear_to_conv_model
    op, which = ("Conv", -1) if op == "Gemm" else (op, which)  # the Gemm is the last Conv now
    monkeypatch.setattr(rewrite_module, "linear_to_conv_model",
                        lambda p: (corrupt(real(p)[0], op, which, how), real(p)[1]))
    report = fonnx.linear_to_conv(tmp_path / "src.onnx", tmp_path / "f32.onnx", certify="float32")
    assert report.checks[0].float64_max_rel is None  # only shapes and finiteness were checked
    with pytest.raises(fcconv.NotEquivalentError, match=r"In float64 the rewritten model differs from the "
                                                        r"original file at input \(1, 3, 16, 16\)"):
        fonnx.linear_to_conv(tmp_path / "src.onnx", tmp_path / "dst.onnx")
    assert not (tmp_path / "dst.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("what", "op", "which", "how"), [(None, None, None, None), *WRONG],
                         ids=["correct", *WRONG_IDS])
def test_resnet18_export_float64_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str | None,
                                         op: str, which: int, how: Any) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    if what is None:
        start = time.perf_counter()
        report = fonnx.export(model, tmp_path / "r18.onnx", (3, 224, 224))
        rel = report.checks[0].float64_max_rel
        assert rel is not None and rel < 1e-13
        print(f"resnet18 export + checks with the float64 verdict: {time.perf_counter() - start:.1f} s, "
              f"rel {rel:.2g}")
        return
    wrong_exporter(monkeypatch, op, which, how)
    # The compounded bound is too loose to catch it (~1e28 times the real error); the error ratio is not.
    with pytest.raises(fcconv.NotEquivalentError, match=r"In float32 the exported ONNX model deviates"):
        fonnx.export(model, tmp_path / "f32.onnx", (3, 224, 224), certify="float32")
    with pytest.raises(fcconv.NotEquivalentError, match=r"In float64 the exported ONNX model differs"):
        fonnx.export(model, tmp_path / "r18.onnx", (3, 224, 224))



def test_a_float64_copy_that_does_not_export_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = export_module._export

    def float32_only(module: nn.Module, *args: Any) -> Any:
        if next(module.parameters()).dtype == torch.float64:
            raise fcconv.FcconvError("torch.onnx.export failed on Sequential: no float64 kernel.")
        return real(module, *args)

    monkeypatch.setattr(export_module, "_export", float32_only)
    model = TinyResNet().eval()
    with pytest.raises(fcconv.FcconvError, match=r"(?s)^The float32 file is checked, but a float64 copy "
                                                 r"of the module does not export.*certify='float32'"):
        fonnx.export(model, tmp_path / "m.onnx", SHAPE)
    assert not (tmp_path / "m.onnx").exists()
    assert fonnx.export(model, tmp_path / "m.onnx", SHAPE, certify="float32").float64_max_rel is None
