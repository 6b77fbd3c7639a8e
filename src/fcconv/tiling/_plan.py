"""Where tiles start and end: output cells per tile, the input block each one reads, from the field.

Cell ``j`` of the map depends on input ``[offset + stride*j, offset + stride*j + extent)`` (the
receptive field, per spatial dim). A tile keeps cells ``[g0, g1)`` and reads the input block
``[a, b)`` with

* ``a`` the largest multiple of ``stride`` at most ``max(0, offset + stride*g0)``: a block that
  starts on the stride puts every intermediate grid of the network on the untiled one, so the
  block's cell ``j'`` is the map's cell ``j' + a // stride``;
* ``b = min(size, offset + stride*(g1 - 1) + extent)``: the end of the last kept cell's field.

Each kept cell then sees its whole field inside the block, or reaches past it only at the image
border, where the block is padded exactly like the whole image: it equals the untiled cell.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fcconv._shapes import format_shape
from fcconv.errors import FcconvError, NotEquivalentError

__all__ = ["Field", "Tile", "TilePlan", "field_of", "plan_tiles"]


class Field(Protocol):
    """What tiling needs of a receptive field: one value per spatial dim."""

    @property
    def stride(self) -> tuple[int, ...]: ...
    @property
    def offset(self) -> tuple[int, ...]: ...
    @property
    def extent(self) -> tuple[int, ...]: ...


def field_of(fcn: Any, image_shape: Sequence[int], *, size_dependent: bool = False) -> Field:
    """The receptive field of ``fcn``'s cells, refusing models whose cells are not local.

    The one place tiling asks the geometry (``fcconv.models.receptive.analyze``).

    Args:
        fcn: a :class:`~fcconv.FullyConvolutional`.
        image_shape: the per-sample image shape ``(C, *spatial)``.
        size_dependent: accept a geometry that depends on the input size (TF "same" padding
            computed from ``x.size()``): only a block of the whole image then computes the same map.

    Raises:
        NotEquivalentError: if a cell depends on more than a fixed window (a global pooling, a
            GroupNorm, a size-dependent op), so tiles could not reproduce the untiled map.
    """
    from fcconv.models.receptive import analyze

    cached = getattr(fcn, "analysis", None)  # FullyConvolutional caches its analyses per size
    shape = tuple(image_shape)
    analysis = cached(shape[1:]) if callable(cached) else analyze(fcn.graph_module, shape)
    if not analysis.local or analysis.field is None:
        raise NotEquivalentError(
            f"Cannot tile this model exactly: {analysis.why_not_local or 'its receptive field is unknown'}. "
            "Each cell of a tiled map must depend only on a fixed window of the image; run "
            "fcn(image) on the whole image instead, or remove that layer."
        )
    if analysis.size_dependent and not size_dependent:
        raise NotEquivalentError(
            "Cannot tile this model exactly: its geometry depends on the input size, so a tile would "
            "not compute what the whole image computes. Run fcn(image) on the whole image instead."
        )
    field = analysis.field
    if tuple(field.stride) != tuple(fcn.stride):
        raise NotEquivalentError(
            f"The receptive field's stride {tuple(field.stride)} differs from the model's stride "
            f"{tuple(fcn.stride)}; this is a bug in fcconv, please report it with the model."
        )
    return field


@dataclass(frozen=True)
class Tile:
    """One task: the output cells it keeps and the input block it reads (ends exclusive)."""

    index: tuple[int, ...]
    cell_start: tuple[int, ...]
    cell_stop: tuple[int, ...]
    read_start: tuple[int, ...]
    read_stop: tuple[int, ...]
    first: tuple[int, ...]  # the block map's index of cell_start

    @property
    def cells(self) -> tuple[int, ...]:
        """Number of kept cells per spatial dim."""
        return tuple(e - s for s, e in zip(self.cell_start, self.cell_stop))

    @property
    def pixels(self) -> int:
        """Input pixels the task reads (per channel)."""
        return math.prod(e - s for s, e in zip(self.read_start, self.read_stop))


def _block(g0: int, g1: int, offset: int, stride: int, extent: int, size: int) -> tuple[int, int]:
    """The input ``[a, b)`` that cells ``[g0, g1)`` of one spatial dim need (see the module)."""
    a = max(0, offset + stride * g0) // stride * stride
    b = min(size, offset + stride * (g1 - 1) + extent)
    return a, b


@dataclass(frozen=True)
class TilePlan:
    """The tiles of a map: a regular grid of ``cells_per_tile`` output cells (the zarr chunks).

    Attributes:
        stride, offset, extent: the receptive field, per spatial dim.
        image: the image's spatial size.
        grid: the map's spatial size (``fcn.grid_shape(image)``).
        cells_per_tile: output cells one tile keeps, per dim (the last tile may keep fewer).
        tile: the largest input block a task may read, per dim, halo included.
        method: ``"tiles"``.
        reason: why the map is not streamed (None when streaming was not tried).
        peak_bytes: None (not estimated for halo tiles).
    """

    stride: tuple[int, ...]
    offset: tuple[int, ...]
    extent: tuple[int, ...]
    image: tuple[int, ...]
    grid: tuple[int, ...]
    cells_per_tile: tuple[int, ...]
    tile: tuple[int, ...]
    method: str = "tiles"           # what runs it: halo tiles (see fcconv.tiling._strips for "stream")
    reason: str | None = None       # why it is not streamed, when streaming was tried
    peak_bytes: int | None = None   # not estimated for halo tiles

    @property
    def tiles_per_dim(self) -> tuple[int, ...]:
        return tuple(-(-g // k) for g, k in zip(self.grid, self.cells_per_tile))

    def __len__(self) -> int:
        return math.prod(self.tiles_per_dim)

    def tile_at(self, index: Sequence[int]) -> Tile:
        """The tile with grid index ``index`` (the index of its output chunk)."""
        starts, stops, reads, ends, first = [], [], [], [], []
        for d, i in enumerate(index):
            g0 = i * self.cells_per_tile[d]
            g1 = min(self.grid[d], g0 + self.cells_per_tile[d])
            a, b = _block(g0, g1, self.offset[d], self.stride[d], self.extent[d], self.image[d])
            starts.append(g0)
            stops.append(g1)
            reads.append(a)
            ends.append(b)
            first.append(g0 - a // self.stride[d])
        return Tile(tuple(int(i) for i in index), tuple(starts), tuple(stops), tuple(reads), tuple(ends),
                    tuple(first))

    def __iter__(self) -> Iterator[Tile]:
        for index in itertools.product(*(range(n) for n in self.tiles_per_dim)):
            yield self.tile_at(index)

    def recompute_factor(self) -> float:
        """Input pixels read by all tiles over the image's pixels (1.0: no halo)."""
        total = 1.0
        for d in range(len(self.grid)):  # tiles are a product grid: the factor is a product too
            n = self.tiles_per_dim[d]
            read = 0
            for i in range(n):
                g0 = i * self.cells_per_tile[d]
                g1 = min(self.grid[d], g0 + self.cells_per_tile[d])
                a, b = _block(g0, g1, self.offset[d], self.stride[d], self.extent[d], self.image[d])
                read += b - a
            total *= read / self.image[d]
        return total


