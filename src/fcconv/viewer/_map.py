"""A map store opened read-only for viewing: its geometry, its class names, its cells.

The store is the zarr v3 group of fcconv's map store contract: array ``"0"`` holds the scores
``(classes, h, w)`` (NaN where not computed yet), the optional array ``"valid"`` (uint8) is 0 where a
tissue mask skipped a cell, and the group attribute ``"fcconv"`` holds ``geometry`` and ``classes``.

Coordinates: *slide pixels* are level-0 pixels of the slide (image pixels times ``downsample``).
Cell ``(r, c)`` scores the window whose top-left is ``window_offset + stride * (r, c)`` image
pixels; its colour covers its stride box, centred on the window's centre.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fcconv._deps import require
from fcconv.errors import FcconvError

__all__ = ["Geometry", "MapView", "open_map"]

_OLD_ATTRIBUTE = "fcconv_tiled_map"  # fcconv 0.2: a bare array, without the geometry


@dataclass(frozen=True)
class Geometry:
    """Where the cells of a map lie on the image (all pairs ``(y, x)``, in image pixels)."""

    stride: tuple[float, float]
    window: tuple[float, float]
    window_offset: tuple[float, float]
    image_shape: tuple[int, ...]
    level: int = 0
    downsample: float = 1.0
    mpp: tuple[float, float] | None = None

    @classmethod
    def from_attrs(cls, attrs: Any, where: str) -> Geometry:
        """The geometry from the ``"geometry"`` attribute of a map store."""
        try:
            mpp = attrs.get("mpp")
            geometry = cls(stride=_pair(attrs["stride"]), window=_pair(attrs["window"]),
                           window_offset=_pair(attrs["window_offset"]),
                           image_shape=tuple(int(s) for s in attrs["image_shape"]),
                           level=int(attrs.get("level", 0)), downsample=float(attrs.get("downsample", 1.0)),
                           mpp=None if mpp is None else _pair(mpp))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise FcconvError(f"The map {where!r} has a broken 'geometry' attribute ({error!r}): expected "
                              "stride, window, window_offset and image_shape. Write the map again with "
                              "fcconv heatmap -o.") from None
        if min(geometry.stride) <= 0 or geometry.downsample <= 0 or len(geometry.image_shape) != 3:
            raise FcconvError(f"The map {where!r} has an impossible geometry {attrs!r}: expected positive "
                              "strides and downsample and image_shape (C, H, W). Write the map again.")
        return geometry

    @property
    def slide_size(self) -> tuple[int, int]:
        """``(height, width)`` of the image in slide (level-0) pixels."""
        return (round(self.image_shape[1] * self.downsample), round(self.image_shape[2] * self.downsample))

    def box_origin(self) -> tuple[float, float]:
        """Top-left of cell (0, 0)'s stride box in image pixels."""
        (oy, ox), (wy, wx), (sy, sx) = self.window_offset, self.window, self.stride
        return oy + wy / 2 - sy / 2, ox + wx / 2 - sx / 2

    def cell_at(self, y: float, x: float) -> tuple[int, int]:
        """The cell whose stride box holds the slide point ``(y, x)`` (maybe outside the grid)."""
        oy, ox = self.box_origin()
        return (math.floor((y / self.downsample - oy) / self.stride[0]),
                math.floor((x / self.downsample - ox) / self.stride[1]))

    def cells_along(self, starts: np.ndarray, axis: int) -> np.ndarray:
        """The cell index (along ``axis``, 0 = y) of each slide coordinate in ``starts``."""
        origin = self.box_origin()[axis]
        return np.floor((starts / self.downsample - origin) / self.stride[axis]).astype(np.int64)

    def window_rect(self, row: int, col: int) -> dict[str, float]:
        """Cell ``(row, col)``'s window in slide pixels: ``{"x", "y", "width", "height"}``."""
        d = self.downsample
        return {"x": (self.window_offset[1] + self.stride[1] * col) * d,
                "y": (self.window_offset[0] + self.stride[0] * row) * d,
                "width": self.window[1] * d, "height": self.window[0] * d}


def _pair(value: Any) -> tuple[float, float]:
    numbers = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else (value, value)))
    if len(numbers) != 2:
        raise ValueError(f"expected two numbers (y, x), got {value!r}")
    return numbers[0], numbers[1]


