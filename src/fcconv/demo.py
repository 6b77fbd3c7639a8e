"""``fcconv demo``: the textbook's two equivalences, then a digit classifier that becomes a detector.

Three acts, all offline and in a few seconds on a laptop CPU:

1. **The textbook.** With ``torch.manual_seed(123)``, ``Linear(4, 2)`` on ``[[1., 2., 3., 4.]]`` gives
   ``[[-0.4775, -2.1469]]``; the conv from :func:`fcconv.linear_to_conv` (the kernel covers the 2x2
   input) and the one from :func:`fcconv.linear_to_pointwise` (a 1x1 kernel over 4 channels) give the
   same numbers, bit for bit.
2. **A classifier becomes a detector.** The packaged 12x12 digit classifier (:mod:`fcconv.digits`),
   convolutionalized by :func:`fcconv.fcn.convolutionalize`, reads a whole canvas of held-out digits in
   one pass and returns one class score vector per 12x12 window, every 2 pixels. Because no layer
   pads, that map equals :func:`fcconv.fcn.sliding_window` (crop, classify, repeat) exactly, checked in
   float64; the demo times both. Cells whose winning class is a digit, kept by non-maximum
   suppression, are the detections, scored against the known positions.
3. **A picture** (``fcconv-demo.png``): the canvas, and over it the winning class of every cell, its
   confidence as opacity, and the detections.

Example:
    >>> result = run_demo("fcconv-demo.png", progress=False, echo=None)
    >>> result.textbook.conv_identical, result.exact, len(result.canvas.labels)
    (True, True, 24)
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fcconv._io import atomic_output
from fcconv.digits import (
    BACKGROUND,
    MARGIN,
    NUM_CLASSES,
    WINDOW,
    Canvas,
    center_in_window,
    load_digits_model,
    load_heldout,
    make_canvas,
)
from fcconv.errors import FcconvError
from fcconv.layers import linear_to_conv, linear_to_pointwise

__all__ = [
    "CANVAS_SIZE",
    "FIGURE_DPI",
    "FIGURE_SIZE",
    "DemoResult",
    "Detection",
    "TextbookResult",
    "detect",
    "draw_picture",
    "match_detections",
    "run_demo",
    "textbook",
]

CANVAS_SIZE = (64, 192)
"""Height and width of the demo's canvas, in pixels."""
FIGURE_SIZE = (12.0, 8.0)
"""Size of the picture in inches; with :data:`FIGURE_DPI` it is 1200 x 800 pixels (width x height)."""
FIGURE_DPI = 100
THRESHOLD = 0.5
"""A cell is a candidate detection when its winning class is a digit with at least this probability."""
NMS_RADIUS = 5.0
"""Non-maximum suppression drops candidates within this many pixels (per axis) of a stronger one."""
TOLERANCE = 2.0
"""A detection is right when it names the digit and its centre is within this many pixels (per axis)."""
SLIDING_BATCH = 256
"""Batch size of the sliding-window reference the dense map is timed against."""
_BOUND_MARGIN = 1.01
_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")

Echo = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Act 1: the textbook


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


