"""Tests of FullyConvolutional.exact_sliding_window as a proof, and of why_not_exact.

A net marked exact must give the sliding window's scores (certified in float64 with
``fcconv.compare``); nets whose dense map differs from the sliding window although nothing pads
(global or batch statistics, positions from the input size) must be marked not exact, naming the
node.
"""

from __future__ import annotations

import io

import pytest
import torch
from small_nets import LYING_CASES, LeNet, Lying, lenet
from torch import nn

import fcconv
from fcconv.models import FullyConvolutional, SlidingWindow

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    torch.manual_seed(0)


def _sliding_report(model: nn.Module, fcn: FullyConvolutional,
                    size: tuple[int, int]) -> fcconv.EquivalenceReport:
    x = torch.rand(2, 3, *size, dtype=DTYPE) + 0.5
    reference = SlidingWindow(model, window=fcn.window, stride=fcn.stride)
    return fcconv.compare(reference, fcn, inputs=x)


@pytest.mark.parametrize(("middle", "node", "why"), LYING_CASES)
def test_lying_nets_are_not_exact_and_say_why(middle: str, node: str, why: str) -> None:
    model = Lying(middle).to(DTYPE).eval()
    fcn = fcconv.convolutionalize(model, (3, 9, 9))
    assert not fcn.exact_sliding_window
    assert fcn.why_not_exact is not None and fcn.why_not_exact.startswith(f"node '{node}'")
    assert why in fcn.why_not_exact
    assert "exact_sliding_window=False" in repr(fcn)
    # and rightly so: the dense map is not the sliding window
    assert not _sliding_report(model, fcn, (17, 15)).equivalent


def test_the_same_net_without_them_is_exact_and_equals_the_sliding_window() -> None:
    model = Lying("none").to(DTYPE).eval()
    fcn = fcconv.convolutionalize(model, (3, 9, 9))
    assert fcn.exact_sliding_window and fcn.why_not_exact is None
    report = _sliding_report(model, fcn, (17, 15))
    assert report.equivalent, report.reason


def test_lenet_is_exact_and_equals_the_sliding_window() -> None:
    model = lenet()
    fcn = fcconv.convolutionalize(model, (3, 32, 32))
    assert fcn.exact_sliding_window and fcn.why_not_exact is None
    report = _sliding_report(model, fcn, (44, 40))
    assert report.equivalent, report.reason


def test_padding_is_named_as_what_breaks_exactness() -> None:
    fcn = fcconv.convolutionalize(lenet(pad=2), (3, 28, 28))
    assert not fcn.exact_sliding_window
    assert str(fcn.why_not_exact).startswith("node 'c1' (Conv2d): pads the map")


def test_the_size_arithmetic_cannot_make_a_false_proof_true() -> None:
    fcn = fcconv.convolutionalize(Lying("group_norm").to(DTYPE).eval(), (3, 9, 9))
    forged = FullyConvolutional(fcn.graph_module, input_shape=fcn.input_shape, stride=fcn.stride,
                                window=fcn.window, min_size=fcn.min_size, exact_sliding_window=True)
    assert not forged.exact_sliding_window and "global statistics" in str(forged.why_not_exact)
    # and the size arithmetic's own doubt is kept where the proof has none
    doubtful = FullyConvolutional(fcn.graph_module, input_shape=fcn.input_shape, stride=fcn.stride,
                                  window=fcn.window, min_size=fcn.min_size, exact_sliding_window=False)
    assert not doubtful.exact_sliding_window and doubtful.why_not_exact


def test_checkpoint_exactness_is_recomputed_not_read() -> None:
    model = Lying("instance_norm").to(DTYPE).eval()
    fcn = fcconv.convolutionalize(model, (3, 9, 9))
    geometry = dict(fcn.geometry(), exact_sliding_window=True)  # a file that lies
    buffer = io.BytesIO()
    torch.save({"state_dict": fcn.state_dict(), "geometry": geometry}, buffer)
    buffer.seek(0)
    loaded = FullyConvolutional.from_state_dict(Lying("instance_norm").to(DTYPE),
                                                torch.load(buffer, weights_only=True))
    assert not loaded.exact_sliding_window and loaded.geometry()["exact_sliding_window"] is False
    exact = fcconv.convolutionalize(lenet(), (3, 32, 32))
    reloaded = FullyConvolutional.from_state_dict(LeNet().to(DTYPE), exact.state_dict(), exact.geometry())
    assert not reloaded.exact_sliding_window  # in training mode, as built
    assert str(reloaded.why_not_exact).startswith("module ") and "is in training mode" in str(
        reloaded.why_not_exact)
    assert reloaded.eval().exact_sliding_window  # the analysis is per mode
