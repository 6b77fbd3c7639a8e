"""Tissue masks: which cells of a map to compute, and which tiles need not be read at all.

``mask=`` is a boolean array at any resolution (it covers the whole image), an image file (nonzero
is tissue), a callable given an RGB thumbnail ``(h, w, C)`` that returns such an array, or
``"otsu"``: Otsu's threshold (scikit-image ``threshold_otsu``) on the grey thumbnail, tissue darker
than the background, cleaned by a morphological opening and widened by a dilation, as TIAToolbox's
tissue maskers do. A cell is tissue when its window touches a tissue pixel of the mask. Tiles with
no tissue cell are never read; their cells stay the fill value (NaN) and ``valid`` is 0 there.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcconv._deps import require
from fcconv.errors import FcconvError

__all__ = ["OTSU_SIDE", "computed_cells", "finish", "mask_token", "tiles_touching", "tissue_cells",
           "tissue_image"]

OTSU_SIDE = 1024  # the longest side of the thumbnail a mask is computed on


def _thumbnail(source: Any) -> np.ndarray:
    """The image at most :data:`OTSU_SIDE` pixels a side, ``(h, w, C)`` (slides: from a low level)."""
    step = max(1, math.ceil(max(source.shape[1:]) / OTSU_SIDE))
    return np.moveaxis(np.asarray(source.thumbnail(step)), 0, -1)


def otsu_tissue(thumbnail: np.ndarray) -> np.ndarray:
    """Tissue of an RGB or grey thumbnail ``(h, w, C)``: darker than Otsu's threshold, cleaned."""
    filters = require("skimage.filters", extra="slides", feature="mask='otsu'")
    morphology = require("skimage.morphology", extra="slides", feature="mask='otsu'")
    color = require("skimage.color", extra="slides", feature="mask='otsu'")
    pixels = np.asarray(thumbnail, dtype=np.float64)
    grey = color.rgb2gray(pixels[..., :3]) if pixels.shape[-1] >= 3 else pixels[..., 0]
    if grey.max() == grey.min():
        return np.zeros(grey.shape, dtype=bool)  # one colour: no tissue to tell from background
    tissue = grey < filters.threshold_otsu(grey)
    tissue = morphology.opening(tissue, morphology.disk(1))
    return morphology.dilation(tissue, morphology.disk(2))


def tissue_image(mask: Any, source: Any) -> np.ndarray:
    """The mask as a 2-d boolean array covering the image (any resolution)."""
    if isinstance(mask, str) and mask == "otsu":
        return otsu_tissue(_thumbnail(source))
    if isinstance(mask, (str, os.PathLike)):
        path = Path(mask).expanduser()
        if not path.is_file():
            raise FcconvError(f"mask {str(mask)!r} is neither 'otsu' nor an image file. Pass 'otsu', a "
                              "boolean array, an image file (nonzero is tissue) or a callable.")
        from PIL import Image

        with Image.open(path) as picture:
            return np.asarray(picture.convert("L")) > 0
    if callable(mask):
        given = np.asarray(mask(_thumbnail(source)))
        what = "the mask callable returned"
    else:
        given, what = np.asarray(mask), "mask is"
    if given.ndim != 2 or given.size == 0 or given.dtype.kind not in "biuf":
        raise FcconvError(f"{what} an array of shape {given.shape} ({given.dtype}); expected a 2-d boolean "
                          "array (any resolution, covering the whole image) with True on tissue.")
    return given.astype(bool)


def tissue_cells(mask: Any, source: Any, fcn: Any, grid: Sequence[int]) -> np.ndarray:
    """The cells ``(*grid)`` whose window touches a tissue pixel of ``mask``."""
    if len(grid) != 2:
        raise FcconvError(f"mask= applies to 2-d images; this map has {len(grid)} spatial dims.")
    tissue = tissue_image(mask, source)
    spatial = tuple(int(s) for s in source.shape[1:])
    starts = fcn.window_of((0,) * len(grid), spatial)[:len(grid)]
    table = np.zeros((tissue.shape[0] + 1, tissue.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = tissue.astype(np.int64).cumsum(0).cumsum(1)
    bounds = []
    for d, n in enumerate(grid):
        low = np.clip(starts[d] + fcn.stride[d] * np.arange(n), 0, spatial[d])
        high = np.clip(low + fcn.window[d], 0, spatial[d])
        size = tissue.shape[d]
        first = np.floor(low * size / spatial[d]).astype(np.int64)
        last = np.maximum(first + 1, np.ceil(high * size / spatial[d]).astype(np.int64))
        bounds.append((np.clip(first, 0, size), np.clip(last, 0, size)))
    (r0, r1), (c0, c1) = bounds
    count = (table[r1[:, None], c1[None, :]] - table[r0[:, None], c1[None, :]]
             - table[r1[:, None], c0[None, :]] + table[r0[:, None], c0[None, :]])
    return count > 0


def _cells(tile: Any) -> tuple[slice, ...]:
    return tuple(slice(s, e) for s, e in zip(tile.cell_start, tile.cell_stop))


def tiles_touching(tiles: Sequence[Any], tissue: np.ndarray) -> list[Any]:
    """The tiles that hold a tissue cell: the only ones read and computed."""
    return [t for t in tiles if tissue[_cells(t)].any()]


def computed_cells(tiles: Sequence[Any], tissue: np.ndarray) -> np.ndarray:
    """``valid`` (uint8): 1 on every cell of a tile that holds tissue (all computed), else 0."""
    valid = np.zeros(tissue.shape, dtype=np.uint8)
    for t in tiles_touching(tiles, tissue):
        valid[_cells(t)] = 1
    return valid


def mask_token(tissue: np.ndarray) -> str:
    """What identifies a mask in the run's identity (a rerun with another mask is another run)."""
    return hashlib.sha256(np.packbits(tissue).tobytes() + repr(tissue.shape).encode()).hexdigest()


def finish(result: Any, path: str | None, tiles: Sequence[Any], tissue: np.ndarray) -> Any:
    """After a masked run: NaN on skipped cells of an in-memory map, ``valid`` beside a zarr map.

    ``valid`` goes into the map's zarr group (``out/valid``); a store that is a bare array (no
    group) keeps only its NaN fill on the skipped cells.
    """
    valid = computed_cells(tiles, tissue)
    if path is None:
        result[:, valid == 0] = np.nan
        return result
    write_valid(path, valid)
    return result


def write_valid(path: str | os.PathLike[str], valid: np.ndarray) -> bool:
    """Write ``valid`` as the array ``valid`` of the zarr group at ``path``; False if not a group."""
    zarr = require("zarr", extra="tiles", feature="fcconv.tiling")
    node = zarr.open(str(path), mode="r+")
    if hasattr(node, "shape"):
        return False
    chunks = tuple(min(512, s) for s in valid.shape)
    array = node.create_array("valid", shape=valid.shape, chunks=chunks, dtype="uint8", fill_value=0,
                              overwrite=True)
    array[...] = valid
    return True
