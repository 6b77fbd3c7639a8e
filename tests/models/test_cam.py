"""Tests of fcconv.class_activation_map: per-position scores whose spatial mean is the logits.

Each accepted head is certified by the function itself (``report.equivalent``, float64
``fcconv.compare``); the tests also check one position against the head applied by hand, and
that heads of another form are refused with the node named.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fcconv
from fcconv.errors import FcconvError, NotEquivalentError

DTYPE = torch.float64
DOCS = Path(__file__).resolve().parents[2] / "docs" / "cam.md"


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    torch.manual_seed(0)


class Net(nn.Module):
    """Features, then a global average pool written as ``pool``, then an affine head."""

    def __init__(self, pool: str = "adaptive", head: str = "affine") -> None:
        super().__init__()
        self.pool, self.head = pool, head
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2))
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(6 * (36 if pool == "flatten" else 1), 5)
        self.bn = nn.BatchNorm1d(5)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(5, 4)
        self.scale = nn.Parameter(torch.rand(4) + 0.5)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "adaptive":
            return torch.flatten(self.avg(x), 1)
        if self.pool == "mean":
            return x.mean((2, 3))
        if self.pool == "mean_mean":
            return x.mean(-1).mean(-1)
        if self.pool == "view_mean":
            return x.view(x.size(0), x.size(1), -1).mean(2)
        if self.pool == "sum":
            return x.sum((2, 3)) / (x.shape[2] * x.shape[3])
        if self.pool == "flatten_sum":
            return x.flatten(2).sum(-1) * 0.5
        if self.pool == "avg_pool":
            return F.avg_pool2d(x, x.shape[2:])[:, :, 0, 0]
        if self.pool == "max":
            return F.adaptive_max_pool2d(x, 1).flatten(1)
        return x.flatten(1)  # "flatten": a Linear over the whole map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc1(self._pool(self.features(x)))
        z = self.bn(F.relu(z) if self.head == "relu" else z)
        return self.fc2(self.drop(z)) * self.scale + 0.25


def _net(**kwargs: str) -> Net:
    net = Net(**kwargs).to(DTYPE)
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("pool", ["adaptive", "mean", "mean_mean", "view_mean", "avg_pool", "sum",
                                  "flatten_sum"])
def test_cam_mean_is_the_logits_and_each_position_is_the_head(pool: str) -> None:
    net = _net(pool=pool)
    x = torch.randn(2, 3, 15, 17, dtype=DTYPE)
    cam = fcconv.class_activation_map(net, x)
    assert cam.report is not None and cam.report.equivalent, cam.report
    assert cam.scores.shape == (2, 4, 6, 7) and cam.image_size == (15, 17)
    with torch.no_grad():
        torch.testing.assert_close(cam.logits, net(x), rtol=0, atol=0)
        # position (2, 3) is the head applied to the features there
        f = net.features(x)[:, :, 2, 3]
        f = f * (0.5 * 42 if pool == "flatten_sum" else 1)  # a sum pool, halved
        by_hand = net.fc2(net.bn(net.fc1(f))) * net.scale + 0.25
    report = fcconv.compare(_Fixed(by_hand), _Fixed(cam.scores[:, :, 2, 3]), inputs=x)
    assert report.equivalent, report
    assert "fc1" in " ".join(cam.head) and "fc2" in " ".join(cam.head)


class _Fixed(nn.Module):
    """A module that returns a fixed tensor: lets compare certify two computed tensors."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value + 0 * x.flatten(1)[:, :1]


def test_cam_upsample_and_float32() -> None:
    net = _net().float()
    x = torch.rand(1, 3, 19, 19)
    cam = fcconv.class_activation_map(net, x)
    assert cam.report is not None and cam.report.equivalent and cam.scores.dtype == torch.float32
    big = cam.upsample()
    assert big.shape == (1, 4, 19, 19)
    assert cam.upsample(mode="nearest").shape == (1, 4, 19, 19)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"head": "relu"}, r"node 'relu' \(call to torch.nn.functional.relu\), between the output and the "
                       r"global average pool, is not: it is not an affine map"),
    ({"pool": "max"}, r".*node 'adaptive_max_pool2d' .*is not: it is a max pooling"),
    ({"pool": "flatten"}, r"node 'flatten' \(.*is not: it flattens a \(6, 6, 6\) map into the head"),
])
def test_heads_of_another_form_are_refused(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(NotEquivalentError, match=r"^A class activation map is exact only for a head"):
        fcconv.class_activation_map(_net(**kwargs), torch.randn(1, 3, 15, 15, dtype=DTYPE))
    with pytest.raises(NotEquivalentError, match=message):
        fcconv.class_activation_map(_net(**kwargs), torch.randn(1, 3, 15, 15, dtype=DTYPE))


def test_bad_inputs_are_refused() -> None:
    net = _net()
    with pytest.raises(FcconvError, match=r"^x must be a floating batch of images"):
        fcconv.class_activation_map(net, torch.randn(3, 15, 15, dtype=DTYPE)[0])
    with pytest.raises(FcconvError, match=r"^class_activation_map expects an nn.Module"):
        fcconv.class_activation_map(lambda x: x, torch.randn(1, 3, 15, 15))  # type: ignore[arg-type]
    with pytest.raises(FcconvError, match=r"^Net is in training mode and contains BatchNorm1d 'bn'"):
        fcconv.class_activation_map(net.train(), torch.randn(2, 3, 15, 15, dtype=DTYPE))


@pytest.mark.slow
def test_resnet18_cam_is_certified() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().to(DTYPE).eval()
    cam = fcconv.class_activation_map(model, torch.rand(1, 3, 224, 224, dtype=DTYPE))
    assert cam.scores.shape == (1, 1000, 7, 7)
    assert cam.report is not None and cam.report.equivalent
    assert cam.pool.startswith("node 'avgpool'")


@pytest.mark.slow
def test_timm_resnet10t_cam_is_certified() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).to(DTYPE).eval()
    cam = fcconv.class_activation_map(model, torch.rand(1, 3, 160, 192, dtype=DTYPE))
    assert cam.scores.shape == (1, 10, 5, 6)
    assert cam.report is not None and cam.report.equivalent


def test_the_docs_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), {})


def test_a_pointwise_conv_after_the_pool_is_affine() -> None:
    """timm's dla: global pool, then a 1x1 Conv2d as the classifier, then a flatten."""
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Conv2d(6, 4, 1),
                        nn.Flatten()).to(DTYPE).eval()
    cam = fcconv.class_activation_map(net, torch.randn(2, 3, 9, 10, dtype=DTYPE))
    assert cam.report is not None and cam.report.equivalent and cam.scores.shape == (2, 4, 7, 8)


def test_a_layer_norm_after_the_pool_is_refused() -> None:
    """torchvision's convnext: pool, then LayerNorm2d (permute, layer_norm, permute): not affine."""

    class Norm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm, self.fc = nn.Conv2d(3, 6, 3), nn.LayerNorm(6), nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.adaptive_avg_pool2d(self.conv(x), 1)
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.fc(x.flatten(1))

    with pytest.raises(NotEquivalentError, match=r".*node 'norm' \(module 'norm': LayerNorm.*is not: it "
                                                 r"normalises each sample by its own statistics"):
        fcconv.class_activation_map(Norm().to(DTYPE).eval(), torch.randn(1, 3, 9, 9, dtype=DTYPE))
