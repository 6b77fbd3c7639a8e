"""A small picture of a large map over a thumbnail of the image in its own colours.

Either the winning class of every cell (a colour per class, opacity by probability, a legend of the
top classes by area) or one class's probability (``show_class``, a colour scale); cells a tissue
mask skipped (NaN) are drawn grey and hatched, so that tissue, background and skipped cells differ.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcconv._io import atomic_output
from fcconv.errors import FcconvError
from fcconv.tiling._axes import check_dtype
from fcconv.tiling._source import Plane, open_source
from fcconv.tiling._store import damage_report

__all__ = ["class_probability", "top_classes", "winners", "write_preview"]


def _bands(scores: Any, probabilities: bool) -> Iterator[tuple[int, np.ndarray]]:
    """``(top, class probabilities)`` per band of chunk rows of a ``(classes, h, w)`` map."""
    height = scores.shape[1]
    band = scores.chunks[1] if hasattr(scores, "chunks") and isinstance(scores.chunks[1], int) else height
    for top in range(0, height, band):
        part = _read_band(scores, top, band)
        if not probabilities:
            with np.errstate(invalid="ignore"):
                part = np.exp(part - part.max(axis=0, keepdims=True))
                part = part / part.sum(axis=0, keepdims=True)
        yield top, part


def winners(scores: Any, *, probabilities: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The winning class and its softmax probability per cell of a ``(classes, h, w)`` map.

    Reads a zarr (or numpy) map one band of chunk rows at a time, so memory follows the chunk.
    Skipped cells (NaN) get class ``-1`` and probability NaN. ``probabilities``: the map already
    holds probabilities (``scores="probabilities"``), not logits.
    """
    check_dtype(getattr(scores, "dtype", None), "the map")
    if scores.shape[0] == 0:
        raise FcconvError("The map has no classes to draw.")
    winner = np.empty(scores.shape[1:], dtype=np.int32)
    confidence = np.empty(scores.shape[1:], dtype=np.float32)
    for top, part in _bands(scores, probabilities):
        skipped = np.isnan(part).any(axis=0)
        part = np.where(np.isnan(part), -1.0, part)
        rows = slice(top, top + part.shape[1])
        winner[rows] = np.where(skipped, -1, part.argmax(axis=0))
        confidence[rows] = np.where(skipped, np.nan, part.max(axis=0))
    return winner, confidence


def class_probability(scores: Any, index: int, *, probabilities: bool = False) -> np.ndarray:
    """The probability of class ``index`` per cell (NaN on skipped cells), band by band."""
    out = np.empty(scores.shape[1:], dtype=np.float32)
    for top, part in _bands(scores, probabilities):
        out[top:top + part.shape[1]] = part[index]
    return out


