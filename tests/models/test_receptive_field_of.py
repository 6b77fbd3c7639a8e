"""Tests of FullyConvolutional.receptive_field_of and window_of(cell, image_size).

The box ``receptive_field_of`` returns, clipped to the image, must be the bounding box of the
gradient of the cell with respect to the input (float64, positive inputs so that ReLUs and max
pools route through every tap, generic BatchNorm parameters).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from small_nets import PadSame
from torch import nn

import fcconv
from fcconv.errors import FcconvError

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    torch.manual_seed(0)


def _generic(model: nn.Module) -> nn.Module:
    """float64, eval, generic BatchNorm parameters (timm zero-initialises some, which would cut a
    residual branch out of the gradient)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.to(DTYPE).eval()


def _gradient_box(fcn: fcconv.FullyConvolutional, size: tuple[int, ...], cell: tuple[int, ...]
                  ) -> tuple[int, ...]:
    """Bounding box ``(*starts, *ends)`` of the pixels the gradient of ``cell`` reaches."""
    x = (torch.rand(2, fcn.input_shape[0], *size, dtype=DTYPE) + 0.1).requires_grad_(True)
    out = fcn(x)
    weights = torch.rand(out.shape[1], dtype=DTYPE) + 0.5
    (grad,) = torch.autograd.grad((out[(slice(None), slice(None), *cell)] * weights).sum(), x)
    nz = (grad != 0).any(0).any(0).nonzero()
    return tuple(nz.min(0).values.tolist()) + tuple((nz.max(0).values + 1).tolist())


def _clip(box: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, ...]:
    n = len(size)
    return tuple(max(b, 0) for b in box[:n]) + tuple(min(b, s) for b, s in zip(box[n:], size))


def _check(fcn: fcconv.FullyConvolutional, size: tuple[int, ...], image_size: bool = False) -> None:
    """First, middle and last cells: the field clipped to the image is the gradient's box."""
    grid = fcn.grid_shape(size)
    for cell in sorted({(0,) * len(size), tuple(g // 2 for g in grid), tuple(g - 1 for g in grid)}):
        box = fcn.receptive_field_of(cell, size if image_size else None)
        assert _clip(box, size) == _gradient_box(fcn, size, cell), (cell, box)


class Unpadded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, dilation=2)
        self.fc = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(self.pool(F.relu(self.conv1(x)))))
        return self.fc(torch.flatten(x, 1))


def test_unpadded_net_field_is_the_gradient_box_and_the_window_contains_it() -> None:
    fcn = fcconv.convolutionalize(_generic(Unpadded()), (3, 18, 18))
    assert fcn.receptive_field_of((0, 0)) == (0, 0, 16, 16)  # floor modes drop the last 2 px
    assert fcn.window_of((1, 2)) == (4, 8, 22, 26)
    for size in [(30, 27), (35, 41)]:
        _check(fcn, size)
        _check(fcn, size, image_size=True)


def test_cells_given_as_numpy_ints_and_0d_tensors() -> None:
    fcn = fcconv.convolutionalize(_generic(Unpadded()), (3, 18, 18))
    cell = np.unravel_index(5, (3, 4))
    assert fcn.receptive_field_of(cell) == fcn.receptive_field_of((1, 1))
    assert fcn.window_of((torch.tensor(1), np.int64(1))) == fcn.window_of((1, 1))


def test_tf_same_field_moves_with_the_image_size_and_needs_it() -> None:
    fcn = fcconv.convolutionalize(_generic(PadSame()), (3, 16, 16))
    with pytest.raises(FcconvError, match=r"^The receptive field depends on the image size"):
        fcn.receptive_field_of((0, 0))
    with pytest.raises(FcconvError, match=r"^The window of a cell depends on the image size"):
        fcn.window_of((0, 0))
    boxes, windows = {}, {}
    for size in [(33, 34), (34, 35)]:
        _check(fcn, size, image_size=True)
        boxes[size] = fcn.receptive_field_of((1, 1), size)
        windows[size] = fcn.window_of((1, 1), size)
        # the window keeps its place in the field: the same offset as at the training size
        field0 = fcn.receptive_field_of((0, 0), (16, 16))
        window0 = fcn.window_of((0, 0), (16, 16))
        assert [w - b for w, b in zip(windows[size], boxes[size])] == [
            w - b for w, b in zip(window0, field0)]
    assert boxes[(33, 34)] != boxes[(34, 35)] and windows[(33, 34)] != windows[(34, 35)]


def test_receptive_field_refusals() -> None:
    fcn = fcconv.convolutionalize(_generic(Unpadded()), (3, 18, 18))
    with pytest.raises(FcconvError, match=r"^cell \(2, 0\) is outside the \(2, 2\) map"):
        fcn.receptive_field_of((2, 0), (22, 22))
    with pytest.raises(FcconvError, match=r"^An input of spatial size \(10, 22\) gives no cell"):
        fcn.receptive_field_of((0, 0), (10, 22))
    norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    global_fcn = fcconv.convolutionalize(_generic(norm), (3, 8, 8))
    with pytest.raises(FcconvError, match=r"^The cells of this model have no bounded receptive field: "
                                          r"node '_1' \(GroupNorm\)"):
        global_fcn.receptive_field_of((0, 0), (12, 12))


def test_analyses_are_cached_per_size() -> None:
    fcn = fcconv.convolutionalize(_generic(Unpadded()), (3, 18, 18))
    assert fcn.analysis((30, 30)) is fcn.analysis((30, 30))
    for s in range(20, 40):
        fcn.analysis((s, s))
    assert len(fcn._analyses) <= 8


@pytest.mark.slow
def test_resnet18_field_is_the_gradient_box() -> None:
    torchvision = pytest.importorskip("torchvision")
    fcn = fcconv.convolutionalize(_generic(torchvision.models.resnet18()), (3, 224, 224))
    assert fcn.receptive_field_of((8, 8)) == (39, 39, 666, 666)  # 217 px before its window
    assert fcn.window_of((8, 8)) == (256, 256, 480, 480)
    _check(fcn, (257, 300))


@pytest.mark.slow
def test_timm_resnet10t_field_is_the_gradient_box() -> None:
    timm = pytest.importorskip("timm")
    fcn = fcconv.convolutionalize(_generic(timm.create_model("resnet10t", pretrained=False)), (3, 224, 224))
    _check(fcn, (257, 300), image_size=True)


def test_window_of_a_net_with_a_global_statistic_takes_an_image_size() -> None:
    """A squeeze-and-excitation-like block: no bounded field, but the window is still the crop."""
    norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    fcn = fcconv.convolutionalize(_generic(norm), (3, 8, 8))
    assert fcn.window_of((1, 2), (12, 12)) == fcn.window_of((1, 2)) == (1, 2, 9, 10)