def textbook() -> TextbookResult:
    """The textbook's two scenarios, computed with :func:`fcconv.linear_to_conv` and ``linear_to_pointwise``.

    The global random state is saved and restored around ``torch.manual_seed(123)``.

    Example:
        >>> textbook().linear
        (-0.4775..., -2.1469...)
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        fc = nn.Linear(4, 2)
    inputs = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    with torch.no_grad():
        out_fc = fc(inputs)
        out_conv = linear_to_conv(fc, (1, 2, 2))(inputs.reshape(-1, 1, 2, 2)).flatten(1)
        out_pointwise = linear_to_pointwise(fc)(inputs.reshape(-1, 4, 1, 1)).flatten(1)

    def values(t: Tensor) -> tuple[float, ...]:
        return tuple(float(v) for v in t.flatten())

    return TextbookResult(
        linear=values(out_fc),
        conv=values(out_conv),
        pointwise=values(out_pointwise),
        conv_identical=torch.equal(out_fc, out_conv),
        pointwise_identical=torch.equal(out_fc, out_pointwise),
    )


# --------------------------------------------------------------------------------------------
# Act 2: detection on the dense map


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


# --------------------------------------------------------------------------------------------
# The whole demo


@dataclass(frozen=True)
class Equality:
    """How the dense map compares with the sliding window, value by value.

    Attributes:
        within_bound: in float64, every value differs by at most the rounding bound of the two
            computations (:func:`rounding_bound`, twice): equal up to rounding.
        bitwise_fraction: the fraction of float64 values that are bit-identical.
        max_difference: largest absolute float64 difference.
        max_bound: largest float64 bound.
        max_difference_float32: largest absolute difference in float32, the dtype the detector uses.
        same_winner_float32: fraction of cells whose winning class is the same in both float32 maps.
    """

    within_bound: bool
    bitwise_fraction: float
    max_difference: float
    max_bound: float
    max_difference_float32: float
    same_winner_float32: float


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` measured.

    Attributes:
        textbook: act 1.
        heldout_accuracy: the classifier's accuracy on the packaged held-out digits, centred.
        canvas: the test image and its ground truth.
        grid_shape: cells of the dense map, ``(rows, cols)``.
        exact_sliding_window: what :func:`~fcconv.fcn.convolutionalize` says: no layer pads, so the
            map must equal the sliding window.
        window: the window each cell classifies, ``(height, width)``; the training input size.
        stride: pixels between neighbouring cells, ``(rows, cols)``.
        equality: how the dense map and the sliding window compare, in float64 and float32.
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
    def exact(self) -> bool:
        """The float64 dense map equals the sliding window up to rounding, in every value."""
        return self.equality.within_bound

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


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a :class:`Path` if a picture can be written there, else an :class:`FcconvError`.

    Example:
        >>> check_output_path("fcconv-demo.png")
        PosixPath('fcconv-demo.png')
    """
    out = Path(path).expanduser()
    if out.is_dir():
        raise FcconvError(f"Cannot write the demo picture to {str(out)!r}: it is a folder. Give a file name.")
    if out.suffix.lower() not in _SUFFIXES:
        raise FcconvError(
            f"Cannot write the demo picture to {str(out)!r}: expected a file name ending in "
            f"{', '.join(_SUFFIXES)}; got {out.suffix or 'no extension'!r}. Use e.g. fcconv-demo.png."
        )
    folder = out.parent
    if not folder.is_dir():
        raise FcconvError(
            f"Cannot write the demo picture to {str(out)!r}: folder {str(folder)!r} does not exist. "
            "Create it or choose another path."
        )
    if not os.access(folder, os.W_OK):
        raise FcconvError(
            f"Cannot write the demo picture to {str(out)!r}: folder {str(folder)!r} is not writable. "
            "Choose another path."
        )
    return out


def _best_time(fn: Callable[[], Tensor], repeats: int) -> tuple[float, Tensor]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    if result is None:
        raise FcconvError("_best_time needs repeats >= 1.")
    return best, result


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the block on one CPU thread, then restore torch's setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _crops(image: Tensor, window: Sequence[int], stride: Sequence[int]) -> Tensor:
    """Every window of ``image`` ``(1, C, H, W)``, row by row: ``(cells, C, *window)``."""
    crops = image.unfold(2, window[0], stride[0]).unfold(3, window[1], stride[1])
    return crops.permute(0, 2, 3, 1, 4, 5).reshape(-1, image.shape[1], *window)


def _as_map(per_window: Tensor, shape: Sequence[int]) -> Tensor:
    """``(cells, classes)`` in row-major cell order -> ``(1, classes, rows, cols)`` like the dense map."""
    return per_window.reshape(1, shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)


def _apply_weight(layer: nn.Conv2d | nn.Linear, weight: Tensor, x: Tensor) -> Tensor:
    """``layer`` applied to ``x`` with ``weight`` in place of its own, without bias."""
    if isinstance(layer, nn.Conv2d):
        return nn.functional.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation,
                                    layer.groups)
    return nn.functional.linear(x, weight)