class MapView:
    """A map store opened read-only: scores, validity, geometry, class names.

    Attributes:
        path: the store's directory.
        geometry: where the cells lie.
        classes: one name per class (``"0"``, ``"1"``, ... when the store names none).
        scores: the zarr array ``(classes, h, w)``.
        valid: the zarr array ``(h, w)`` of 1 (computed) and 0 (skipped), or None.
        probabilities: True when the store holds probabilities (``scores="probabilities"``), False
            for logits (shown through their softmax).
    """

    def __init__(self, path: Path, group: Any) -> None:
        self.path = path
        attrs = dict(group.attrs).get("fcconv") or {}
        self.geometry = Geometry.from_attrs(attrs.get("geometry"), str(path))
        self.scores = group["0"]
        if self.scores.ndim != 3:
            raise FcconvError(f"The map {str(path)!r} holds scores of shape {self.scores.shape}; expected "
                              "(classes, height, width). fcconv view shows 2-d maps.")
        self.valid = _member(group, "valid")
        # fcconv heatmap --scores probabilities stores softmax already; otherwise scores are logits
        self.probabilities = attrs.get("scores") == "probabilities"
        count = int(self.scores.shape[0])
        names = attrs.get("classes")
        self.classes = [str(n) for n in names] if names and len(names) == count else [
            str(i) for i in range(count)]

    @property
    def grid(self) -> tuple[int, int]:
        """``(h, w)``: cells per column and per row."""
        return int(self.scores.shape[1]), int(self.scores.shape[2])

    def complete(self) -> bool | None:
        """True once every cell is written (read afresh from the store), None when it does not say."""
        zarr = require("zarr", extra="tiles", feature="fcconv view")
        try:
            attrs = dict(zarr.open_group(str(self.path), mode="r").attrs).get("fcconv") or {}
        except Exception:  # noqa: BLE001 - a store being rewritten: say it is not known
            return None
        done = attrs.get("complete")
        return bool(done) if done is not None else None

    def read(self, rows: np.ndarray, cols: np.ndarray, classes: slice = slice(None)) -> np.ndarray:
        """Scores of ``classes`` at sorted unique rows and columns, float64 ``(k, len(rows), len(cols))``."""
        return _take(self.scores, classes, rows, cols).astype(np.float64, copy=False)

    def class_blocks(self) -> list[slice]:
        """The classes in blocks of the store's class chunk (at most 16): one read each."""
        count = int(self.scores.shape[0])
        step = max(1, min(16, int(self.scores.chunks[0])))
        return [slice(start, min(count, start + step)) for start in range(0, count, step)]

    def read_valid(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
        """Validity at the given cells (True where computed), or None without a ``valid`` array."""
        if self.valid is None:
            return None
        return _take(self.valid, None, rows, cols) != 0

    def cell(self, row: int, col: int, top: int = 5) -> dict[str, Any]:
        """What a cell holds: its ``top`` classes by score, scores, probabilities."""
        values = np.asarray(self.scores[:, row, col], dtype=np.float64)
        valid = None if self.valid is None else bool(self.valid[row, col])
        out: dict[str, Any] = {"cell": [row, col], "window": self.geometry.window_rect(row, col),
                               "valid": valid, "computed": not bool(np.isnan(values).any()), "top": []}
        if out["computed"]:
            shifted = np.exp(values - values.max())
            probabilities = values if self.probabilities else shifted / shifted.sum()
            for k in np.argsort(-values, kind="stable")[:top]:
                out["top"].append({"class": int(k), "name": self.classes[int(k)],
                                   "score": float(values[k]), "probability": float(probabilities[k])})
        return out


def _take(array: Any, channels: Any, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``array[channels, rows, cols]`` (orthogonal), reading a plain slice where the cells are a run."""
    lead = () if channels is None else (channels,)
    if len(rows) == 0 or len(cols) == 0:
        shape = () if channels is None else (len(range(*channels.indices(array.shape[0]))),)
        return np.zeros((*shape, len(rows), len(cols)), dtype=array.dtype)
    runs = rows[-1] - rows[0] + 1 == len(rows) and cols[-1] - cols[0] + 1 == len(cols)
    if runs:
        window = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
        return np.asarray(array[lead + window])
    return np.asarray(array.get_orthogonal_selection(lead + (rows, cols)))


def open_map(path: str | os.PathLike[str]) -> MapView:
    """Open the map store at ``path`` read-only.

    Raises:
        FcconvError: if it is missing, not a zarr group of fcconv's layout, or a map of fcconv 0.2
            (a bare array without the geometry).

    Example:
        >>> view = open_map("map.zarr")
        >>> view.geometry.stride, view.classes[:2]
    """
    zarr = require("zarr", extra="tiles", feature="fcconv view")
    where = Path(path).expanduser()
    if not (where / "zarr.json").is_file():
        raise FcconvError(f"{str(where)!r} is not a zarr store (no zarr.json): give the map written by "
                          "fcconv heatmap -o MAP.zarr.")
    try:
        node = zarr.open(str(where), mode="r")
    except Exception as error:  # noqa: BLE001 - zarr raises several types for broken metadata
        raise FcconvError(f"Cannot open the map {str(where)!r}: {error}. Check the path.") from None
    if hasattr(node, "shape"):
        if _OLD_ATTRIBUTE in dict(node.attrs):
            raise FcconvError(
                f"The map {str(where)!r} was written by fcconv 0.2 (a bare array): it does not record where "
                "its cells lie (stride, window, offset). Write it again with this fcconv's "
                "fcconv heatmap -o MAP.zarr (finished tiles cannot be reused).")
        raise FcconvError(f"{str(where)!r} is one zarr array, not an fcconv map store (a group with the "
                          "'fcconv' attribute and the array '0'). Give the map written by fcconv heatmap -o.")
    if "fcconv" not in dict(node.attrs) or _member(node, "0") is None:
        raise FcconvError(f"{str(where)!r} is a zarr group without fcconv's 'fcconv' attribute or array '0': "
                          "give the map written by fcconv heatmap -o.")
    return MapView(where.resolve(), node)


def _member(group: Any, name: str) -> Any:
    """The array ``name`` of ``group``, or None; never lists the group (zarr warns about ``.fcconv/``)."""
    try:
        node = group[name]
    except KeyError:
        return None
    return node if hasattr(node, "shape") else None
