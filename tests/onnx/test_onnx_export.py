"""fcconv.onnx.export: files checked in onnxruntime at several sizes, dynamic shapes, conv-only graphs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fcconv

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402

import fcconv.onnx as fonnx  # noqa: E402
from fcconv.onnx._check import check_size  # noqa: E402
from fcconv.onnx._runtime import run, session  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def small_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


SHAPE = (3, 14, 14)


def ops_of(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_export_plain_classifier_checks_the_training_size(tmp_path: Path) -> None:
    model = small_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = fonnx.export(model, tmp_path / "m.onnx", SHAPE)
    assert (tmp_path / "m.onnx").is_file()
    assert [c.input_shape for c in report.checks] == [(1, *SHAPE)]
    assert report.checks[0].output_shape == (1, 5)
    assert report.checks[0].bound_ratio is not None and report.checks[0].bound_ratio <= 1
    assert "Gemm" in report.op_counts and not report.conv_only
    assert report.dynamic == {0: "batch"}
    x = torch.randn(3, *SHAPE)  # batch 3: the batch dim is symbolic
    assert torch.allclose(run(session(tmp_path / "m.onnx"), x), model(x), rtol=0, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "checked in onnxruntime at 1 size(s)" in str(report)


def test_conv_only_leaves_no_gemm_or_matmul(tmp_path: Path) -> None:
    report = fonnx.export(small_classifier(), tmp_path / "c.onnx", SHAPE, conv_only=True)
    assert report.conv_only and report.rewritten == {"Gemm -> Conv": 2}
    assert not ops_of(tmp_path / "c.onnx") & {"Gemm", "MatMul"}
    assert report.op_counts["Conv"] == 4


def test_fully_convolutional_exports_with_symbolic_height_and_width(tmp_path: Path) -> None:
    fcn = fcconv.convolutionalize(small_classifier(), SHAPE)
    report = fonnx.export(fcn, tmp_path / "fcn.onnx", SHAPE, conv_only=True)
    sizes = [c.input_shape[2:] for c in report.checks]
    assert sizes[0] == SHAPE[1:] and tuple(fcn.min_size) in sizes
    assert any(h != w and h % 2 == 1 for h, w in sizes)  # a non-square odd size
    assert report.dynamic == {0: "batch", 2: "height", 3: "width"}
    dims = onnx.load(str(tmp_path / "fcn.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_param") for d in dims] == [True, False, True, True]
    sess = session(tmp_path / "fcn.onnx")
    for hw in [(15, 31), (40, 17), (14, 14)]:  # sizes no check used: no shape is frozen
        x = torch.randn(2, 3, *hw)
        got, want = run(sess, x), fcn(x)
        assert got.shape == want.shape == (2, 5, *fcn.grid_shape(hw))
        assert torch.allclose(got, want, rtol=0, atol=1e-5)


def test_check_sizes_are_used(tmp_path: Path) -> None:
    fcn = fcconv.convolutionalize(small_classifier(), SHAPE)
    report = fonnx.export(fcn, tmp_path / "f.onnx", SHAPE, check_sizes=[(20, 33)])
    assert [c.input_shape[2:] for c in report.checks] == [(14, 14), (20, 33)]


class _Liar(nn.Module):
    """Computes something else while exported: the check must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if torch.compiler.is_exporting():
            y = y + 1e-3
        return y


def test_a_mismatch_raises_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(fcconv.NotEquivalentError, match="the exported ONNX model differs from the PyTorch"):
        fonnx.export(_Liar().eval(), tmp_path / "bad.onnx", (3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def three_convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 10, 3, padding=1)).eval()


def with_weight_scaled(path: Path, name: str, factor: float) -> onnx.ModelProto:
    """The ONNX file with the largest entry of initializer ``name`` multiplied by ``factor``."""
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    init = next(i for i in proto.graph.initializer if i.name == name)
    a = numpy_helper.to_array(init).copy()
    a.flat[abs(a).argmax()] *= factor
    init.CopyFrom(numpy_helper.from_array(a, name))
    return proto


def test_a_wrong_weight_in_the_graph_is_caught(tmp_path: Path) -> None:
    # The check's bound is worst case and compounds through depth (docs/deploy.md, "How well is it
    # checked"): on these three convs it is about 1e4x the real float32 difference, so it catches the
    # largest first-layer weight changed by 10% (5x beyond the bound), not by 1e-3 (0.03 of it).
    model = three_convs()
    fonnx.export(model, tmp_path / "m.onnx", (3, 16, 16))
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    good = check_size(model, session(onnx.load(str(tmp_path / "m.onnx"))), x, "the file")
    assert good.bound_ratio is not None and good.bound_ratio <= 1
    wrong = with_weight_scaled(tmp_path / "m.onnx", "0.weight", 1.1)
    with pytest.raises(fcconv.NotEquivalentError, match="the wrong file differs from the PyTorch module"):
        check_size(model, session(wrong), x, "the wrong file")


class _FixedSize(nn.Module):
    """Accepts any size in eager mode but bakes the training size into a reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.reshape(y.shape[0], 4, 12, -1)[:, :, :6].mean(dim=(2, 3), keepdim=True) if y.shape[2] == 12 \
            else y.mean(dim=(2, 3), keepdim=True)


def test_a_model_that_exports_at_a_fixed_size_only_says_so(tmp_path: Path) -> None:
    with pytest.raises(fcconv.FcconvError, match=r"(?s).*(fixed size).*\(20, 16\)"):
        fonnx.export(_FixedSize().eval(), tmp_path / "fixed.onnx", (3, 14, 14), check_sizes=[(20, 16)])
    assert list(tmp_path.iterdir()) == []


def test_static_export_refuses_other_sizes(tmp_path: Path) -> None:
    with pytest.raises(fcconv.FcconvError, match="dynamic=False exports the training size"):
        fonnx.export(small_classifier(), tmp_path / "s.onnx", SHAPE, dynamic=False, check_sizes=[(20, 20)])
    report = fonnx.export(small_classifier(), tmp_path / "s.onnx", SHAPE, dynamic=False)
    assert report.dynamic == {} and report.checks[0].input_shape == (1, *SHAPE)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(fcconv.FcconvError, match="input_shape must"):
        fonnx.export(small_classifier(), tmp_path / "x.onnx", "3,14,14")  # type: ignore[arg-type]
    with pytest.raises(fcconv.FcconvError, match="check_sizes must hold spatial sizes of 2"):
        fonnx.export(small_classifier(), tmp_path / "x.onnx", SHAPE, check_sizes=[(20,)])
    with pytest.raises(fcconv.FcconvError, match="export expects a torch.nn.Module"):
        fonnx.export(lambda x: x, tmp_path / "x.onnx", SHAPE)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_resnet18_fcn_conv_only_at_three_sizes(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    fcn = fcconv.convolutionalize(torchvision.models.resnet18().eval(), (3, 224, 224))
    report = fonnx.export(fcn, tmp_path / "r18.onnx", (3, 224, 224), conv_only=True)
    assert report.conv_only and len(report.checks) == 3
    assert report.checks[-1].output_shape[2:] == fcn.grid_shape(report.checks[-1].input_shape[2:])
    assert all(c.bound_ratio is not None and c.bound_ratio <= 1 for c in report.checks)


@pytest.mark.slow
def test_resnet50_exports(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    start = time.perf_counter()
    report = fonnx.export(torchvision.models.resnet50().eval(), tmp_path / "r50.onnx", (3, 224, 224))
    assert report.checks[0].output_shape == (1, 1000)
    print(f"resnet50 export + check: {time.perf_counter() - start:.1f} s")