def _minimum_tile(field: Field, image: tuple[int, ...], grid: tuple[int, ...]) -> tuple[int, ...]:
    """Per dim, the largest block one cell needs: no tile below it can hold a whole field."""
    return tuple(
        max(b - a for a, b in (_block(g, g + 1, o, t, e, s) for g in range(n)))
        for o, t, e, s, n in zip(field.offset, field.stride, field.extent, image, grid)
    )


def plan_tiles(field: Field, image: Sequence[int], grid: Sequence[int], tile: int | Sequence[int]
               ) -> TilePlan:
    """Cut a map of ``grid`` cells over an image of spatial size ``image`` into tiles of at most ``tile``.

    Args:
        field: the receptive field (from :func:`field_of`).
        image: the image's spatial size.
        grid: the map's spatial size, ``fcn.grid_shape(image)``.
        tile: the largest input block one task reads, halo included: an int or one per dim.

    Raises:
        FcconvError: if ``tile`` is below the minimum, which the message states.

    Example:
        >>> plan = plan_tiles(field_of(fcn, (3, 5000, 5000)), (5000, 5000), fcn.grid_shape(5000), 2048)
    """
    image, grid = tuple(int(s) for s in image), tuple(int(g) for g in grid)
    ndim = len(image)
    sizes = (tile,) * ndim if isinstance(tile, int) and not isinstance(tile, bool) else tile
    if (isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) != ndim
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes)):
        raise FcconvError(
            f"tile must be a positive int or {ndim} of them (one per spatial dim); got {tile!r}.")
    minimum = _minimum_tile(field, image, grid)
    if any(s < m for s, m in zip(sizes, minimum)):
        raise FcconvError(
            f"tile {format_shape(sizes)} is too small for this model: one cell's field with its "
            f"alignment to the stride {format_shape(field.stride)} needs at least "
            f"{format_shape(minimum)} pixels. Pass tile >= {max(minimum)} (--tile {max(minimum)} on the "
            "command line)."
        )
    cells = []
    for o, t, e, s, g, limit in zip(field.offset, field.stride, field.extent, image, grid, sizes):
        if limit >= s:
            cells.append(g)  # the whole dim in one tile
            continue
        # An interior block for k cells spans (offset mod stride) + extent + stride*(k - 1) pixels.
        k = max(1, (limit - o % t - e) // t + 1)
        cells.append(min(g, k))
    plan = TilePlan(tuple(field.stride), tuple(field.offset), tuple(field.extent), image, grid,
                    tuple(cells), tuple(sizes))
    widest = tuple(max(b - a for a, b in (
        _block(i * k, min(g, i * k + k), o, t, e, s) for i in range(n)))
        for o, t, e, s, g, k, n in zip(field.offset, field.stride, field.extent, image, grid, cells,
                                       plan.tiles_per_dim))
    if any(w > s for w, s in zip(widest, sizes)):
        raise NotEquivalentError(f"Tiles of {format_shape(widest)} exceed tile {format_shape(sizes)}; "
                                 "this is a bug in fcconv, please report it.")
    return plan
