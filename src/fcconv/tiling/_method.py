"""Which method makes a map: row streaming where the executor accepts the graph, else halo tiles.

Halo tiles whose recompute factor exceeds :data:`MAX_FACTOR` are refused unless forced: the message
states the factor and the smallest tile that brings it under :data:`GOOD_FACTOR`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

from fcconv._shapes import format_shape
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.tiling._plan import Field, TilePlan, field_of, plan_tiles
from fcconv.tiling._stream import NotStreamable
from fcconv.tiling._strips import StreamPlan, plan_stream

__all__ = ["METHODS", "choose_plan"]

METHODS = ("auto", "stream", "tiles")
DEFAULT_TILE = 2048
MAX_FACTOR = 4.0
GOOD_FACTOR = 2.0


def choose_plan(fcn: Any, shape: Sequence[int], grid: Sequence[int], tile: int | Sequence[int] | None,
                method: str, force: bool) -> TilePlan | StreamPlan:
    """The plan of a map of ``fcn`` over an image of per-sample ``shape`` ``(C, *spatial)``.

    Args:
        fcn: the :class:`~fcconv.FullyConvolutional`.
        shape: the image's ``(C, *spatial)``.
        grid: the map's size.
        tile: streaming: the widest strip block (None: as wide as memory allows); halo tiles: the
            largest block (None: 2048).
        method: ``"auto"`` (stream if possible, else halo tiles, with a warning saying why),
            ``"stream"`` or ``"tiles"``.
        force: run halo tiles whose recompute factor exceeds 4.

    Raises:
        FcconvError: on an unknown method, a model ``method="stream"`` cannot stream (naming the
            node), or halo tiles above the factor limit without ``force``.
        NotEquivalentError: for models whose cells are not local.

    A model whose geometry depends on the input size (TF "same" padding from ``x.size()``) is
    streamed as one strip of the whole image, never cut: only the whole image computes its map.
    """
    if method not in METHODS:
        raise FcconvError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}.")
    spatial = tuple(shape[1:])
    reason = None
    whole = False
    try:
        field: Field = field_of(fcn, shape)
    except NotEquivalentError as error:
        if method == "tiles" or "depends on the input size" not in str(error):
            raise
        field, whole = field_of(fcn, shape, size_dependent=True), True
    if method != "tiles":
        try:
            return plan_stream(fcn.graph_module, int(shape[0]), field, spatial, grid, None if whole else tile,
                               whole=whole)
        except NotStreamable as error:
            if method == "stream":
                raise FcconvError(f"Cannot stream this model: {error}. Use method='tiles' (--method tiles) "
                                  "for halo tiles.") from None
            reason = str(error)
            if whole:
                raise NotEquivalentError(f"Cannot map this model block by block: its geometry depends on the "
                                         f"input size, and it cannot be streamed ({reason}). Run fcn(image) "
                                         "on the whole image instead.") from None
            warnings.warn(f"fcconv: this model cannot be streamed ({reason}); using halo tiles instead.",
                          stacklevel=4)
    plan = plan_tiles(field, spatial, grid, DEFAULT_TILE if tile is None else tile)
    plan = dataclasses.replace(plan, reason=reason)
    factor = plan.recompute_factor()
    if factor > MAX_FACTOR and not force:
        better = smallest_tile(field, spatial, tuple(grid), GOOD_FACTOR)
        raise FcconvError(
            f"tile {format_shape(plan.tile)} makes each pixel be read {factor:.1f} times on average "
            f"(recompute factor {factor:.2f} > {MAX_FACTOR:g}); tile {better} or larger brings it under "
            f"{GOOD_FACTOR:g}. Pass a larger tile (--tile), or force=True (--force) to run it anyway."
        )
    return plan


def smallest_tile(field: Field, image: tuple[int, ...], grid: tuple[int, ...], target: float) -> int:
    """The smallest square tile (an int) whose recompute factor is under ``target`` (searched)."""
    def factor(t: int) -> float:
        try:
            return plan_tiles(field, image, grid, t).recompute_factor()
        except FcconvError:
            return float("inf")

    lo, hi = 1, max(image)
    if factor(hi) >= target:
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if factor(mid) < target:
            hi = mid
        else:
            lo = mid + 1
    return lo
