"""Direct tests of the rounding rules (fcconv.certify.rounding): for single ops on random data, the
bound the tracker derives holds, ``|float32 result - float64 result| <= bound`` elementwise, and is
not absurdly loose: the largest error is within a factor ``LOOSE`` of the largest bound.

The float64 run stands in for the exact result: its own rounding (about 1e-16 relative) is far below
float32's (6e-8). The inputs are float32 values, exact in both runs, as in ``compare``.
"""

from __future__ import annotations

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
