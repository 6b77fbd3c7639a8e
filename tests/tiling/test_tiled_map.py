"""tiled_map and dask_map equal the untiled map on every cell, for padded and unpadded networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiling_support import assert_same_map, untiled
from torch import nn

import fcconv
from fcconv import FcconvError, NotEquivalentError
from fcconv.tiling import plan_for


@settings(max_examples=12, deadline=None)
@given(height=st.integers(16, 90), width=st.integers(16, 90), tile=st.integers(40, 100),
       seed=st.integers(0, 2**16))
def test_padded_net_any_size_and_tile(padded_fcn: fcconv.FullyConvolutional, height: int, width: int,
                                      tile: int, seed: int) -> None:
    image = np.random.default_rng(seed).random((2, height, width))
    got = fcconv.tiled_map(padded_fcn, image, tile=tile, progress=False)
    assert_same_map(got, untiled(padded_fcn, image))


@pytest.mark.parametrize("tile", [12, 13, 21, 40, (14, 30), 500])
def test_unpadded_digits_model_every_tile(digits_fcn: fcconv.FullyConvolutional, tile: object) -> None:
    image = np.random.default_rng(1).random((1, 67, 53))
    got = fcconv.tiled_map(digits_fcn, image, tile=tile, progress=False)  # type: ignore[arg-type]
    assert_same_map(got, untiled(digits_fcn, image))
    assert len(plan_for(digits_fcn, image, tile=tile)) > 1 or tile == 500  # type: ignore[arg-type]


@pytest.mark.slow
def test_resnet18_padded_with_borders() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval().double()
    fcn = fcconv.convolutionalize(model, (3, 64, 64))
    assert not fcn.exact_sliding_window
    image = np.random.default_rng(2).random((3, 290, 700))  # not a multiple of the stride or the tile
    plan = plan_for(fcn, image, tile=600)
    assert len(plan) > 1 and plan.cells_per_tile[1] < plan.grid[1]
    assert_same_map(fcconv.tiled_map(fcn, image, tile=600, progress=False), untiled(fcn, image))


def test_layout_hwc_2d_and_transform(digits_fcn: fcconv.FullyConvolutional) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (45, 61), dtype=np.uint8)
    reference = untiled(digits_fcn, pixels[None] / 255.0)

    def scale(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64) / 255

    assert_same_map(fcconv.tiled_map(digits_fcn, pixels, tile=20, transform=scale, progress=False), reference)
    hwc = np.ascontiguousarray(pixels[..., None])
    got = fcconv.tiled_map(digits_fcn, hwc, tile=20, layout="HWC", transform=scale, progress=False)
    assert_same_map(got, reference)


def test_dask_map_is_lazy_and_equal(padded_fcn: fcconv.FullyConvolutional) -> None:
    image = np.random.default_rng(4).random((2, 70, 83))
    lazy = fcconv.dask_map(padded_fcn, image, tile=48)
    plan = plan_for(padded_fcn, image, tile=48)
    assert lazy.shape == (3, *plan.grid)
    assert lazy.chunks[1][0] == plan.cells_per_tile[0] and lazy.npartitions == len(plan)
    assert_same_map(lazy.compute(scheduler="sync"), untiled(padded_fcn, image))


def test_dask_array_source(padded_fcn: fcconv.FullyConvolutional) -> None:
    da = pytest.importorskip("dask.array")
    image = np.random.default_rng(5).random((2, 64, 77))
    got = fcconv.tiled_map(padded_fcn, da.from_array(image, chunks=(2, 30, 30)), tile=50, progress=False)
    assert_same_map(got, untiled(padded_fcn, image))


def test_errors(digits_fcn: fcconv.FullyConvolutional) -> None:
    image = np.zeros((1, 40, 40))
    with pytest.raises(FcconvError, match=r"^tile \(11, 11\) is too small for this model: .* tile >= 12 "
                                          r"\(--tile 12 on the command line\)\."):
        fcconv.tiled_map(digits_fcn, image, tile=11, progress=False)
    with pytest.raises(FcconvError, match=r"^The image \(40, 11\) is smaller than the model's window"):
        fcconv.tiled_map(digits_fcn, np.zeros((1, 40, 11)), progress=False)
    with pytest.raises(FcconvError, match="^fcn must be a FullyConvolutional"):
        fcconv.tiled_map(nn.Conv2d(1, 1, 3), image, progress=False)
    with pytest.raises(FcconvError, match=r"^The image \(3, 40, 40\) read as CHW has 3 channel"):
        fcconv.tiled_map(digits_fcn, np.zeros((3, 40, 40)), progress=False)
    with pytest.raises(FcconvError, match="^Cannot read an image of type list"):
        fcconv.tiled_map(digits_fcn, [[0.0]], progress=False)
    with pytest.raises(FcconvError, match="^transform must return a tensor of the block's shape"):
        fcconv.tiled_map(digits_fcn, image, transform=lambda t: t[..., :3], progress=False)


class _Squeeze(nn.Module):
    """A squeeze-and-excitation block: each cell depends on the whole image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4 * 10 * 10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y * torch.sigmoid(y.mean((2, 3), keepdim=True))
        return self.head(torch.flatten(y, 1))


def test_non_local_model_is_refused() -> None:
    fcn = fcconv.convolutionalize(_Squeeze().eval(), (1, 12, 12))
    with pytest.raises(NotEquivalentError, match="^Cannot tile this model exactly: "):
        fcconv.tiled_map(fcn, np.zeros((1, 50, 50)), tile=20, progress=False)


class _SamePadding(nn.Module):
    """TF-style "same" padding computed from the input size: a tile would pad differently."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, stride=2)
        self.head = nn.Linear(3 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        th, tw = 1 + x.shape[-2] % 2, 1 + x.shape[-1] % 2
        x = nn.functional.pad(x, [tw // 2, tw - tw // 2, th // 2, th - th // 2])
        return self.head(torch.flatten(self.conv(x), 1))


def test_size_dependent_model_is_refused() -> None:
    fcn = fcconv.convolutionalize(_SamePadding().eval(), (1, 12, 12))
    with pytest.raises(NotEquivalentError, match="^Cannot tile this model exactly: its geometry depends on"):
        fcconv.tiled_map(fcn, np.zeros((1, 40, 41)), tile=20, progress=False, method="tiles")
    # Streamed, it is one strip of the whole image: exact (issue 15).
    image = np.random.default_rng(0).random((1, 40, 41))
    fcn = fcn.double()
    assert_same_map(fcconv.tiled_map(fcn, image, tile=20, progress=False), untiled(fcn, image))
