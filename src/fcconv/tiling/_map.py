"""``tiled_map`` and ``dask_map``: a model's dense map over an image of any size, tile by tile, exactly."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fcconv._deps import need_tiles as require
from fcconv._shapes import format_shape
from fcconv.errors import FcconvError
from fcconv.tiling._method import choose_plan
from fcconv.tiling._plan import Tile, TilePlan
from fcconv.tiling._source import Source, open_source
from fcconv.tiling._store import finished, open_output
from fcconv.tiling._strips import StreamPlan, compute_segment, segment_to_zarr, split_for
from fcconv.tiling._tasks import compute_tile, model_identity, model_placement, tile_to_zarr

__all__ = ["dask_map", "plan_for", "tiled_map"]

Transform = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class _Job:
    fcn: nn.Module
    source: Source
    plan: TilePlan | StreamPlan
    transform: Transform | None
    classes: int
    dtype: np.dtype


def _prepare(fcn: Any, image: Any, tile: int | Sequence[int] | None, layout: str, transform: Transform | None,
             level: int, method: str = "auto", force: bool = False) -> _Job:
    from fcconv import FullyConvolutional

    if not isinstance(fcn, FullyConvolutional):
        raise FcconvError(
            f"fcn must be a FullyConvolutional; got {type(fcn).__name__}. Convert the classifier first: "
            "fcn = fcconv.convolutionalize(model, input_shape)."
        )
    if transform is not None and not callable(transform):
        raise FcconvError(
            f"transform must be a callable on (1, C, h, w) tensors; got {type(transform).__name__}.")
    source = open_source(image, layout=layout, level=level, ndim=fcn.ndim, channels=fcn.input_shape[0])
    spatial = source.shape[1:]
    if any(s < m for s, m in zip(spatial, fcn.min_size)):
        raise FcconvError(
            f"The image {format_shape(spatial)} is smaller than the model's window: every spatial size "
            f"must be at least {format_shape(fcn.min_size)} for one cell. Pass a larger image."
        )
    plan = choose_plan(fcn, source.shape, fcn.grid_shape(spatial), tile, method, force)
    dtype, _ = model_placement(fcn)
    classes = fcn.num_classes
    if classes is None:  # the map's channels, from the smallest input
        with torch.inference_mode():
            classes = int(fcn(torch.zeros(1, *fcn.input_shape[:1], *fcn.min_size, dtype=dtype)).shape[1])
    # numpy has no bfloat16: such maps are stored in float32 (compute_tile converts them).
    stored = torch.float32 if dtype == torch.bfloat16 else dtype
    return _Job(fcn, source, plan, transform, int(classes), torch.empty((), dtype=stored).numpy().dtype)


def plan_for(fcn: Any, image: Any, *, tile: int | Sequence[int] | None = None, layout: str = "CHW",
             level: int = 0, method: str = "auto", force: bool = False) -> TilePlan | StreamPlan:
    """The tasks :func:`tiled_map` would run: ``.method`` (``"stream"`` or ``"tiles"``), the chunks
    (``cells_per_tile``), the blocks read, ``.recompute_factor()`` and ``.peak_bytes`` (the estimated
    peak bytes of a streamed task's row buffers; None for halo tiles).

    Example:
        >>> plan = plan_for(fcn, "slide.tif", layout="HWC")
        >>> plan.method, plan.recompute_factor(), plan.peak_bytes
    """
    return _prepare(fcn, image, tile, layout, None, level, method, force).plan


def _tasks(job: _Job) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The functions computing one task: to numpy, and to the zarr store."""
    plan = job.plan
    if isinstance(plan, StreamPlan):
        return (functools.partial(compute_segment, chunk_rows=plan.cells_per_tile[0], band=plan.band),
                functools.partial(segment_to_zarr, chunk_rows=plan.cells_per_tile[0], band=plan.band))
    return compute_tile, tile_to_zarr


def _unfinished(plan: TilePlan | StreamPlan, result: Any, path: str) -> list[Tile]:
    """The tasks left to run: halo tiles whose chunk is missing; for a stream, each segment from its
    first unfinished chunk row (one vertical halo is recomputed)."""
    if not isinstance(plan, StreamPlan):
        todo = list(plan)
        done = finished(result, path, (t.index for t in todo))
        return [t for t in todo if t.index not in done]
    segments = plan.segments()
    done = finished(result, path, (i for s in segments for i in plan.chunk_indices(s)))
    left = []
    for s in segments:
        rows = [i[0] for i in plan.chunk_indices(s) if i not in done]
        if rows and plan.whole:  # a size-dependent model: only the whole image gives its map
            left.append(s)
        elif rows:
            strip = plan.strips.tile_at((0, *s.index[1:]))
            left.append(plan.segment(strip, rows[0] * plan.cells_per_tile[0], s.cell_stop[0]))
    return left


def _delayed_inputs(job: _Job) -> tuple[Any, Any]:
    """The model and the image as one dask key each: a task graph ships them once, not per task."""
    dask = require("dask")
    from dask.base import tokenize

    model = dask.delayed(job.fcn, name=f"fcconv-model-{model_identity(job.fcn)}")
    source = dask.delayed(job.source, name=f"fcconv-image-{tokenize(job.source.identity)}", traverse=False)
    return model, source


def dask_map(fcn: Any, array: Any, *, tile: int | Sequence[int] | None = None, layout: str = "CHW",
             transform: Transform | None = None, level: int = 0, method: str = "auto",
             force: bool = False) -> Any:
    """The map of ``fcn`` over ``array`` as a lazy ``dask.array.Array`` ``(classes, *grid)``.

    Each chunk is one task of :func:`tiled_map` (a streamed segment of a strip, or a halo tile):
    computed from its own block of the image, equal to the same cells of ``fcn(image[None])[0]``.
    Nothing runs until you compute or store it.

    Args:
        fcn, array, tile, layout, transform, level, method, force: as for :func:`tiled_map`.

    Example:
        >>> scores = fcconv.dask_map(fcn, dask.array.from_zarr("slide.zarr"), tile=2048)
        >>> scores.argmax(0).to_zarr("classes.zarr")
    """
    da = require("dask.array")
    dask = require("dask")
    job = _prepare(fcn, array, tile, layout, transform, level, method, force)
    model, source = _delayed_inputs(job)
    compute, _ = _tasks(job)
    plan = job.plan
    rows = plan.segment_rows if isinstance(plan, StreamPlan) else plan.cells_per_tile[0]
    blocks = np.empty((-(-plan.grid[0] // rows), *plan.tiles_per_dim[1:]), dtype=object)
    for t in plan:
        task = dask.delayed(compute, pure=True)(model, source, t, job.transform)
        index = (t.cell_start[0] // rows, *t.index[1:])
        blocks[index] = da.from_delayed(task, shape=(job.classes, *t.cells), dtype=job.dtype)
    return da.block(blocks.tolist())


def _local_workers() -> int:
    """Tasks run at once on this machine: the cores over the threads torch uses per op."""
    return max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads()))


def _run_local(job: _Job, tiles: list[Tile], out: str | None, bar: Any) -> Iterator[tuple[Tile, Any]]:
    dask = require("dask")
    from dask.callbacks import Callback

    model, source = _delayed_inputs(job)
    compute, write = _tasks(job)
    keys = {f"fcconv-tile-{'-'.join(map(str, t.index))}": t for t in tiles}
    tasks = [
        dask.delayed(write if out else compute, pure=False)(
            model, source, t, job.transform, *((out,) if out else ()), dask_key_name=key)
        for key, t in keys.items()
    ]

    class _Progress(Callback):
        def _posttask(self, key: Any, *_: Any) -> None:
            if key in keys:
                bar.update(1)

    with _Progress():
        results = dask.compute(*tasks, scheduler="threads", num_workers=_local_workers())
    yield from zip(keys.values(), results)


def _run_client(job: _Job, tiles: list[Tile], out: str | None, client: Any, bar: Any
                ) -> Iterator[tuple[Tile, Any]]:
    distributed = require("distributed")
    model = client.scatter(job.fcn, broadcast=True, hash=False)  # once per worker, not per task
    source = client.scatter(job.source, broadcast=True, hash=False)
    compute, write = _tasks(job)
    futures = {
        client.submit(write if out else compute, model, source, t, job.transform,
                      *((out,) if out else ()), pure=False): t
        for t in tiles
    }
    try:
        for future, value in distributed.as_completed(list(futures), with_results=True):
            bar.update(1)
            yield futures.pop(future), value
    finally:
        client.cancel(list(futures))


def tiled_map(fcn: Any, image: Any, *, tile: int | Sequence[int] | None = None,
              out: str | os.PathLike[str] | None = None, layout: str = "CHW",
              transform: Transform | None = None, level: int = 0, client: Any = None,
              overwrite: bool = False, progress: bool = True, method: str = "auto",
              force: bool = False) -> Any:
    """The map of ``fcn`` over ``image``, computed block by block: equal to ``fcn(image[None])[0]``.

    Two methods, both exact. Streaming (``method="stream"``) reads column strips down their whole
    height in bands of rows; every layer keeps only the rows its next window needs, so each
    activation is computed about once and memory follows the strip's width, not the image. Halo
    tiles (``method="tiles"``) start on the model's stride and read a halo that covers the
    receptive field of the cells they keep. ``"auto"`` streams where the executor accepts the
    graph, else uses halo tiles with a warning that says why.

    Args:
        fcn: a :class:`~fcconv.FullyConvolutional` whose cells are local (no global pooling).
        image: a numpy array or memmap, a zarr array or a path to one, a TIFF path, or a dask array.
        tile: halo tiles: the largest input block one task reads, halo included (an int or one per
            dim; None: 2048). Streaming: the widest strip, halo included (None: the whole width if
            its row buffers fit about 1.5 GB, else narrower strips).
        out: ``None`` to return numpy; a path ``"scores.zarr"`` to write the map chunk by chunk
            and return the zarr array. Running again with the same arguments resumes.
        layout: ``"CHW"`` or ``"HWC"`` (channels last, as TIFF and PNG store them); a 2-d image
            is one channel.
        transform: applied to each block as a ``(1, C, h, w)`` tensor, per pixel, e.g.
            ``lambda t: (t.float() / 255 - mean) / std``; without one, blocks are cast to the
            model's dtype.
        level: the pyramid level of a TIFF or of a zarr group of levels.
        client: a ``dask.distributed.Client`` to run the tiles on its workers.
        overwrite: replace an ``out`` that holds another run's map.
        progress: show a progress bar (tasks done, throughput, ETA).
        method: ``"auto"``, ``"stream"`` or ``"tiles"`` (see above).
        force: run halo tiles whose recompute factor exceeds 4 (refused otherwise, with the
            smallest tile that brings it under 2).

    Returns:
        ``(classes, *grid)``: numpy, or the zarr array at ``out``.

    Raises:
        FcconvError: on a tile below the minimum (the message states it), an image smaller than
            the window, an unreadable image or level, an ``out`` of another run or not writable.
        NotEquivalentError: for models whose cells are not local (e.g. squeeze-and-excitation).

    Example:
        >>> scores = fcconv.tiled_map(fcn, "slide.tif", layout="HWC", tile=2048, out="scores.zarr")
    """
    job = _prepare(fcn, image, tile, layout, transform, level, method, force)
    if isinstance(job.plan, StreamPlan) and client is not None:  # segments: tasks for every worker
        workers = len(client.scheduler_info().get("workers", {})) or 1
        job = dataclasses.replace(job, plan=split_for(job.plan, workers))
    plan = job.plan
    shape, chunks = (job.classes, *plan.grid), (job.classes, *plan.cells_per_tile)
    path: str | None = None
    todo = list(plan)
    result: Any = None
    if out is None:
        result = np.empty(shape, dtype=job.dtype)
    elif isinstance(out, (str, os.PathLike)):
        from dask.base import tokenize

        identity = {"image": job.source.identity, "image_shape": job.source.shape, "layout": layout,
                    "level": level, "model": model_identity(job.fcn), "tile": plan.tile,
                    "cells_per_tile": plan.cells_per_tile,
                    "transform": None if transform is None else tokenize(transform)}
        result = open_output(out, shape=shape, chunks=chunks, dtype=job.dtype, identity=identity,
                             overwrite=overwrite)
        path = str(Path(out).expanduser())
        todo = _unfinished(plan, result, path)
    else:
        raise FcconvError(f"out must be None or a path to a zarr store; got {type(out).__name__}.")
    with tqdm(total=len(plan), initial=len(plan) - len(todo), unit="tile", desc="tiled map",
              disable=not progress) as bar:
        runs = _run_client(job, todo, path, client, bar) if client is not None else _run_local(
            job, todo, path, bar)
        for t, values in runs:
            if path is None:
                cells = tuple(slice(s, e) for s, e in zip(t.cell_start, t.cell_stop))
                result[(slice(None),) + cells] = values
    if path is None:
        return result
    return require("zarr").open_array(path, mode="r")
