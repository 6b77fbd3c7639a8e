"""Deep-zoom tiles of the slide and of the map, rendered on demand, and their cache.

The pyramid is OpenSeadragon's: level ``max_level`` is the slide at level 0 (one tile pixel per slide
pixel), each level below halves it, tiles are ``TILE`` pixels a side (smaller at the right and
bottom edges). A map tile colours each pixel by the cell whose stride box holds the pixel's centre:
by its winning class (``view=None``), or by one class's softmax probability on a colour ramp.
Cells not computed yet (NaN) are transparent; cells a mask skipped (``valid`` 0) are hatched grey.
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from fcconv.viewer._map import MapView
from fcconv.viewer._slide import Slide

__all__ = ["TILE", "Pyramid", "TileCache", "class_colours", "encode", "map_tile", "ramp", "slide_tile"]

TILE = 256
_SKIPPED = np.array([96, 96, 96, 200], dtype=np.uint8)  # the hatch of cells a mask skipped


@dataclass(frozen=True)
class Pyramid:
    """OpenSeadragon's levels over an image of ``height x width`` slide pixels."""

    height: int
    width: int
    tile: int = TILE

    @property
    def max_level(self) -> int:
        """The level at full resolution (level 0 is one pixel)."""
        return max(0, math.ceil(math.log2(max(self.height, self.width, 1))))

    def scale(self, level: int) -> int:
        """Slide pixels per tile pixel at ``level``."""
        return 1 << (self.max_level - level)

    def box(self, level: int, x: int, y: int) -> tuple[int, int, int, int] | None:
        """``(top, left, rows, cols)``: the tile's first slide pixel and its size in tile pixels.

        None when the tile lies outside the image.
        """
        if not 0 <= level <= self.max_level:
            return None
        f = self.scale(level)
        rows_total, cols_total = math.ceil(self.height / f), math.ceil(self.width / f)
        top, left = y * self.tile, x * self.tile
        if x < 0 or y < 0 or top >= rows_total or left >= cols_total:
            return None
        return top * f, left * f, min(self.tile, rows_total - top), min(self.tile, cols_total - left)


def class_colours(count: int) -> np.ndarray:
    """``(count, 3)`` uint8: matplotlib's tab10 (tab20 beyond 10 classes), as in heatmap previews."""
    from matplotlib import colormaps

    palette = colormaps["tab20"] if count > 10 else colormaps["tab10"]
    rgb = np.array([palette(i % palette.N)[:3] for i in range(count)]).reshape(count, 3)
    return np.round(rgb * 255).astype(np.uint8)


def ramp(size: int = 256) -> np.ndarray:
    """``(size, 3)`` uint8: matplotlib's viridis, from probability 0 to 1."""
    from matplotlib import colormaps

    return np.round(colormaps["viridis"](np.linspace(0, 1, size))[:, :3] * 255).astype(np.uint8)


