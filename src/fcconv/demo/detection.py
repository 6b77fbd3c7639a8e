"""Digits found on a class-probability map: thresholds, non-maximum suppression, matching to the truth."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from fcconv.demo.digits import BACKGROUND, MARGIN, WINDOW, Canvas

__all__ = ["NMS_RADIUS", "THRESHOLD", "TOLERANCE", "Detection", "detect", "match_detections"]

THRESHOLD = 0.5
"""A cell is a candidate detection when its winning class is a digit with at least this probability."""
NMS_RADIUS = 5.0
"""Non-maximum suppression drops candidates within this many pixels (per axis) of a stronger one."""
TOLERANCE = 2.0
"""A detection is right when it names the digit and its centre is within this many pixels (per axis)."""


@dataclass(frozen=True)
class Detection:
    """A digit found on the dense map.

    Attributes:
        cell: ``(i, j)`` index of the map cell.
        center: ``(y, x)`` centre of the cell's window, in continuous pixel coordinates.
        label: the winning digit, 0 to 9.
        confidence: its softmax probability.
        correct: whether it matched a ground-truth digit (set by :func:`match_detections`).
    """

    cell: tuple[int, int]
    center: tuple[float, float]
    label: int
    confidence: float
    correct: bool = False

    @property
    def box(self) -> tuple[float, float, float, float]:
        """``(top, left, bottom, right)`` of the 8x8 digit a centred window holds."""
        half = WINDOW / 2 - MARGIN
        y, x = self.center
        return (y - half, x - half, y + half, x + half)


def detect(
    probabilities: Tensor,
    window_of: Callable[[tuple[int, int]], tuple[int, ...]],
    *,
    threshold: float = THRESHOLD,
    radius: float = NMS_RADIUS,
) -> list[Detection]:
    """Digits on a class-probability map: cells won by a digit above ``threshold``, then greedy NMS.

    Args:
        probabilities: ``(classes, H', W')`` softmax over the classes, background last.
        window_of: maps a cell ``(i, j)`` to its window ``(top, left, bottom, right)`` in pixels.
        threshold: minimum winning probability of a candidate.
        radius: a candidate closer than or at this distance (per axis, pixels) to a kept, stronger
            one is dropped.

    Returns:
        The kept detections, strongest first.

    Example:
        >>> dets = detect(fcn(canvas).softmax(1)[0], fcn.window_of)
    """
    confidence, winner = probabilities.max(0)
    candidates = ((winner != BACKGROUND) & (confidence >= threshold)).nonzero().tolist()
    candidates.sort(key=lambda ij: -float(confidence[ij[0], ij[1]]))
    kept: list[Detection] = []
    for i, j in candidates:
        top, left, bottom, right = window_of((i, j))
        center = ((top + bottom) / 2, (left + right) / 2)
        if any(max(abs(center[0] - d.center[0]), abs(center[1] - d.center[1])) <= radius for d in kept):
            continue
        kept.append(Detection((i, j), center, int(winner[i, j]), float(confidence[i, j])))
    return kept


def match_detections(
    detections: Sequence[Detection], canvas: Canvas, *, tolerance: float = TOLERANCE
) -> tuple[list[Detection], list[bool]]:
    """Match detections to the canvas's digits: the right digit within ``tolerance`` pixels per axis.

    Each ground-truth digit matches at most one detection, strongest first.

    Returns:
        ``(detections, found)``: the detections with ``correct`` set, and for each ground-truth digit
        whether a detection found it. Precision is the fraction of correct detections, recall the
        fraction of digits found.
    """
    found = [False] * len(canvas.labels)
    marked: list[Detection] = []
    for det in sorted(detections, key=lambda d: -d.confidence):
        hit = False
        for k, ((y, x), label) in enumerate(zip(canvas.centers, canvas.labels)):
            close = max(abs(det.center[0] - y), abs(det.center[1] - x)) <= tolerance
            if not found[k] and close and det.label == label:
                found[k] = hit = True
                break
        marked.append(Detection(det.cell, det.center, det.label, det.confidence, hit))
    return marked, found
