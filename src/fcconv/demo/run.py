"""The demo run: the textbook numbers, the dense map against the sliding window, the summary."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

from fcconv import compare
from fcconv._io import IMAGE_SUFFIXES, atomic_output, check_output_path
from fcconv.demo.detection import detect, match_detections
from fcconv.demo.digits import (
    NUM_CLASSES,
    WINDOW,
    Canvas,
    center_in_window,
    load_digits_model,
    load_heldout,
    make_canvas,
)
from fcconv.demo.picture import draw_picture
from fcconv.demo.result import DemoResult, Equality, TextbookResult
from fcconv.layers import linear_to_conv, linear_to_pointwise
from fcconv.models import SlidingWindow, convolutionalize, sliding_window

__all__ = [
    "CANVAS_SIZE", "CANVAS_SUFFIXES", "DemoResult", "Equality", "TextbookResult", "run_demo", "save_canvas",
    "summary", "textbook",
]

CANVAS_SIZE = (64, 192)
"""Height and width of the demo's canvas, in pixels."""
SLIDING_BATCH = 256
"""Batch size of the sliding-window reference the dense map is timed against."""

Echo = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Act 1: the textbook


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
# The whole demo


def _best_of_3(fn: Callable[[], object]) -> float:
    """Seconds of the fastest of three runs of ``fn`` on one CPU thread, after a warm-up run."""
    timer = Timer("fn()", globals={"fn": fn}, num_threads=1)
    timer.timeit(1)  # the first call of a conv sets up its kernels
    return min(timer.timeit(1).mean for _ in range(3))


def _flops(model: nn.Module, x: Tensor) -> int:
    """Floating-point operations of ``model(x)``, counted by torch's ``FlopCounterMode``."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


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


def _dense_and_sliding(model: nn.Module, canvas: Canvas, *, progress: bool) -> tuple[Tensor, _Comparison]:
    """The float32 dense map of ``canvas``, timed against the sliding window and certified equal to it."""
    batch = canvas.image.unsqueeze(0)
    fcn = convolutionalize(model, (1, WINDOW, WINDOW))
    window, stride = tuple(fcn.window), tuple(fcn.stride)
    sliding = SlidingWindow(model, window=window, stride=stride, batch_size=SLIDING_BATCH)
    with torch.inference_mode():
        dense = fcn(batch)
        slid = sliding_window(model, batch, window=window, stride=stride, batch_size=SLIDING_BATCH,
                              progress=progress)
        # Both timed alike, on one thread: these small convs gain nothing from more threads.
        dense_seconds = _best_of_3(lambda: fcn(batch))
        sliding_seconds = _best_of_3(lambda: sliding(batch))
    # Equal up to rounding: the two sum the same products in different orders, so they may differ
    # in the last bits, never by more than the rounding bound that compare derives.
    report = compare(sliding, fcn, inputs=batch)
    equality = Equality(report, float((dense.argmax(1) == slid.argmax(1)).double().mean()))
    cells = dense.shape[2] * dense.shape[3]
    comparison = _Comparison(bool(fcn.exact_sliding_window), window, stride, fcn.window_of, equality,
                             dense_seconds, sliding_seconds, _flops(fcn, batch),
                             cells * _flops(model, batch[:, :, : window[0], : window[1]]))
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
    out = check_output_path(picture, what="the demo picture", suffixes=IMAGE_SUFFIXES)
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
        f"equal up to rounding in all {values} values" if result.equivalent
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
        f"              certified by fcconv.compare: float64 max relative difference "
        f"{eq.report.float64_max_rel:.1e}; float32 max |difference| {eq.report.max_abs:.1e}, "
        f"{eq.report.bit_identical_fraction:.0%} bit-identical",
        "              same winning class in "
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


CANVAS_SUFFIXES = (".png", ".tif", ".tiff")


def save_canvas(path: str | os.PathLike[str], *, seed: int = 0,
                size: tuple[int, int] = CANVAS_SIZE) -> Canvas:
    """Write a canvas of held-out digits to ``path`` as 8-bit grayscale; return the canvas.

    White ink on black, ``size = (height, width)`` pixels (the demo's 64x192 by default), the
    held-out digits that ``seed`` picks: what the embedded model reads (``fcconv heatmap
    fcconv.demo.digits:load_digits_model canvas.png --input 1,12,12``). A ``.png`` needs Pillow (the
    ``cli`` extra); a ``.tif``/``.tiff`` is written tiled (256x256 blocks) with tifffile (the ``tiles``
    extra), the way large scans are stored, for ``fcconv heatmap ... -o map.zarr``. Written atomically.

    Raises:
        FcconvError: if ``path`` is not a .png, .tif or .tiff, or cannot be written.

    Example:
        >>> len(save_canvas("canvas.png", seed=0).labels)
        24
    """
    out = check_output_path(path, what="the canvas", suffixes=CANVAS_SUFFIXES)
    canvas = make_canvas(*size, seed=seed)
    pixels = (canvas.image[0] * 255).round().to(torch.uint8).numpy()
    with atomic_output(out, what="the canvas") as tmp:
        if out.suffix.lower() == ".png":
            from PIL import Image

            Image.fromarray(pixels).save(tmp, format="PNG")  # uint8 (H, W): mode "L"
        else:
            import tifffile

            tifffile.imwrite(tmp, pixels, tile=(256, 256))
    return canvas
