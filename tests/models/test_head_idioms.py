"""Every way people write a global pool and an affine head converts (issue 9): each idiom is a
small model, certified equal to its FCN at the training size (float64) and slid on a larger input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcconv import assert_equivalent, convolutionalize

DTYPE = torch.float64
SIZE = 15  # features 8 x 5 x 5 at the training size, stride 2


class Idiom(nn.Module):
    def __init__(self, idiom: str) -> None:
        super().__init__()
        self.idiom = idiom
        self.c1 = nn.Conv2d(3, 6, 3, stride=2)
        self.c2 = nn.Conv2d(6, 8, 3)
        self.fc = nn.Linear(8, 5)
        self.weight = nn.Parameter(torch.randn(5, 8))
        self.scale = nn.Parameter(torch.randn(5))
        self.drop = nn.Dropout2d(0.3)
        self.prelu = nn.PReLU(8)
        self.register_buffer("mean", torch.randn(5))
        self.register_buffer("var", torch.rand(5) + 0.5)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:  # noqa: PLR0911 (one return per idiom)
        idiom = self.idiom
        if idiom == "squeeze":
            return F.adaptive_avg_pool2d(x, 1).squeeze(-1).squeeze(-1)
        if idiom == "view_mean":
            return x.view(x.size(0), x.size(1), -1).mean(2)
        if idiom == "mean_mean":
            return x.mean(-1).mean(-1)
        if idiom == "sum_div":
            n, c, h, w = x.shape
            return x.sum((2, 3)) / (h * w)
        if idiom == "avg_pool_size":
            return F.avg_pool2d(x, x.size()[2:]).flatten(1)
        if idiom == "flatten_max":
            return x.flatten(2).max(2).values
        if idiom == "index":
            return F.adaptive_max_pool2d(x, 1)[:, :, 0, 0]
        if idiom == "dropout2d":
            return torch.flatten(self.drop(F.adaptive_avg_pool2d(x, 1)), 1)
        if idiom == "channels_last":
            return x.permute(0, 2, 3, 1).mean((1, 2))
        if idiom == "norm_written_out":
            y = F.adaptive_avg_pool2d(x, 1)
            y = (y - y.mean(1, keepdim=True)) * torch.rsqrt(y.var(1, keepdim=True) + 1e-5)
            return y.flatten(1)
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c2(F.relu(self.c1(x)))
        y = self.pooled(x)
        if self.idiom == "prelu":
            y = self.prelu(y)
        if self.idiom == "functional_linear":
            return F.linear(y, self.weight)
        y = self.fc(y)
        if self.idiom == "class_scale":
            y = y * self.scale + self.scale
        if self.idiom == "functional_batch_norm":
            y = F.batch_norm(y, self.mean, self.var, self.scale, self.scale, training=False, eps=1e-3)
        return y


IDIOMS = ["squeeze", "view_mean", "mean_mean", "sum_div", "avg_pool_size", "flatten_max", "index",
          "dropout2d", "channels_last", "norm_written_out", "prelu", "functional_linear",
          "class_scale", "functional_batch_norm"]


@pytest.mark.parametrize("idiom", IDIOMS)
def test_head_idiom_converts_and_slides(idiom: str) -> None:
    torch.manual_seed(0)
    model = Idiom(idiom).to(DTYPE).eval()
    fcn = convolutionalize(model, (3, SIZE, SIZE))
    assert not any(isinstance(m, nn.Linear) for m in fcn.modules())
    assert_equivalent(model, fcn, inputs=torch.randn(2, 3, SIZE, SIZE, dtype=DTYPE))
    assert fcn.stride == (2, 2) and fcn.window == (SIZE, SIZE)
    x = torch.randn(1, 3, SIZE + 6, SIZE + 4, dtype=DTYPE)
    with torch.no_grad():
        dense = fcn(x)
    assert dense.shape == (1, 5, 4, 3) and fcn.grid_shape((SIZE + 6, SIZE + 4)) == (4, 3)
    # cell (1, 2) is the model on its window (no padding here), certified in float64
    assert_equivalent(OnCrop(model, fcn.window_of((1, 2))), Cell(fcn, (1, 2)), inputs=x)


class OnCrop(nn.Module):
    def __init__(self, model: nn.Module, box: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.box = model, box

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, left, bottom, right = self.box
        return self.model(x[:, :, top:bottom, left:right])


class Cell(nn.Module):
    def __init__(self, fcn: nn.Module, cell: tuple[int, int]) -> None:
        super().__init__()
        self.fcn, self.cell = fcn, cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fcn(x)[:, :, self.cell[0], self.cell[1]]


class Vgg448(nn.Module):
    """torchvision's VGG at twice its size: AdaptiveAvgPool2d(2) sees 4x4, a fixed AvgPool2d(2)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(4 * 2 * 2, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_adaptive_pool_whose_output_divides_its_input_is_a_fixed_pool() -> None:
    torch.manual_seed(0)
    model = Vgg448().to(DTYPE).eval()
    fcn = convolutionalize(model, (3, 8, 8))
    assert_equivalent(model, fcn, inputs=torch.randn(2, 3, 8, 8, dtype=DTYPE))
    pools = [m for m in fcn.modules() if isinstance(m, nn.AvgPool2d)]
    assert len(pools) == 1 and pools[0].kernel_size == (2, 2) and pools[0].stride == (2, 2)
    assert fcn.stride == (4, 4) and fcn.grid_shape((16, 12)) == (3, 2)
    with torch.no_grad():
        assert fcn(torch.randn(1, 3, 16, 12, dtype=DTYPE)).shape == (1, 3, 3, 2)