def rounding_bound(model: nn.Module, windows: Tensor) -> Tensor:
    """An upper bound on the rounding error of ``model(windows)``, whatever the summation order.

    Each Linear or conv computes ``y = W x + b`` with ``K`` products per output; in floating point,
    summed in *any* order, ``|fl(y) - y| <= gamma(K + 1) (|W| |x| + |b|)`` with
    ``gamma(n) = n u / (1 - n u)`` and ``u`` the unit roundoff (Higham, *Accuracy and Stability of
    Numerical Algorithms*, section 3.1). An error ``e`` already in ``x`` adds ``|W| e``; ReLU and max
    pooling never enlarge it. Two computations of the same network that differ only in summation
    order (a dense map and a sliding window, say) therefore differ by at most twice this bound.

    Args:
        model: a :class:`~fcconv.digits.DigitsCNN` (conv, linear, ReLU, max-pool and flatten layers).
        windows: the inputs, ``(N, 1, 12, 12)``, in the dtype whose rounding is bounded.

    Returns:
        ``(N, classes)``, the bound for each output.
    """
    u = torch.finfo(windows.dtype).eps / 2

    def gamma(n: int) -> float:
        return n * u / (1 - n * u)

    # The bound is a sum of non-negative terms, computed fast in float32: its own relative rounding
    # (under 1e-4 for these few layers of at most 289 products) is covered by a 1% margin.
    model = copy.deepcopy(model).to(torch.float32)
    x = windows.to(torch.float32)
    err = torch.zeros_like(x)
    layers = [*model.features, nn.Flatten(), *model.classifier]  # type: ignore[misc]
    for layer in layers:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            weight = layer.weight.abs()
            bias = layer.bias.abs() if layer.bias is not None else None
            fan_in = weight[0].numel()
            magnitude = _apply_weight(layer, weight, x.abs() + err)
            if bias is not None:
                magnitude = magnitude + bias.reshape(-1, *([1] * (magnitude.ndim - 2)))
            err = _apply_weight(layer, weight, err) + gamma(fan_in + 1) * magnitude
            x = layer(x)
        elif isinstance(layer, (nn.ReLU, nn.Flatten, nn.MaxPool2d)):
            x = layer(x)
            err = layer(err) if not isinstance(layer, nn.ReLU) else err
        else:
            raise FcconvError(f"rounding_bound does not know layer {type(layer).__name__}.")
    return (err * _BOUND_MARGIN).to(windows.dtype)


@dataclass(frozen=True)
class _Comparison:
    exact_sliding_window: bool
    window: tuple[int, ...]
    stride: tuple[int, ...]
    window_of: Callable[[tuple[int, int]], tuple[int, ...]]
    equality: Equality
    dense_seconds: float
    sliding_seconds: float
    dense_flops: int
    sliding_flops: int


def _flops(model: nn.Module, x: Tensor) -> int:
    """Floating-point operations of ``model(x)`` in its convs and Linears: 2 per multiply-add.

    The count torch's ``FlopCounterMode`` gives for these layers (bias and activations left out),
    without its import cost.
    """
    total = 0

    def count(layer: nn.Module, _inputs: object, output: Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Linear):
            total += 2 * output.numel() * layer.in_features
        elif isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            total += 2 * output.numel() * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


def _dense_and_sliding(model: nn.Module, canvas: Canvas, *, progress: bool) -> tuple[Tensor, _Comparison]:
    """The float32 dense map of ``canvas``, timed against the sliding window and checked against it."""
    from fcconv.fcn import convolutionalize, sliding_window  # the demo sits above the model passes

    batch = canvas.image.unsqueeze(0)
    input_shape = (1, WINDOW, WINDOW)
    fcn = convolutionalize(model, input_shape)
    window, stride = tuple(fcn.window), tuple(fcn.stride)

    def slide(net: nn.Module, image: Tensor, show: bool) -> Tensor:
        return sliding_window(net, image, window=window, stride=stride, batch_size=SLIDING_BATCH,
                              progress=show)

    with torch.inference_mode():
        with _one_thread():  # both timed alike: these small convs gain nothing from more threads
            fcn(batch)  # warm-up: the first call of a conv sets up its kernels
            dense_seconds, dense = _best_time(lambda: fcn(batch), 3)
            shows = [progress, False, False]
            sliding_seconds, sliding = _best_time(lambda: slide(model, batch, shows.pop(0)), 3)
        # Equal up to rounding: the two sum the same products in different orders (a conv over the
        # whole canvas against the same layers on each crop), so they may differ in the last bits,
        # but never by more than the rounding bound of each. Checked in float64, where that bound is
        # tight enough to catch any real difference (a misplaced window changes values by O(1)).
        model64 = copy.deepcopy(model).to(torch.float64)
        dense64 = copy.deepcopy(fcn).to(torch.float64)(batch.double())
        sliding64 = slide(model64, batch.double(), False)
        bound64 = 2 * _as_map(rounding_bound(model64, _crops(batch.double(), window, stride)), dense.shape)
        diff64 = (dense64 - sliding64).abs()
        equality = Equality(
            within_bound=bool((diff64 <= bound64).all()),
            bitwise_fraction=float((dense64 == sliding64).double().mean()),
            max_difference=float(diff64.max()),
            max_bound=float(bound64.max()),
            max_difference_float32=float((dense - sliding).abs().max()),
            same_winner_float32=float((dense.argmax(1) == sliding.argmax(1)).double().mean()),
        )
        dense_flops = _flops(fcn, batch)
        cells = dense.shape[2] * dense.shape[3]
        sliding_flops = cells * _flops(model, batch[:, :, : window[0], : window[1]])
    comparison = _Comparison(bool(fcn.exact_sliding_window), window, stride, fcn.window_of, equality,
                             dense_seconds, sliding_seconds, dense_flops, sliding_flops)
    return dense, comparison


