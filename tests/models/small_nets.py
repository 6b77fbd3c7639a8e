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


# Lying(middle): the node that breaks exactness and why, as the proof names them.
LYING_CASES = [
    ("group_norm", "norm", "global statistics"),
    ("instance_norm", "norm", "global statistics"),
    ("batch_stats", "norm", "batch statistics"),
    ("layer_norm", "layer_norm", "normalizes over a spatial dim"),
    ("coords", "cat", "built from the input size"),
]


class Lying(nn.Module):
    """Padding-free, but ``middle`` reads global statistics or positions."""

    def __init__(self, middle: str, classes: int = 5) -> None:
        super().__init__()
        self.middle = middle
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.norm = {"group_norm": nn.GroupNorm(2, 4), "instance_norm": nn.InstanceNorm2d(4),
                     "batch_stats": nn.BatchNorm2d(4, track_running_stats=False)}.get(middle, nn.Identity())
        self.conv2 = nn.Conv2d(6 if middle == "coords" else 4, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 3 * 3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv1(x))
        if self.middle == "layer_norm":
            x = F.layer_norm(x, x.shape[1:])
        if self.middle == "coords":
            h, w = x.shape[-2:]
            ys = torch.linspace(-1, 1, h, dtype=x.dtype).view(1, 1, h, 1).expand(x.shape[0], 1, h, w)
            xs = torch.linspace(-1, 1, w, dtype=x.dtype).view(1, 1, 1, w).expand(x.shape[0], 1, h, w)
            x = torch.cat([x, ys, xs], 1)
        return self.fc(torch.flatten(F.relu(self.conv2(x)), 1))


class PadSame(nn.Module):
    """TF "same" padding computed from x.size() at run time, like timm's pad_same (traceable)."""

    def __init__(self, k: int = 3, s: int = 2) -> None:
        super().__init__()
        self.k, self.s = k, s
        self.conv1 = nn.Conv2d(3, 6, k, stride=s)
        self.conv2 = nn.Conv2d(6, 6, k, stride=s)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        ph = ((ih + self.s - 1) // self.s - 1) * self.s + self.k - ih
        pw = ((iw + self.s - 1) // self.s - 1) * self.s + self.k - iw
        return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(self._pad(x)))
        x = F.relu(self.conv2(self._pad(x)))
        return self.fc(torch.flatten(x, 1))
