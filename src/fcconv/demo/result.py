"""What the demo measured: the textbook's numbers, the map's equality with the sliding window, the run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fcconv.certify import EquivalenceReport
from fcconv.demo.detection import Detection
from fcconv.demo.digits import Canvas

__all__ = ["DemoResult", "Equality", "TextbookResult"]


@dataclass(frozen=True)
class TextbookResult:
    """The textbook's Linear(4, 2) and its two convolutional twins, on ``[[1., 2., 3., 4.]]``.

    Attributes:
        linear: the Linear's output, ``(-0.4775, -2.1469)`` to four decimals.
        conv: ``linear_to_conv(fc, (1, 2, 2))`` on the input as ``(1, 1, 2, 2)``, flattened.
        pointwise: ``linear_to_pointwise(fc)`` on the input as ``(1, 4, 1, 1)``, flattened.
        conv_identical: whether ``conv`` equals ``linear`` bit for bit.
        pointwise_identical: whether ``pointwise`` equals ``linear`` bit for bit.
    """

    linear: tuple[float, ...]
    conv: tuple[float, ...]
    pointwise: tuple[float, ...]
    conv_identical: bool
    pointwise_identical: bool


@dataclass(frozen=True)
class Equality:
    """How the dense map compares with the sliding window.

    Attributes:
        report: :func:`fcconv.compare` of the sliding window (reference) and the dense map
            (candidate) on the canvas: the library's certificate, float64 copies and the derived
            rounding bound.
        same_winner_float32: fraction of cells whose winning class is the same in both float32 maps.
    """

    report: EquivalenceReport
    same_winner_float32: float


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` measured.

    Attributes:
        textbook: act 1.
        heldout_accuracy: the classifier's accuracy on the packaged held-out digits, centred.
        canvas: the test image and its ground truth.
        grid_shape: cells of the dense map, ``(rows, cols)``.
        exact_sliding_window: what :func:`~fcconv.models.convolutionalize` says: no layer pads, so the
            map must equal the sliding window.
        window: the window each cell classifies, ``(height, width)``; the training input size.
        stride: pixels between neighbouring cells, ``(rows, cols)``.
        equality: how the dense map and the sliding window compare (:func:`fcconv.compare`).
        dense_seconds: one dense pass over the canvas (float32, one CPU thread; best of 3).
        sliding_seconds: the sliding-window reference (float32, one CPU thread, batches of
            ``SLIDING_BATCH``; best of 3).
        dense_flops: floating-point operations of the dense pass (torch's ``FlopCounterMode``).
        sliding_flops: those of the sliding window: one window's, times the number of cells.
        detections: the detections, ``correct`` set.
        found: per ground-truth digit, whether it was found.
        picture: where the picture was written.
    """

    textbook: TextbookResult
    heldout_accuracy: float
    canvas: Canvas
    grid_shape: tuple[int, ...]
    exact_sliding_window: bool
    window: tuple[int, ...]
    stride: tuple[int, ...]
    equality: Equality
    dense_seconds: float
    sliding_seconds: float
    dense_flops: int
    sliding_flops: int
    detections: tuple[Detection, ...]
    found: tuple[bool, ...]
    picture: Path

    @property
    def equivalent(self) -> bool:
        """The dense map and the sliding window are the same function: the report's verdict.

        Not to be confused with ``exact_sliding_window``, which says why (no layer pads).
        """
        return self.equality.report.equivalent

    @property
    def speedup(self) -> float:
        """How many times faster the dense pass is than the sliding window."""
        return self.sliding_seconds / self.dense_seconds if self.dense_seconds > 0 else float("inf")

    @property
    def precision(self) -> float:
        """Fraction of detections that name the right digit at the right place."""
        return sum(d.correct for d in self.detections) / len(self.detections) if self.detections else 0.0

    @property
    def recall(self) -> float:
        """Fraction of the canvas's digits found."""
        return sum(self.found) / len(self.found) if self.found else 0.0