def run_demo(
    picture: str | os.PathLike[str] = "fcconv-demo.png",
    *,
    seed: int = 0,
    progress: bool = True,
    echo: Echo | None = print,
) -> DemoResult:
    """Run the demo: the textbook, the classifier turned detector, and the picture.

    Args:
        picture: where to write the picture (``.png``, ``.pdf``, ``.svg`` or ``.jpg``); written
            atomically, so a failed run leaves no file.
        seed: picks the digits and their places on the canvas.
        progress: show a progress bar for the sliding-window reference.
        echo: prints each line of the summary; ``None`` prints nothing.

    Returns:
        The measured :class:`DemoResult`.

    Raises:
        FcconvError: if the picture cannot be written there, or the packaged data are missing.

    Example:
        >>> result = run_demo("fcconv-demo.png", progress=False, echo=None)
        >>> print(f"{result.speedup:.0f}x faster, recall {result.recall:.0%}")
        15x faster, recall 96%
    """
    out = check_output_path(picture)
    say: Echo = echo if echo is not None else (lambda _line: None)
    # The temporary file is created first, so an unwritable place fails before any work.
    with atomic_output(out, what="the demo picture") as tmp:
        book = textbook()
        model = load_digits_model()
        images, labels = load_heldout()
        with torch.inference_mode():
            heldout_accuracy = float((model(center_in_window(images)).argmax(1) == labels).float().mean())
        canvas = make_canvas(*CANVAS_SIZE, seed=seed)
        dense, comparison = _dense_and_sliding(model, canvas, progress=progress)
        probabilities = dense.softmax(1)[0]
        detections, found = match_detections(detect(probabilities, comparison.window_of), canvas)
        result = DemoResult(
            textbook=book,
            heldout_accuracy=heldout_accuracy,
            canvas=canvas,
            grid_shape=tuple(dense.shape[2:]),
            exact_sliding_window=comparison.exact_sliding_window,
            window=comparison.window,
            stride=comparison.stride,
            equality=comparison.equality,
            dense_seconds=comparison.dense_seconds,
            sliding_seconds=comparison.sliding_seconds,
            dense_flops=comparison.dense_flops,
            sliding_flops=comparison.sliding_flops,
            detections=tuple(detections),
            found=tuple(found),
            picture=out,
        )
        draw_picture(result, probabilities, tmp, comparison.window_of)
    for line in summary(result):
        say(line)
    return result


# --------------------------------------------------------------------------------------------
# The summary and the picture


