"""``fcconv demo``: the textbook's two equivalences, then a digit classifier that becomes a detector.

Three acts, all offline and in a few seconds on a laptop CPU (:func:`run_demo`):

1. **The textbook** (:func:`textbook`): ``Linear(4, 2)`` and its two convolutional twins give the
   same numbers, bit for bit.
2. **A classifier becomes a detector.** The packaged 12x12 digit classifier
   (:mod:`fcconv.demo.digits`), convolutionalized, reads a whole canvas in one pass; its map is
   certified equal to :func:`fcconv.sliding_window` by :func:`fcconv.compare`, and both are timed.
   Digits are found on the map (:mod:`fcconv.demo.detection`).
3. **A picture** (:mod:`fcconv.demo.picture`): the canvas, the map over it, the detections.

Example:
    >>> result = run_demo("fcconv-demo.png", progress=False, echo=None)
    >>> result.textbook.conv_identical, result.equivalent, len(result.canvas.labels)
    (True, True, 24)
"""

from fcconv.demo.detection import Detection, detect, match_detections
from fcconv.demo.picture import FIGURE_DPI, FIGURE_SIZE, draw_picture
from fcconv.demo.run import (
    CANVAS_SIZE,
    DemoResult,
    Equality,
    TextbookResult,
    run_demo,
    save_canvas,
    summary,
    textbook,
)

__all__ = [
    "CANVAS_SIZE",
    "FIGURE_DPI",
    "FIGURE_SIZE",
    "DemoResult",
    "Detection",
    "Equality",
    "TextbookResult",
    "detect",
    "draw_picture",
    "match_detections",
    "run_demo",
    "save_canvas",
    "summary",
    "textbook",
]
