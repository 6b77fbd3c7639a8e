"""A slide's pyramid read region by region, for the viewer's base layer.

tifffile's zarr interface reads the TIFF's pyramid levels (SVS, NDPI, OME-TIFF... as tifffile reads
them) block by block: nothing but the blocks a tile needs is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fcconv._deps import require
from fcconv.errors import FcconvError

__all__ = ["Slide", "open_slide"]


class Slide:
    """The levels of a slide: ``shapes[i]`` is ``(height, width)`` of level ``i``, level 0 the largest.

    ``region(level, top, left, height, width)`` returns ``(h, w, 3)`` or ``(h, w)`` uint8 pixels.
    """

    def __init__(self, path: Path, levels: list[Any], layouts: list[str]) -> None:
        self.path = path
        self._levels = levels
        self._layouts = layouts
        self.shapes = [_spatial(level.shape, layout) for level, layout in zip(levels, layouts)]

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of level 0, in slide pixels."""
        return self.shapes[0]

    def downsample(self, level: int) -> float:
        """Level-0 pixels per pixel of ``level`` (from the widths)."""
        return self.shapes[0][1] / self.shapes[level][1]

    def region(self, level: int, top: int, left: int, height: int, width: int, step: int = 1) -> np.ndarray:
        """Pixels ``[top, top + height) x [left, left + width)`` of ``level``, every ``step``-th, as uint8."""
        rows, cols = slice(top, top + height, step), slice(left, left + width, step)
        layout = self._layouts[level]
        index = {"HW": (rows, cols), "HWC": (rows, cols, slice(None)),
                 "CHW": (slice(None), rows, cols)}[layout]
        block = np.asarray(self._levels[level][index])
        if layout == "CHW":
            block = np.moveaxis(block, 0, -1)
        if block.ndim == 3:
            block = block[..., :3] if block.shape[-1] >= 3 else block[..., 0]
        return _to_uint8(block)


def _spatial(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    return (int(shape[1]), int(shape[2])) if layout == "CHW" else (int(shape[0]), int(shape[1]))


def _layout(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "HW"
    if len(shape) == 3 and shape[-1] in (1, 3, 4):
        return "HWC"
    if len(shape) == 3 and shape[0] in (1, 3, 4):
        return "CHW"
    raise ValueError(f"expected (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels; got {shape}")


def _to_uint8(block: np.ndarray) -> np.ndarray:
    if block.dtype == np.uint8:
        return block
    if np.issubdtype(block.dtype, np.integer):
        return (block.astype(np.float64) * (255 / np.iinfo(block.dtype).max)).round().astype(np.uint8)
    return (np.clip(np.nan_to_num(block.astype(np.float64)), 0, 1) * 255).round().astype(np.uint8)


def open_slide(path: str | os.PathLike[str]) -> Slide:
    """Open the slide at ``path`` (a TIFF, pyramidal or not) for reading regions.

    Raises:
        FcconvError: if it is missing or not a readable image of 1, 3 or 4 channels.
    """
    where = Path(path).expanduser()
    if not where.is_file():
        raise FcconvError(f"Slide {str(where)!r} not found: give --slide an existing TIFF file.")
    try:
        levels = _tifffile_levels(where)
        layouts = [_layout(tuple(level.shape)) for level in levels]
    except FcconvError:
        raise
    except Exception as error:  # noqa: BLE001 - readers raise many types for a file they cannot read
        raise FcconvError(f"Cannot read the slide {str(where)!r}: {error}. Give --slide a TIFF slide "
                          "(pyramidal or not).") from None
    return Slide(where.resolve(), levels, layouts)


def _tifffile_levels(path: Path) -> list[Any]:
    zarr = require("zarr", extra="tiles", feature="fcconv view --slide")
    tifffile = require("tifffile", extra="tiles", feature="fcconv view --slide")
    node = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    if hasattr(node, "shape"):
        return [node]
    names = sorted(node.array_keys(), key=int)
    return [node[name] for name in names]