def _numbers(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def summary(result: DemoResult) -> list[str]:
    """The printed summary of a demo run, one string per line."""
    book = result.textbook
    eq = result.equality
    same = {True: "bit-identical to the Linear", False: "NOT bit-identical to the Linear"}
    h, w = result.canvas.image.shape[-2:]
    gh, gw = result.grid_shape
    n = len(result.canvas.labels)
    right = sum(d.correct for d in result.detections)
    values = gh * gw * NUM_CLASSES
    verdict = (
        f"equal up to rounding in all {values} values" if result.exact
        else "DIFFERENT beyond rounding (a bug: please report it)"
    )
    return [
        "1. The textbook: torch.manual_seed(123); fc = Linear(4, 2); x = [[1., 2., 3., 4.]]",
        f"   fc(x)                                         = {_numbers(book.linear)}",
        f"   linear_to_conv(fc, (1, 2, 2)) on x as 1x1x2x2 = {_numbers(book.conv)}  "
        f"{same[book.conv_identical]}",
        f"   linear_to_pointwise(fc) on x as 1x4x1x1       = {_numbers(book.pointwise)}  "
        f"{same[book.pointwise_identical]}",
        "",
        "2. A classifier becomes a detector",
        f"   model      DigitsCNN, {result.window[0]}x{result.window[1]} windows -> 10 digits + background; "
        f"held-out accuracy {result.heldout_accuracy:.1%}",
        f"   canvas     {h}x{w}, {n} held-out digits; convolutionalized "
        f"({'no layer pads' if result.exact_sliding_window else 'a layer pads'}): "
        f"a {gh}x{gw} map, stride {result.stride[0]}",
        f"   exactness  dense map vs sliding window: {verdict}",
        f"              float64 max |difference| {eq.max_difference:.1e} <= rounding bound "
        f"{eq.max_bound:.1e} ({eq.bitwise_fraction:.0%} bit-identical)",
        f"              float32 max |difference| {eq.max_difference_float32:.1e}, same winning class in "
        + ("every cell" if eq.same_winner_float32 == 1.0 else f"{eq.same_winner_float32:.1%} of the cells"),
        f"   time       dense map, one pass {result.dense_seconds * 1e3:.1f} ms | sliding window "
        f"{result.sliding_seconds * 1e3:.1f} ms (batches of {SLIDING_BATCH}) | "
        f"{result.speedup:.1f}x faster",
        f"              the dense map does {result.sliding_flops / result.dense_flops:.1f}x fewer FLOPs; "
        "float32, one CPU thread, best of 3",
        f"   detection  precision {result.precision:.1%} ({right} of {len(result.detections)} detections "
        f"right), recall {result.recall:.1%} ({sum(result.found)} of {n} digits found)",
        "",
        f"3. Picture: {result.picture}",
    ]


def draw_picture(
    result: DemoResult,
    probabilities: Tensor,
    path: str | os.PathLike[str],
    window_of: Callable[[tuple[int, int]], tuple[int, ...]],
) -> None:
    """Draw the demo's picture: the canvas, then the dense map and the detections over it.

    The figure is :data:`FIGURE_SIZE` inches at :data:`FIGURE_DPI` (1200 x 800 pixels). Top: the
    canvas with the true digits. Bottom: each map cell coloured by its winning digit, opacity its
    confidence (background cells stay clear), the ink drawn over it, detections boxed and labelled
    (green right, red wrong), missed digits dashed.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    canvas = result.canvas
    image = canvas.image[0].detach().cpu().float()
    h, w = image.shape
    confidence, winner = probabilities.detach().cpu().float().max(0)
    gh, gw = winner.shape

    colors = [matplotlib.colormaps["tab10"](d)[:3] for d in range(10)]
    palette = torch.tensor(colors, dtype=torch.float32)
    overlay = torch.zeros(gh, gw, 4)
    overlay[..., :3] = palette[winner.clamp(max=9)]
    overlay[..., 3] = torch.where(winner != BACKGROUND, _alpha(confidence), torch.zeros(()))
    ink = torch.zeros(h, w, 4)
    ink[..., 3] = 0.8 * image.clamp(0, 1)  # let the class colours show through the ink
    # Cell (i, j) stands for the window window_of((i, j)); draw it as a stride-sized block around
    # the window's centre (in imshow's coordinates pixel p spans [p - 0.5, p + 0.5]).
    t0, l0, b0, r0 = window_of((0, 0))
    sy, sx = result.stride
    cy, cx = (t0 + b0) / 2 - 0.5, (l0 + r0) / 2 - 0.5
    extent = (cx - sx / 2, cx - sx / 2 + gw * sx, cy - sy / 2 + gh * sy, cy - sy / 2)

    fig = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    grid = fig.add_gridspec(2, 2, width_ratios=(1, 0.1), left=0.02, right=0.93, top=0.86, bottom=0.03,
                            hspace=0.16, wspace=0.03)
    top, bottom = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0])
    n = len(canvas.labels)
    fig.suptitle(
        f"A {result.window[0]}x{result.window[1]} digit classifier, convolutionalized, reads the whole "
        f"{h}x{w} canvas in one pass\n{gh}x{gw} windows, "
        f"{'equal to the sliding window' if result.exact else 'NOT equal to the sliding window'}, "
        f"{result.speedup:.0f}x faster. Detection: precision {result.precision:.0%}, "
        f"recall {result.recall:.0%}",
        fontsize=13,
    )

    top.imshow(image.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    top.set_title(f"Input: {n} held-out digits the model never saw in training (true labels in grey)",
                  fontsize=10, loc="left")
    for (_, _, gt_bottom, gt_right), label in zip(canvas.boxes, canvas.labels):
        top.text(gt_right, gt_bottom - 0.5, str(label), ha="left", va="bottom", fontsize=9, color="0.45")

    bottom.imshow(overlay.numpy(), extent=extent, interpolation="nearest")
    bottom.imshow(ink.numpy(), interpolation="nearest")
    bottom.set_title("Output: each cell coloured by its winning digit, opacity = confidence; "
                     "detections boxed and labelled", fontsize=10, loc="left")
    for det in result.detections:
        t, left, b, r = det.box
        color = _RIGHT if det.correct else _WRONG
        bottom.add_patch(Rectangle((left - 1, t - 1), r - left + 1, b - t + 1, fill=False, lw=1.5,
                                   ec=color))
        bottom.text(left - 1, t - 1.3, str(det.label), ha="left", va="bottom", fontsize=11,
                    fontweight="bold", color=color)
    for (gt_top, gt_left, gt_bottom, gt_right), hit in zip(canvas.boxes, result.found):
        if not hit:
            bottom.add_patch(Rectangle((gt_left - 1.5, gt_top - 1.5), gt_right - gt_left + 2,
                                       gt_bottom - gt_top + 2, fill=False, lw=1.5, ec=_MISSED, ls="--"))
    for ax in (top, bottom):
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])

    side = grid[1, 1].subgridspec(1, 2, width_ratios=(1, 0.35), wspace=0.2)
    legend_ax = fig.add_subplot(side[0, 0])
    legend_ax.axis("off")
    handles = [Patch(color=colors[d], label=str(d)) for d in range(10)]
    handles += [
        Patch(fill=False, ec=_RIGHT, lw=1.5, label="right"),
        Patch(fill=False, ec=_WRONG, lw=1.5, label="wrong"),
        Patch(fill=False, ec=_MISSED, lw=1.5, ls="--", label="missed"),
    ]
    legend_ax.legend(handles=handles, loc="center", fontsize=9, title="digit", title_fontsize=9,
                     frameon=False, handlelength=1.2)
    bar_ax = fig.add_subplot(side[0, 1])
    levels = torch.linspace(0, 1, 101)
    grey = ListedColormap([(0.35, 0.35, 0.35, float(a)) for a in _alpha(levels)])
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=Normalize(0, 1), cmap=grey), cax=bar_ax)
    bar_ax.set_title("confidence", fontsize=9, loc="right")
    bar_ax.tick_params(labelsize=8)
    fig.savefig(path, dpi=FIGURE_DPI, format=Path(path).suffix.lstrip(".").lower().replace("jpg", "jpeg"))


_RIGHT, _WRONG, _MISSED = "#1a9850", "#d73027", "#f46d43"


def _alpha(confidence: Tensor) -> Tensor:
    """Opacity of a map cell: faint below the detection threshold, strong above."""
    return 0.1 + 0.8 * confidence.clamp(0, 1)


# --------------------------------------------------------------------------------------------
# The canvas as a picture, for ``fcconv heatmap``


def save_canvas(path: str | os.PathLike[str], *, seed: int = 0) -> Canvas:
    """Write the demo's test canvas to ``path`` as an 8-bit grayscale PNG; return the canvas.

    White ink on black, 192x64 pixels (:data:`CANVAS_SIZE`), the held-out digits that ``seed`` picks:
    what the embedded model reads (``fcconv heatmap fcconv.digits:load_digits_model canvas.png
    --input 1,12,12``). Written atomically. Needs Pillow (the ``cli`` extra).

    Raises:
        FcconvError: if ``path`` does not end in ``.png`` or cannot be written.

    Example:
        >>> len(save_canvas("canvas.png", seed=0).labels)
        24
    """
    from PIL import Image

    out = Path(path).expanduser()
    if out.suffix.lower() != ".png":
        raise FcconvError(f"Cannot write the canvas to {str(out)!r}: expected a .png file (lossless); "
                          f"got {out.suffix or 'no extension'!r}. Use e.g. canvas.png.")
    canvas = make_canvas(*CANVAS_SIZE, seed=seed)
    pixels = (canvas.image[0] * 255).round().to(torch.uint8).numpy()
    with atomic_output(out, what="the canvas") as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")  # uint8 (H, W): mode "L"
    return canvas