def _reduce(view: MapView, rows: np.ndarray, cols: np.ndarray, channel: int | None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: the winning class (``channel`` None) or ``channel``'s probability (softmax of logits), and
    whether the cell is not computed yet. Reads the classes block by block, so memory follows a block."""
    shape = (len(rows), len(cols))
    missing = np.zeros(shape, dtype=bool)
    best, winner = np.full(shape, -np.inf), np.zeros(shape, dtype=np.int64)
    total, mine = np.zeros(shape), np.zeros(shape)  # sum of exp(score - best), and channel's score
    for block in view.class_blocks():
        values = view.read(rows, cols, block)
        missing |= np.isnan(values).any(axis=0)
        values = np.nan_to_num(values, nan=0.0)
        top = values.max(axis=0)
        higher = top > best
        winner = np.where(higher, values.argmax(axis=0) + block.start, winner)
        new_best = np.maximum(best, top)
        total = total * np.exp(best - new_best) + np.exp(values - new_best).sum(axis=0)
        best = new_best
        if channel is not None and block.start <= channel < block.stop:
            mine = values[channel - block.start]
    if channel is None:
        return winner, missing
    if view.probabilities:  # stored as probabilities (--scores probabilities): shown as they are
        return mine, missing
    return np.exp(mine - best) / total, missing


def _cell_colours(view: MapView, rows: np.ndarray, cols: np.ndarray, colours: np.ndarray,
                  channel: int | None, hidden: Collection[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(h, w, 4)`` RGBA of the cells at ``rows`` x ``cols`` (transparent where not computed), and
    where they are not computed."""
    reduced, missing = _reduce(view, rows, cols, channel)
    rgba = np.zeros((*missing.shape, 4), dtype=np.uint8)
    if channel is None:
        rgba[..., :3] = colours[reduced]
        rgba[..., 3] = np.where(np.isin(reduced, list(hidden)), 0, 255) if hidden else 255
    else:
        rgba[..., :3] = ramp()[np.clip(np.round(reduced * 255), 0, 255).astype(np.int64)]
        rgba[..., 3] = 255
    rgba[missing] = 0
    return rgba, missing


def _cells(view: MapView, starts: float, count: int, scale: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per tile pixel along ``axis``: the index into the unique cells read (-1 outside), and those cells."""
    centres = starts + (np.arange(count) + 0.5) * scale
    cells = view.geometry.cells_along(centres, axis)
    inside = (cells >= 0) & (cells < view.grid[axis])
    unique = np.unique(cells[inside])
    return np.where(inside, np.searchsorted(unique, cells), -1), unique


def map_tile(view: MapView, pyramid: Pyramid, level: int, x: int, y: int, *, channel: int | None = None,
             hidden: Collection[int] = (), colours: np.ndarray | None = None
             ) -> tuple[np.ndarray, bool] | None:
    """One map tile as ``(h, w, 4)`` RGBA uint8 and whether it holds cells not computed yet.

    Returns None for a tile outside the image.
    """
    box = pyramid.box(level, x, y)
    if box is None:
        return None
    top, left, rows, cols = box
    f = pyramid.scale(level)
    row_index, unique_rows = _cells(view, top, rows, f, 0)
    col_index, unique_cols = _cells(view, left, cols, f, 1)
    colours = class_colours(len(view.classes)) if colours is None else colours
    cell_rgba, pending = _cell_colours(view, unique_rows, unique_cols, colours, channel, hidden)
    valid = view.read_valid(unique_rows, unique_cols)
    if valid is not None:
        pending &= valid
    tile = np.zeros((rows, cols, 4), dtype=np.uint8)
    in_rows, in_cols = row_index >= 0, col_index >= 0
    if in_rows.any() and in_cols.any():
        ri, ci = row_index[in_rows], col_index[in_cols]
        tile[np.ix_(in_rows, in_cols)] = cell_rgba[np.ix_(ri, ci)]
        if valid is not None and not valid.all():
            skipped = np.zeros((rows, cols), dtype=bool)
            skipped[np.ix_(in_rows, in_cols)] = ~valid[np.ix_(ri, ci)]
            stripes = ((np.arange(rows)[:, None] + y * pyramid.tile
                        + np.arange(cols)[None, :] + x * pyramid.tile) // 4) % 2 == 0
            tile[skipped] = 0
            tile[skipped & stripes] = _SKIPPED
    return tile, bool(pending.any())


def slide_tile(slide: Slide, pyramid: Pyramid, level: int, x: int, y: int) -> np.ndarray | None:
    """One slide tile as ``(h, w, 3)`` or ``(h, w)`` uint8, read from the finest level it needs."""
    from PIL import Image

    box = pyramid.box(level, x, y)
    if box is None:
        return None
    top, left, rows, cols = box
    f = pyramid.scale(level)
    pick = max(i for i in range(len(slide.shapes)) if i == 0 or slide.downsample(i) <= f * 1.001)
    ds = slide.downsample(pick)
    height, width = slide.shapes[pick]
    t, lft = int(top / ds), int(left / ds)
    b, r = min(height, math.ceil((top + rows * f) / ds)), min(width, math.ceil((left + cols * f) / ds))
    step = max(1, int(f / ds))
    block = slide.region(pick, t, lft, b - t, r - lft, step)
    if block.shape[:2] == (rows, cols):
        return block
    return np.asarray(Image.fromarray(block).resize((cols, rows), Image.Resampling.BILINEAR))


def encode(pixels: np.ndarray, kind: str) -> bytes:
    """PNG (``kind="png"``, keeps alpha) or JPEG bytes of an image array."""
    from PIL import Image

    buffer = io.BytesIO()
    if kind == "png":
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    else:
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class TileCache:
    """A thread-safe LRU cache of encoded tiles; an entry may expire (tiles of a map being written)."""

    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Any, tuple[bytes, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        """The tile under ``key``, or None when absent or expired."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[1] < time.monotonic():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Any, data: bytes, ttl: float | None = None) -> None:
        """Keep ``data`` under ``key`` for ``ttl`` seconds (for good when None)."""
        expiry = math.inf if ttl is None else time.monotonic() + ttl
        with self._lock:
            self._entries[key] = (data, expiry)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
