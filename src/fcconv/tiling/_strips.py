"""Where a streamed map is cut: column strips with a halo, segments of chunk rows, the memory they need.

A strip is a tile of :mod:`fcconv.tiling._plan` that holds the whole first dim: it starts on the
stride and reads the horizontal halo its cells need. A segment is the cells of a strip between two
chunk rows, read from its block of rows (one vertical halo above it unless it starts at the top); a
strip streamed as one segment reads each of its rows once, so the recompute factor is that of the
strips in the other dims, about ``(strip + halo) / strip``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fcconv._shapes import format_shape
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.tiling._plan import Field, Tile, TilePlan, _block, plan_tiles
from fcconv.tiling._source import Source
from fcconv.tiling._stream import GraphRows, NotStreamable, StreamStats, cached_graph_rows, stream_block

__all__ = ["StreamPlan", "compute_segment", "estimate_bytes", "plan_stream", "segment_to_zarr"]

BUDGET = 1_500_000_000  # bytes of row buffers a strip may hold (the default strip is as wide as this allows)
ROWS_PER_STEP = 4       # map rows the last layer makes per step
CHUNK_ROWS = 64         # map rows per zarr chunk (the unit a killed run resumes from)


def estimate_bytes(plan: GraphRows, band: int) -> int:
    """The most bytes the row buffers of one streamed block hold at once, estimated from the plan.

    One step reads ``band`` input rows; each node makes about ``band`` over its stride rows, held
    until its last consumer has run, and keeps between steps the rows its consumers' next windows
    read again (kernel - 1, plus the stride's alignment). The executor runs the steps in order, so
    the peak is the largest sum of what is held after one of them.
    """
    stride = {plan.source: 1}
    last_use: dict[Any, int] = {}
    for index, s in enumerate(plan.steps):
        stride[s.node] = stride[s.inputs[0]] * s.stride
        for i in s.inputs:
            last_use[i] = index
    made, kept = {}, 0
    for node, (size, row_bytes) in plan.rows.items():
        keep = max((c.kernel + c.stride - 2 for c in plan.consumers.get(node, ()) if not c.zipped), default=0)
        made[node] = min(size, -(-band // stride[node])) * row_bytes
        kept += min(size, max(0, keep)) * row_bytes
    held = peak = kept + made[plan.source]
    for index, s in enumerate(plan.steps):
        held += made[s.node]
        peak = max(peak, held)
        held -= sum(made[i] for i in s.inputs if last_use[i] == index)
    return int(peak)


@dataclass(frozen=True)
class StreamPlan:
    """The tasks of a streamed map: strips of the whole height, cut in segments of chunk rows.

    Attributes:
        strips: one tile per strip (``TilePlan`` whose tiles hold the whole first dim).
        chunk_rows: map rows per zarr chunk.
        segment_rows: map rows per task (a multiple of ``chunk_rows``).
        band: input rows read per step.
        peak_bytes: the estimated peak bytes of one task's row buffers.
    """

    strips: TilePlan
    chunk_rows: int
    segment_rows: int
    band: int
    peak_bytes: int
    method: str = "stream"
    reason: str | None = None
    whole: bool = False   # a size-dependent model: one strip, one segment, never cut

    @property
    def stride(self) -> tuple[int, ...]:
        return self.strips.stride

    @property
    def image(self) -> tuple[int, ...]:
        return self.strips.image

    @property
    def grid(self) -> tuple[int, ...]:
        return self.strips.grid

    @property
    def tile(self) -> tuple[int, ...]:
        return self.strips.tile

    @property
    def cells_per_tile(self) -> tuple[int, ...]:
        """The map's zarr chunk: chunk rows by the cells of a strip."""
        return (min(self.chunk_rows, self.grid[0]), *self.strips.cells_per_tile[1:])

    @property
    def tiles_per_dim(self) -> tuple[int, ...]:
        """Chunks per dim (the chunk grid)."""
        return tuple(-(-g // k) for g, k in zip(self.grid, self.cells_per_tile))

    def segments(self) -> list[Tile]:
        """Every task: a strip's cells between two chunk rows, and the block it reads."""
        return [self.segment(strip, g0, min(self.grid[0], g0 + self.segment_rows))
                for strip in self.strips for g0 in range(0, self.grid[0], self.segment_rows)]

    def segment(self, strip: Tile, g0: int, g1: int) -> Tile:
        """The task that makes map rows ``[g0, g1)`` of ``strip``."""
        a, b = _block(g0, g1, self.strips.offset[0], self.stride[0], self.strips.extent[0], self.image[0])
        index = (g0 // self.cells_per_tile[0], *strip.index[1:])
        return Tile(index, (g0, *strip.cell_start[1:]), (g1, *strip.cell_stop[1:]),
                    (a, *strip.read_start[1:]), (b, *strip.read_stop[1:]),
                    (g0 - a // self.stride[0], *strip.first[1:]))

    def chunk_indices(self, segment: Tile) -> list[tuple[int, ...]]:
        """The chunk indices a segment writes, top to bottom."""
        rows = self.cells_per_tile[0]
        return [(r, *segment.index[1:]) for r in range(segment.cell_start[0] // rows,
                                                        -(-segment.cell_stop[0] // rows))]

    def __len__(self) -> int:
        return len(self.strips) * -(-self.grid[0] // self.segment_rows)

    def __iter__(self) -> Iterator[Tile]:
        yield from self.segments()

    def recompute_factor(self) -> float:
        """Input pixels read by all tasks over the image's pixels (1.0: no halo)."""
        rows = sum(t.read_stop[0] - t.read_start[0]
                   for t in (self.segment(self.strips.tile_at((0,) * len(self.grid)), g0,
                                          min(self.grid[0], g0 + self.segment_rows))
                             for g0 in range(0, self.grid[0], self.segment_rows)))
        return self.strips.recompute_factor() * rows / self.image[0]


def _strip_plan(field: Field, image: tuple[int, ...], grid: tuple[int, ...], width: Sequence[int]
                ) -> TilePlan:
    return plan_tiles(field, image, grid, (image[0], *width))


def plan_stream(gm: Any, channels: int, field: Field, image: Sequence[int], grid: Sequence[int],
                tile: int | Sequence[int] | None = None, *, chunk_rows: int = CHUNK_ROWS,
                segment_rows: int | None = None, budget: int = BUDGET, whole: bool = False) -> StreamPlan:
    """Plan a streamed map: strips as wide as ``tile`` (or the memory ``budget``) allows.

    Args:
        gm: the converted model's graph module.
        channels: the image's channels.
        field: the receptive field (from :func:`~fcconv.tiling.field_of`).
        image, grid: the image's and the map's spatial sizes.
        tile: the widest block a strip reads in the dims after the first (an int or one per dim);
            None: the whole width if its row buffers fit ``budget`` bytes, else narrower strips.
        chunk_rows: map rows per zarr chunk.
        segment_rows: map rows per task (a multiple of ``chunk_rows``; None: the whole height).
        budget: bytes of row buffers a strip may hold when ``tile`` is None.
        whole: one strip of the whole image in one segment (a size-dependent model).

    Raises:
        NotStreamable: where the executor cannot stream the graph (the message names the node).
        FcconvError: on a ``tile`` below the minimum.
    """
    image, grid = tuple(int(s) for s in image), tuple(int(g) for g in grid)
    n = len(image)
    band = field.stride[0] * ROWS_PER_STEP
    if tile is None:
        rows = cached_graph_rows(gm, (channels, *image))  # fake run: nothing allocated
        held = estimate_bytes(rows, band)
        width = list(image[1:]) if held <= budget or whole else [
            max(1, int(s * (budget / held) ** (1 / max(1, n - 1)))) for s in image[1:]]
        strips = _fitting_strips(field, image, grid, width)
    else:
        sizes = (tile,) * n if isinstance(tile, int) else tuple(tile)
        if len(sizes) != n:
            raise FcconvError(f"tile must be an int or {n} of them (one per spatial dim); got {tile!r}.")
        try:
            strips = _strip_plan(field, image, grid, sizes[1:])
        except FcconvError:
            plan_tiles(field, image, grid, sizes)  # the tile's own message, as halo tiles give it
            raise
    chunk = max(1, min(chunk_rows, grid[0]))
    segment = grid[0] if segment_rows is None or whole else max(chunk, segment_rows // chunk * chunk)
    first = strips.tile_at((0,) * n)
    seg = StreamPlan(strips, chunk, segment, band, 0).segment(first, 0, min(grid[0], segment))
    shape = (channels, *(e - s for s, e in zip(seg.read_start, seg.read_stop)))
    peak = estimate_bytes(cached_graph_rows(gm, shape), band)
    return StreamPlan(strips, chunk, segment, band, peak, whole=whole)


def split_for(plan: StreamPlan, workers: int) -> StreamPlan:
    """``plan`` with each strip cut in segments so that ``workers`` have about two tasks each; a
    segment keeps at least four chunk rows (each recomputes one vertical halo)."""
    if plan.whole or len(plan) >= 2 * workers:
        return plan
    per_strip = -(-2 * workers // len(plan.strips))
    rows = max(4 * plan.chunk_rows, -(-plan.grid[0] // per_strip))
    rows = -(-rows // plan.chunk_rows) * plan.chunk_rows
    return dataclasses.replace(plan, segment_rows=min(plan.segment_rows, rows))


def _fitting_strips(field: Field, image: tuple[int, ...], grid: tuple[int, ...], width: list[int]
                    ) -> TilePlan:
    """Strips of at most ``width``, widened to the smallest strip the field allows."""
    try:
        return _strip_plan(field, image, grid, width)
    except FcconvError:
        minimum = [max(w, 1) for w in width]
        for d in range(1, len(image)):
            minimum[d - 1] = max(minimum[d - 1], _min_width(field, image, grid, d))
        return _strip_plan(field, image, grid, minimum)


def _min_width(field: Field, image: tuple[int, ...], grid: tuple[int, ...], d: int) -> int:
    o, t, e = field.offset[d], field.stride[d], field.extent[d]
    return max(b - a for a, b in (_block(g, g + 1, o, t, e, image[d]) for g in range(grid[d])))


# ----------------------------------------------------------------------------------------------
# One task


def _placement(fcn: nn.Module) -> tuple[torch.dtype, torch.device]:
    from fcconv.tiling._tasks import model_placement

    return model_placement(fcn)


def stream_segment(fcn: Any, source: Source, segment: Tile, transform: Any, chunk_rows: int, band: int,
                   stats: StreamStats | None = None) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Stream one segment; yield each finished chunk row as ``(cell_start, values)``.

    ``values`` is ``(classes, rows, *strip cells)`` in the model's dtype (float32 for bfloat16).
    """
    shape = (source.shape[0], *(e - s for s, e in zip(segment.read_start, segment.read_stop)))
    plan = cached_graph_rows(fcn.graph_module, shape)
    if plan.result_step.dim != 2:
        raise NotStreamable("the map's rows are not its dim 2 (N, C, rows, ...)")
    dtype, device = _placement(fcn)

    def read(r0: int, r1: int) -> Tensor:
        start = (segment.read_start[0] + r0, *segment.read_start[1:])
        stop = (segment.read_start[0] + r1, *segment.read_stop[1:])
        block = source.read(start, stop)
        x = torch.from_numpy(np.array(block, copy=True)).unsqueeze(0)
        with torch.inference_mode():
            y = transform(x) if transform is not None else x.to(dtype)
        if not isinstance(y, Tensor) or tuple(y.shape) != tuple(x.shape):
            got = format_shape(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise FcconvError(f"transform must return a tensor of the block's shape {format_shape(x.shape)} "
                              f"(a per-pixel function); it returned {got}.")
        return y.to(device=device)

    first, wanted = segment.first[0], segment.cells[0]
    cols = tuple(slice(f, f + c) for f, c in zip(segment.first[1:], segment.cells[1:]))
    pending: list[Tensor] = []
    row = segment.cell_start[0]  # the map row the next kept row is
    have = 0
    with torch.inference_mode():
        for j0, rows in stream_block(plan, read, band, stats):
            lo, hi = max(j0, first), min(j0 + rows.shape[2], first + wanted)
            if hi > lo:
                pending.append(rows[(0, slice(None), slice(lo - j0, hi - j0)) + cols])
                have += hi - lo
            while have and (have >= chunk_rows - row % chunk_rows or row + have >= segment.cell_stop[0]):
                take = min(have, chunk_rows - row % chunk_rows)
                block = torch.cat(pending, 1)
                yield (row, *segment.cell_start[1:]), _numpy(block[:, :take])
                _release_free_memory()
                pending, have, row = [block[:, take:]], have - take, row + take
            if row >= segment.cell_stop[0]:
                return
    if row < segment.cell_stop[0]:
        raise NotEquivalentError(f"The stream of segment {segment.index} ended at map row {row}, before "
                                 f"{segment.cell_stop[0]}; this is a bug in fcconv, please report it.")


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_free_memory() -> None:
    """Give the heap's free memory back to the system after each chunk row: the bands' tensors of
    many sizes otherwise leave glibc's heap fragmented, and the resident memory grows with the
    image's height (measured: 192 MB -> 280 MB above the model for 4x the height on resnet50)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _numpy(values: Tensor) -> np.ndarray:
    values = values.cpu()
    return (values.float() if values.dtype == torch.bfloat16 else values).contiguous().numpy()


def compute_segment(fcn: Any, source: Source, segment: Tile, transform: Any, *, chunk_rows: int, band: int
                    ) -> np.ndarray:
    """The map's cells of one segment, streamed: ``(classes, *segment.cells)``."""
    parts = [v for _, v in stream_segment(fcn, source, segment, transform, chunk_rows, band)]
    return np.concatenate(parts, axis=1)


def segment_to_zarr(fcn: Any, source: Source, segment: Tile, transform: Any, out: str, *, chunk_rows: int,
                    band: int) -> int:
    """Stream one segment into the zarr map at ``out``, one chunk row at a time; returns its cells."""
    from fcconv.tiling._store import write_chunk

    for start, values in stream_segment(fcn, source, segment, transform, chunk_rows, band):
        write_chunk(out, start, values)
    return int(math.prod(segment.cells))
