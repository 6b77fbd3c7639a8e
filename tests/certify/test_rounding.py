"""Direct tests of the rounding rules (fcconv.certify.rounding): for single ops on random data, the
bound the tracker derives holds, ``|float32 result - float64 result| <= bound`` elementwise, and is
not absurdly loose: the largest error is within a factor ``LOOSE`` of the largest bound.

The float64 run stands in for the exact result: its own rounding (about 1e-16 relative) is far below
float32's (6e-8). The inputs are float32 values, exact in both runs, as in ``compare``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fcconv.certify.rounding import RULES, Tracker

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
LOOSE = 1000.0  # the bound may exceed the largest observed error by at most this factor

pytestmark = pytest.mark.usefixtures("one_thread")


def data(*shape: int, seed: int = 0, positive: bool = False) -> Tensor:
    """float32 values spread over several binades."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
    return x.abs() + 0.1 if positive else x


def tracked(fn: Callable[..., Tensor], *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tracker]:
    """``fn`` in float32, and in float64 under a tracker: (result32, result64, bound of result32, tracker)."""
    result32 = fn(*inputs)
    tracker = Tracker((EPS32, EPS64))
    with tracker:
        result64 = fn(*(t.double() for t in inputs))
    assert tracker.unsupported is None, tracker.unsupported
    return result32, result64, tracker.bound(result64, 0), tracker


def check(fn: Callable[..., Tensor], *inputs: Tensor) -> float:
    """Assert the bound holds and is within ``LOOSE`` of the largest error; return bound / error."""
    result32, result64, bound, _ = tracked(fn, *inputs)
    err = (result32.double() - result64).abs()
    assert float(err.max()) > 0, "no rounding happened: pick other data"
    assert bound is not None and bound.shape == result64.shape
    assert bool((err <= bound).all()), f"bound exceeded by {float((err / bound).max()):.3g}x"
    looseness = float(bound.max() / err.max())
    assert looseness <= LOOSE, f"bound {looseness:.3g}x the largest error"
    return looseness


def test_every_family_registers_rules() -> None:
    for name in ("mm", "addmm", "convolution", "add", "mul", "div", "relu", "native_layer_norm", "view",
                 "convolution_backward", "sum", "_softmax", "native_batch_norm"):
        assert name in RULES, name


def test_mm() -> None:
    check(torch.mm, data(8, 16, seed=1), data(16, 6, seed=2))


def test_addmm_linear() -> None:
    check(lambda x, w, b: F.linear(x, w, b), data(8, 16, seed=1), data(6, 16, seed=2), data(6, seed=3))


def test_convolution() -> None:
    check(lambda x, w, b: F.conv2d(x, w, b, padding=1), data(2, 2, 6, 6, seed=1), data(4, 2, 3, 3, seed=2),
          data(4, seed=3))


def test_add_and_sub() -> None:
    check(torch.add, data(64, seed=1), data(64, seed=2))
    check(lambda a, b: torch.sub(a, b, alpha=3), data(64, seed=1), data(64, seed=2))


def test_mul() -> None:
    check(torch.mul, data(64, seed=1), data(64, seed=2))


def test_mul_by_a_power_of_two_is_exact() -> None:
    _, _, bound, _ = tracked(lambda a: a * 0.25, data(64, seed=1))
    assert bound is None  # nothing rounds, and the tracker knows it


def test_div() -> None:
    check(torch.div, data(64, seed=1), data(64, seed=2, positive=True))


def test_relu_after_a_dot_product() -> None:
    # relu rounds nothing: its bound is the dot product's, where it passes the value.
    check(lambda x, w: torch.relu(x @ w), data(8, 16, seed=1), data(16, 6, seed=2))
    _, _, bound, _ = tracked(torch.relu, data(64, seed=1))
    assert bound is None


def test_layer_norm() -> None:
    check(lambda x, w, b: F.layer_norm(x, (16,), w, b), data(8, 16, seed=1), data(16, seed=2),
          data(16, seed=3))


def test_softmax() -> None:
    check(lambda x: torch.softmax(x, 1), data(8, 16, seed=1))


def test_mean() -> None:
    check(lambda x: x.mean(1), data(8, 64, seed=1))


