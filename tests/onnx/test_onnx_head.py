"""Head detection in fcconv.onnx.convolutionalize by what the nodes compute (issue 16, item 3): a global
pool followed by 1x1 Convs, norms or activations before the flatten; squeeze-and-excitation blocks as
inner gating, not the head."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fcconv

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import fcconv.onnx as fonnx  # noqa: E402
from fcconv.onnx._check import check_size  # noqa: E402
from fcconv.onnx._runtime import session  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (3, 12, 12)


class _LayerNorm2d(nn.LayerNorm):
    """convnext's head norm: channels last, LayerNorm, channels first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _SE(nn.Module):
    """Squeeze-and-excitation written with Linear layers: flattens, then gates the map."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 2), nn.Linear(2, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * gate.reshape(x.shape[0], -1, 1, 1)


class _Net(nn.Module):
    def __init__(self, head: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = head
        self.trunk = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3))
        self.se = _SE(8)
        self.between = {"conv_head": nn.Sequential(nn.Conv2d(8, 10, 1), nn.Hardswish()),
                        "layernorm": _LayerNorm2d(8), "se": nn.Identity(),
                        "bn": nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())}[head]
        self.fc = nn.Linear(8 if head != "conv_head" else 10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.trunk(x)
        if self.head == "se":
            y = self.se(y)
        y = self.between(nn.functional.adaptive_avg_pool2d(y, 1))
        return self.fc(torch.flatten(y, 1))


def _export(model: nn.Module, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, *SHAPE),), str(path), dynamo=False, opset_version=opset)


@pytest.mark.parametrize(("head", "opset"), [("conv_head", 13), ("layernorm", 17), ("layernorm", 13),
                                             ("bn", 11), ("se", 13)])
def test_heads_convolutionalize_like_the_torch_path(tmp_path: Path, head: str, opset: int) -> None:
    model = _Net(head).eval()
    if head == "bn":
        bn = model.between[0]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    _export(model, tmp_path / "src.onnx", opset)
    report = fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "fcn.onnx", SHAPE)
    # the SE block's two Gemms stay: they compute the gate from the whole map, as in the torch path
    assert report.op_counts.get("Gemm", 0) == (2 if head == "se" else 0)
    assert report.rewritten["Gemm -> Conv 1x1"] == 1
    if (head, opset) in [("layernorm", 13), ("se", 13)]:  # ReduceMean / a global pool left in the body,
        # and the onnx2torch translation does not convolutionalize: the larger size is said unverified
        assert len(report.unverified) == 1
        assert "onnx2torch translation could not be convolutionalized" in str(report.unverified[0].unverified)
    else:
        assert not report.unverified
    assert "GlobalAveragePool -> AveragePool 3x3" in report.rewritten or any(
        k.startswith("ReduceMean -> AveragePool 3x3") for k in report.rewritten), report.rewritten
    rel = report.float64_max_rel
    assert rel is not None and rel <= 1e-12
    fcn = fcconv.convolutionalize(model, SHAPE)
    check = check_size(fcn, session(tmp_path / "fcn.onnx"), torch.randn(1, 3, 19, 16), head)  # SE: batch 1
    assert check.output_shape == (1, 4, *fcn.grid_shape((19, 16)))
    assert check.max_rel < 1e-5


def test_a_node_mixing_cells_between_pool_and_flatten_is_named(tmp_path: Path) -> None:
    """A 3x3 Conv with padding after the global pool reads its neighbours once the pool slides."""

    class Mixing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.mix, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.mix(nn.functional.adaptive_avg_pool2d(self.conv(x), 1)), 1))

    _export(Mixing().eval(), tmp_path / "src.onnx", 13)
    with pytest.raises(fcconv.FcconvError, match=r"Cannot convolutionalize node '.*mix/Conv' \(Conv\): it "
                       "sits between the global pool and the flatten and does not compute each cell"):
        fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "fcn.onnx", SHAPE)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "opset"), [("mobilenetv3_small_050", 11), ("convnext_atto", 17)])
def test_timm_heads(tmp_path: Path, name: str, opset: int) -> None:
    """timm's conv_head (mobilenetv3, with SE blocks in the body) and LayerNorm head (convnext)."""
    timm = pytest.importorskip("timm")
    pytest.importorskip("onnx2torch")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    shape = (3, 96, 96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, *shape),), str(tmp_path / "src.onnx"), dynamo=False,
                          opset_version=opset)
    report = fonnx.convolutionalize(tmp_path / "src.onnx", tmp_path / "fcn.onnx", shape)
    assert report.conv_only and not report.unverified
    assert "onnx2torch translation" in str(report.checks[1].verified_by)
    rel = report.float64_max_rel
    assert rel is not None and rel <= 1e-12
    fcn = fcconv.convolutionalize(model, shape)
    check = check_size(fcn, session(tmp_path / "fcn.onnx"), torch.randn(1, 3, 136, 168), name)
    assert check.output_shape == (1, 1000, *fcn.grid_shape((136, 168))) and check.max_rel < 1e-5
