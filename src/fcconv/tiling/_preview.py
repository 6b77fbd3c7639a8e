"""A small picture of a large map: the winning class of every cell over a thumbnail of the image."""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcconv._io import atomic_output
from fcconv.errors import FcconvError
from fcconv.tiling._axes import check_dtype
from fcconv.tiling._source import Plane, Source, open_source
from fcconv.tiling._store import damage_report

__all__ = ["winners", "write_preview"]


def winners(scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """The winning class and its softmax probability per cell of a ``(classes, h, w)`` map.

    Reads a zarr (or numpy) map one band of chunk rows at a time, so memory follows the chunk.
    """
    check_dtype(getattr(scores, "dtype", None), "the map")
    classes, height = scores.shape[0], scores.shape[1]
    band = scores.chunks[1] if hasattr(scores, "chunks") and isinstance(scores.chunks[1], int) else height
    winner = np.empty(scores.shape[1:], dtype=np.int32)
    confidence = np.empty(scores.shape[1:], dtype=np.float32)
    for top in range(0, height, band):
        part = _read_band(scores, top, band)
        part = np.exp(part - part.max(axis=0, keepdims=True))
        probabilities = part / part.sum(axis=0, keepdims=True)
        winner[top:top + band] = probabilities.argmax(axis=0)
        confidence[top:top + band] = probabilities.max(axis=0)
    if classes == 0:
        raise FcconvError("The map has no classes to draw.")
    return winner, confidence


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

    shown = np.where(np.isin(winner, list(hide)), -1.0, confidence)
    pick = blocks(shown, -2.0).argmax(-1)[..., None]
    return (np.take_along_axis(blocks(winner, None), pick, -1)[..., 0],
            np.take_along_axis(blocks(confidence, None), pick, -1)[..., 0])


def _thumbnail(source: Source, step: int) -> np.ndarray:
    small = np.asarray(source.thumbnail(step), dtype=np.float64)
    low, high = float(small.min()), float(small.max())
    small = (small - low) / (high - low) if high > low else np.zeros_like(small)
    return np.moveaxis(small[:3] if small.shape[0] >= 3 else small[:1], 0, -1)


def write_preview(scores: Any, image: Any, path: str | os.PathLike[str], *, fcn: Any,
                  layout: str | None = None, level: int = 0, labels: Sequence[str] | None = None,
                  hide: Collection[int] = (), max_side: int = 1024, plane: Plane = None) -> Path:
    """Draw the map ``scores`` over ``image`` into a PNG at most ``max_side`` pixels a side.

    Each cell is coloured by its winning class, with an opacity that grows with its probability,
    at the centre of the window it classifies. Needs matplotlib (the ``cli`` extra).

    Args:
        scores: the ``(classes, h, w)`` map, e.g. what :func:`tiled_map` returned.
        image, layout, level, plane: the image the map was computed on, as given to :func:`tiled_map`.
        fcn: the model, for the geometry (stride and window) of the cells.
        labels: class names for the legend; ``hide``: classes left uncoloured (e.g. background).
        max_side: the largest side of the picture, in pixels.

    Example:
        >>> write_preview(scores, "slide.tif", "preview.png", fcn=fcn)
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    winner, confidence = winners(scores)
    grid_h, grid_w = winner.shape
    stride_y, stride_x = fcn.stride
    source = open_source(image, layout=layout, level=level, ndim=2, channels=fcn.input_shape[0], plane=plane)
    height, width = source.shape[1:]
    step = max(1, math.ceil(max(height, width) / max_side))
    cell_step = max(1, math.ceil(max(grid_h, grid_w) / max_side))
    shown = _thumbnail(source, step)
    names = list(labels) if labels is not None else [str(i) for i in range(int(scores.shape[0]))]
    palette = colormaps["tab20"] if len(names) > 10 else colormaps["tab10"]
    small_winner, small_conf = _pool_cells(winner, confidence, hide, cell_step)
    rgba = np.zeros((*small_winner.shape, 4))
    present = [int(c) for c in np.unique(small_winner) if int(c) not in hide]
    for c in present:
        rgba[small_winner == c] = palette(c % palette.N)
    rgba[..., 3] = 0.6 * (0.25 + 0.75 * small_conf)
    rgba[np.isin(small_winner, list(hide)), 3] = 0.0
    window_y, window_x = fcn.window
    # Cell (i, j) classifies the window from (i * stride); drawn as a square on the window's centre.
    cy, cx = window_y / 2, window_x / 2
    extent = (cx - stride_x * cell_step / 2, cx + (grid_w - 0.5) * stride_x,
              cy + (grid_h - 0.5) * stride_y, cy - stride_y * cell_step / 2)
    scale = 8.0 / max(height, width)
    figure = Figure(figsize=(max(4.0, width * scale + 2.5), max(3.0, height * scale + 1.0)), dpi=max_side / 8)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(shown[..., 0] if shown.shape[2] == 1 else shown, cmap="gray", vmin=0, vmax=1,
                extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    axes.imshow(rgba, extent=extent, interpolation="nearest")
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    axes.set_title(f"{grid_h}x{grid_w} cells, stride {stride_y}x{stride_x}, window {window_y}x{window_x}, "
                   f"on {height}x{width} pixels", fontsize=8)
    handles = [Patch(color=palette(c % palette.N), label=names[c]) for c in present][:20]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
    figure.tight_layout()
    target = Path(path).expanduser()
    with atomic_output(target, what="the preview") as tmp:
        figure.savefig(tmp, format="png")
    return target