def top_classes(winner: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` classes that win the most cells, with their share of the computed cells."""
    computed = winner[winner >= 0]
    if computed.size == 0:
        return []
    counts = np.bincount(computed)
    order = np.argsort(-counts, kind="stable")[:k]
    return [(int(c), float(counts[c] / computed.size)) for c in order if counts[c]]


def _class_index(show_class: int | str, names: Sequence[str]) -> int:
    if isinstance(show_class, str) and show_class in names:
        return names.index(show_class)
    try:
        index = int(show_class)
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(names):
        raise FcconvError(f"class {show_class!r} is not a class of this map: give a name among the class "
                          f"names or an index from 0 to {len(names) - 1}.")
    return index


def _read_band(scores: Any, top: int, band: int) -> np.ndarray:
    """Rows ``[top, top + band)`` of the map; a chunk that does not decode is named with the fix."""
    try:
        return np.asarray(scores[:, top:top + band], dtype=np.float64)
    except Exception as error:  # noqa: BLE001 - zarr and its codecs raise many types
        report = damage_report(scores)
        raise FcconvError(
            f"Cannot read rows {top} to {top + band} of the map: "
            f"{report or f'{type(error).__name__}: {error}'}."
        ) from None


def _pool_cells(winner: np.ndarray, confidence: np.ndarray, hide: Collection[int], step: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Shrink the map by ``step``: each block of cells shows its most confident shown class."""
    if step == 1:
        return winner, confidence
    h, w = winner.shape
    rows, cols = -(-h // step), -(-w // step)
    pad = ((0, rows * step - h), (0, cols * step - w))

    def blocks(values: np.ndarray, fill: float | None) -> np.ndarray:
        if fill is None:
            padded = np.pad(values, pad, mode="edge")
        else:
            padded = np.pad(values, pad, constant_values=fill)
        return padded.reshape(rows, step, cols, step).transpose(0, 2, 1, 3).reshape(rows, cols, step * step)

    shown = np.where(np.isin(winner, [*hide, -1]), -1.0, np.nan_to_num(confidence, nan=-1.0))
    pick = blocks(shown, -2.0).argmax(-1)[..., None]
    return (np.take_along_axis(blocks(winner, None), pick, -1)[..., 0],
            np.take_along_axis(blocks(confidence, None), pick, -1)[..., 0])


def _thumbnail(source: Any, step: int) -> np.ndarray:
    """Every ``step``-th pixel, ``(h, w, 1 or 3)`` in [0, 1]: 8-bit images in their own colours."""
    small = np.asarray(source.thumbnail(step))
    if small.dtype == np.uint8:
        small = small.astype(np.float64) / 255
        return np.moveaxis(small[:3] if small.shape[0] >= 3 else small[:1], 0, -1)
    small = small.astype(np.float64)
    low, high = float(small.min()), float(small.max())
    small = (small - low) / (high - low) if high > low else np.zeros_like(small)
    return np.moveaxis(small[:3] if small.shape[0] >= 3 else small[:1], 0, -1)


def _pool_mean(values: np.ndarray, step: int) -> np.ndarray:
    """Means of ``step x step`` blocks of cells, NaN ignored (all NaN stays NaN)."""
    if step == 1:
        return values
    h, w = values.shape
    rows, cols = -(-h // step), -(-w // step)
    padded = np.pad(values, ((0, rows * step - h), (0, cols * step - w)), constant_values=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a block of skipped cells
        return np.nanmean(padded.reshape(rows, step, cols, step), axis=(1, 3))


def _overlay(winner: np.ndarray, confidence: np.ndarray, hide: Collection[int], palette: Any,
             step: int) -> np.ndarray:
    """RGBA per (pooled) cell: the winner's colour, opacity growing with its probability."""
    small_winner, small_conf = _pool_cells(winner, confidence, hide, step)
    rgba = np.zeros((*small_winner.shape, 4))
    for c in np.unique(small_winner):
        if int(c) >= 0 and int(c) not in hide:
            rgba[small_winner == c] = palette(int(c) % palette.N)
    rgba[..., 3] = 0.6 * (0.25 + 0.75 * np.nan_to_num(small_conf))
    rgba[np.isin(small_winner, [*hide, -1]), 3] = 0.0
    return rgba


def write_preview(scores: Any, image: Any, path: str | os.PathLike[str], *, fcn: Any,
                  layout: str | None = None, level: int = 0, labels: Sequence[str] | None = None,
                  hide: Collection[int] = (), max_side: int = 1024, plane: Plane = None,
                  show_class: int | str | None = None, top_k: int = 5, probabilities: bool = False,
                  mpp: float | None = None, magnification: float | None = None) -> Path:
    """Draw the map ``scores`` over ``image`` into a PNG at most ``max_side`` pixels a side.

    Without ``show_class``, each cell is coloured by its winning class, with an opacity that grows
    with its probability, at the centre of the window it classifies; the legend lists the
    ``top_k`` classes by area (share of the computed cells). With ``show_class`` (a name or an
    index), the cells show that class's probability on a colour scale. The image keeps its own
    colours (8-bit images); cells a mask skipped (NaN) are grey and hatched. Needs matplotlib.

    Args:
        scores: the ``(classes, h, w)`` map, e.g. what :func:`tiled_map` returned.
        image, layout, level, plane, mpp, magnification: the image the map was computed on, as
            given to :func:`tiled_map`.
        fcn: the model, for the geometry (stride and window) of the cells.
        labels: class names for the legend; ``hide``: classes left uncoloured (e.g. background).
        max_side: the largest side of the picture, in pixels.
        show_class: draw this class's probability instead of the winners.
        top_k: classes listed in the legend, by area.
        probabilities: the map holds probabilities (``scores="probabilities"``), not logits.

    Example:
        >>> write_preview(scores, "slide.svs", "preview.png", fcn=fcn, mpp=0.5, show_class="tumour")
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = list(labels) if labels is not None else [str(i) for i in range(int(scores.shape[0]))]
    index = None if show_class is None else _class_index(show_class, names)
    winner, confidence = winners(scores, probabilities=probabilities)
    grid_h, grid_w = winner.shape
    stride_y, stride_x = fcn.stride
    source = open_source(image, layout=layout, level=level, ndim=2, channels=fcn.input_shape[0], plane=plane,
                         mpp=mpp, magnification=magnification)
    height, width = source.shape[1:]
    step = max(1, math.ceil(max(height, width) / max_side))
    cell_step = max(1, math.ceil(max(grid_h, grid_w) / max_side))
    shown = _thumbnail(source, step)
    palette = colormaps["tab20"] if len(names) > 10 else colormaps["tab10"]
    top, left = fcn.window_of((0, 0), (height, width))[:2]
    window_y, window_x = fcn.window
    # Cell (i, j) classifies the window from (top, left) + (i, j) * stride: drawn on the window's centre.
    cy, cx = top + window_y / 2, left + window_x / 2
    extent = (cx - stride_x * cell_step / 2, cx + (grid_w - 0.5) * stride_x,
              cy + (grid_h - 0.5) * stride_y, cy - stride_y * cell_step / 2)
    scale = 8.0 / max(height, width)
    figure = Figure(figsize=(max(4.0, width * scale + 3.0), max(3.0, height * scale + 1.0)), dpi=max_side / 8)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(shown[..., 0] if shown.shape[2] == 1 else shown, cmap="gray", vmin=0, vmax=1,
                extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    skipped = _pool_mean(np.where(winner < 0, 1.0, 0.0), cell_step) > 0.5
    handles = []
    if index is None:
        axes.imshow(_overlay(winner, confidence, hide, palette, cell_step), extent=extent,
                    interpolation="nearest")
        handles = [Patch(color=palette(c % palette.N), label=f"{names[c]}  {share:.0%}")
                   for c, share in top_classes(np.where(np.isin(winner, list(hide)), -1, winner), top_k)]
        title = f"winning class (top {top_k} by area)"
    else:
        shown_p = _pool_mean(class_probability(scores, index, probabilities=probabilities), cell_step)
        picture = axes.imshow(np.ma.masked_invalid(shown_p), extent=extent, interpolation="nearest",
                              cmap="inferno", vmin=0, vmax=1, alpha=0.7)
        figure.colorbar(picture, ax=axes, fraction=0.04, pad=0.02, label=f"P({names[index]})")
        title = f"probability of {names[index]!r}"
    if skipped.any():
        axes.contourf(skipped.astype(float), levels=[0.5, 1.5], colors=["0.55"], alpha=0.55, hatches=["//"],
                      extent=extent, origin="upper")  # row 0 at the top, as imshow draws it
        handles.append(Patch(facecolor="0.55", alpha=0.55, hatch="//", label="skipped (no tissue)"))
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    axes.set_title(f"{title}: {grid_h}x{grid_w} cells, stride {stride_y}x{stride_x}, window "
                   f"{window_y}x{window_x}, on {height}x{width} pixels", fontsize=8)
    if handles:  # beside the picture; below it when a colour bar stands beside it
        anchor = (1.01, 1.0) if index is None else (0.0, -0.05)
        axes.legend(handles=handles, loc="upper left", bbox_to_anchor=anchor, fontsize=7, frameon=False)
    figure.tight_layout()
    target = Path(path).expanduser()
    with atomic_output(target, what="the preview") as tmp:
        figure.savefig(tmp, format="png")
    return target
