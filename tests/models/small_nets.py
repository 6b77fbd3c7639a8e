"""Small models shared by the tests of fcconv.models (a module of helpers, not of tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fcconv.models import FullyConvolutional, sliding_window

DTYPE = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that a wrong conversion of them shows."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


class LeNet(nn.Module):
    """A network that pads nothing: its dense map is exactly the sliding window."""

    def __init__(self, pad: int = 0, ceil_mode: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 5, padding=pad)
        self.p1 = nn.MaxPool2d(2, ceil_mode=ceil_mode)
        self.c2 = nn.Conv2d(6, 16, 5)
        self.p2 = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 32)
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.p1(torch.relu(self.c1(x)))
        x = self.p2(F.relu(self.c2(x)))
        x = x.view(x.size(0), -1)
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def lenet(**kwargs: int | bool) -> LeNet:
    torch.manual_seed(0)
    return randomize_bn(LeNet(**kwargs)).to(DTYPE).eval()  # type: ignore[arg-type]


def dense_and_reference(model: nn.Module, fcn: FullyConvolutional, x: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        dense = fcn(x)
    reference = sliding_window(model, x, window=fcn.window, stride=fcn.stride, progress=False)
    return dense, reference


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class AlreadyConv(nn.Module):
    """A model that is fully convolutional already."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