def test_view_moves_the_bound_with_the_values() -> None:
    x, w = data(8, 16, seed=1), data(16, 6, seed=2)
    check(lambda x, w: (x @ w).view(4, 12).t(), x, w)
    _, product64, _, tracker = tracked(lambda x, w: x @ w, x, w)
    before = tracker.bound(product64, 0)
    with tracker:
        after = product64.view(4, 12)
    assert before is not None and torch.equal(tracker.bound(after, 0), before.view(4, 12))


def test_convolution_backward() -> None:
    def grad_of_conv(x: Tensor, w: Tensor, g: Tensor) -> Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad((F.conv2d(x, w, padding=1) * g).sum(), x)[0]

    check(grad_of_conv, data(2, 2, 6, 6, seed=1), data(4, 2, 3, 3, seed=2), data(2, 4, 6, 6, seed=3))


def test_float64_channel_bounds_float64_rounding() -> None:
    # The second channel (float64's eps) is the same propagation with a 2**29 times smaller eps.
    x, w = data(8, 16, seed=1), data(16, 6, seed=2)
    _, result64, bound32, tracker = tracked(torch.mm, x, w)
    assert bound32 is not None
    assert torch.allclose(tracker.bound(result64, 1), bound32 * (EPS64 / EPS32), rtol=1e-12, atol=0)


def test_an_op_without_a_rule_stops_the_propagation() -> None:
    x = data(8, seed=1).double()
    tracker = Tracker((EPS32,))
    with tracker:
        torch.cumsum(x, 0)
    assert tracker.unsupported == "aten.cumsum"


def test_padding_built_by_writes_stays_exact() -> None:
    # Circular padding copies exact values into a new tensor: the conv after it is a single rounded
    # dot product, not a second one (which would mark the bound deep and loose).
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular").double()
    x = data(2, 2, 4, 4, seed=1).double()
    tracker = Tracker((EPS32,))
    with tracker, torch.no_grad():
        y = conv(x)
    assert tracker.unsupported is None and tracker.bound(y, 0) is not None
    assert not tracker.deep(y)


# ---- whole models: the bound holds, and how loose it gets through depth ------------------------------
# Through a dot product the bound of the input is propagated by |W| (the worst case over the signs of
# the input errors), which is about sqrt(n) times the typical gain of W: every conv multiplies the
# bound's looseness by 25-60 on these random-weight nets (measured op by op on resnet18). No single
# rule is at fault; the factors below are measured and stated, not targets.


def small_cnn() -> torch.nn.Module:
    """Conv, batch norm, max pool, one residual block, adaptive average pool, Linear: three dot
    products deep."""
    torch.manual_seed(0)
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

        def forward(self, x: Tensor) -> Tensor:
            h = self.stem(x)
            return self.head(torch.relu(h + self.bn(self.conv(h))))

    return Net().eval()


def model_looseness(model: torch.nn.Module, x: Tensor) -> float:
    """Assert the bound of ``model``'s float32 output holds everywhere; return max bound / max error."""
    model64 = copy.deepcopy(model).double()
    tracker = Tracker((EPS32,))
    with torch.no_grad():
        result32 = model(x)
        with tracker:
            result64 = model64(x.double())
    assert tracker.unsupported is None, tracker.unsupported
    bound = tracker.bound(result64, 0)
    err = (result32.double() - result64).abs()
    assert float(err.max()) > 0 and bound is not None
    assert bool((err <= bound).all()), f"bound exceeded by {float((err / bound).max()):.3g}x"
    return float(bound.max() / err.max())


def test_small_cnn_bound_holds_within_a_stated_factor() -> None:
    looseness = model_looseness(small_cnn(), data(2, 3, 32, 32, seed=1))  # measured 1.9e3
    assert looseness <= 1e4, f"bound {looseness:.3g}x the largest error"


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 320])
def test_resnet18_bound_holds_but_compounds(size: int) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    looseness = model_looseness(model, x)
    # 21 dot products deep: measured 1.2e28 (224) and 1.7e28 (320). Valid, useless to catch a wrong graph.
    assert looseness <= 1e30, f"bound {looseness:.3g}x the largest error"
