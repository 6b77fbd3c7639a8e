"""``tiled_map`` and ``dask_map``: a model's dense map over an image of any size, tile by tile, exactly."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fcconv._deps import need_tiles as require
from fcconv._io import check_output_store
from fcconv._shapes import format_shape
from fcconv.errors import FcconvError
from fcconv.tiling import _mask, _ome
from fcconv.tiling._method import choose_plan
from fcconv.tiling._plan import Tile, TilePlan
from fcconv.tiling._prefetch import Prefetching
from fcconv.tiling._source import Plane, Source, open_source
from fcconv.tiling._store import finished, mark_complete, open_output, release_output
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


def _prepare(fcn: Any, image: Any, tile: int | Sequence[int] | None, layout: str | None,
             transform: Transform | None, level: int, plane: Plane = None, mpp: float | None = None,
             magnification: float | None = None, method: str = "auto", force: bool = False) -> _Job:
    from fcconv.models.fcn import FullyConvolutional

    if not isinstance(fcn, FullyConvolutional):
        raise FcconvError(
            f"fcn must be a FullyConvolutional; got {type(fcn).__name__}. Convert the classifier first: "
            "fcn = fcconv.convolutionalize(model, input_shape)."
        )
    if transform is not None and not callable(transform):
        raise FcconvError(
            f"transform must be a callable on (1, C, h, w) tensors; got {type(transform).__name__}.")
    source = open_source(image, layout=layout, level=level, ndim=fcn.ndim, channels=fcn.input_shape[0],
                         plane=plane, mpp=mpp, magnification=magnification)
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


def plan_for(fcn: Any, image: Any, *, tile: int | Sequence[int] | None = None, layout: str | None = None,
             level: int = 0, plane: Plane = None, mpp: float | None = None,
             magnification: float | None = None, method: str = "auto", force: bool = False
             ) -> TilePlan | StreamPlan:
    """The tasks :func:`tiled_map` would run: ``.method`` (``"stream"`` or ``"tiles"``), the chunks
    (``cells_per_tile``), the blocks read, ``.recompute_factor()`` and ``.peak_bytes`` (the estimated
    peak bytes of a streamed task's row buffers; None for halo tiles).

    Example:
        >>> plan = plan_for(fcn, "slide.tif")
        >>> plan.method, plan.recompute_factor(), plan.peak_bytes
    """
    return _prepare(fcn, image, tile, layout, None, level, plane, mpp, magnification, method, force).plan


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
        done = finished(result, path, _chunk_indices(plan, todo))
        return [t for t in todo if t.index not in done]
    segments = plan.segments()
    done = finished(result, path, _chunk_indices(plan, segments))
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


def dask_map(fcn: Any, array: Any, *, tile: int | Sequence[int] | None = None, layout: str | None = None,
             transform: Transform | None = None, level: int = 0, plane: Plane = None,
             mpp: float | None = None, magnification: float | None = None, method: str = "auto",
             force: bool = False) -> Any:
    """The map of ``fcn`` over ``array`` as a lazy ``dask.array.Array`` ``(classes, *grid)``.

    Each chunk is one task of :func:`tiled_map` (a streamed segment of a strip, or a halo tile):
    computed from its own block of the image, equal to the same cells of ``fcn(image[None])[0]``.
    Nothing runs until you compute or store it.

    Args:
        fcn, array, tile, layout, transform, level, plane, mpp, magnification, method, force: as for
            :func:`tiled_map`.

    Example:
        >>> scores = fcconv.dask_map(fcn, dask.array.from_zarr("slide.zarr"), tile=2048)
        >>> scores.argmax(0).to_zarr("classes.zarr")
    """
    da = require("dask.array")
    dask = require("dask")
    job = _prepare(fcn, array, tile, layout, transform, level, plane, mpp, magnification, method, force)
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
    """Run the tiles on dask's threaded scheduler, a few batches of tasks at a time.

    One ``dask.compute`` over every tile would keep every tile's result until the last one ends;
    batches of a few tasks per worker keep memory flat however many tiles there are.
    """
    dask = require("dask")
    from dask.callbacks import Callback

    model, source = _delayed_inputs(job)
    compute, write = _tasks(job)
    workers = _local_workers()
    # dask's threads start independent tasks in descending key order: these keys run the tiles in
    # plan order, so a prefetching source reads the next ones ahead.
    keys = {f"fcconv-tile-{10**9 - rank:010d}": t for rank, t in enumerate(tiles)}

    class _Progress(Callback):
        def _posttask(self, key: Any, *_: Any) -> None:
            if key in keys:
                bar.update(1)

    names = list(keys)
    batch = 4 * workers
    for first in range(0, len(names), batch):
        part = names[first:first + batch]
        tasks = [
            dask.delayed(write if out else compute, pure=False)(
                model, source, keys[key], job.transform, *((out,) if out else ()), dask_key_name=key)
            for key in part
        ]
        with _Progress():
            results = dask.compute(*tasks, scheduler="threads", num_workers=workers)
        yield from zip((keys[key] for key in part), results)
        del tasks, results


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


def _geometry(fcn: Any, job: _Job, level: int) -> dict[str, Any]:
    """The group's ``geometry`` attribute: where each cell of the map lies in the image read."""
    ndim = int(fcn.ndim)
    try:
        crop = fcn.window_of((0,) * ndim, job.source.shape[1:])
        offset = list(crop[:ndim])
    except FcconvError:
        offset = [0] * ndim
    return {"stride": list(fcn.stride), "window": list(fcn.window), "window_offset": offset,
            "image_shape": list(job.source.shape), "level": level, "downsample": 1.0, "mpp": None}


def tiled_map(fcn: Any, image: Any, *, tile: int | Sequence[int] | None = None,
              out: str | os.PathLike[str] | None = None, layout: str | None = None,
              transform: Transform | None = None, level: int = 0, client: Any = None,
              overwrite: bool = False, wait: bool = False, progress: bool = True, plane: Plane = None,
              mpp: float | None = None, magnification: float | None = None, mask: Any = None,
              scores: str = "logits", class_names: Sequence[str] | str | os.PathLike[str] | None = None,
              prefetch: bool = False, method: str = "auto", force: bool = False) -> Any:
    """The map of ``fcn`` over ``image``, computed block by block: equal to ``fcn(image[None])[0]``.

    Two methods, both exact. Streaming (``method="stream"``) reads column strips down their whole
    height in bands of rows; every layer keeps only the rows its next window needs, so each
    activation is computed about once and memory follows the strip's width, not the image. Halo
    tiles (``method="tiles"``) start on the model's stride and read a halo that covers the
    receptive field of the cells they keep. ``"auto"`` streams where the executor accepts the
    graph, else uses halo tiles with a warning that says why.

    Args:
        fcn: a :class:`~fcconv.FullyConvolutional` whose cells are local (no global pooling).
        image: a numpy array or memmap, a zarr array or a path to one, a TIFF path, a dask array,
            or a slide: a ``TiffSlide``/``OpenSlide`` object or a path they read (with ``mpp``).
        tile: halo tiles: the largest input block one task reads, halo included (an int or one per
            dim; None: 2048). Streaming: the widest strip, halo included (None: the whole width if
            its row buffers fit about 1.5 GB, else narrower strips).
        out: ``None`` to return numpy; a path ``"scores.zarr"`` to write the map as a zarr group
            (the map is its array ``"0"``, one shard per tile) and return that array. Running
            again with the same arguments resumes, recomputing any chunk that fails its checksum.
        layout: ``None`` (the default) reads the file's axes (a TIFF's: ``YXS`` is channels last,
            ``CYX`` first, ``YX`` one channel), else takes ``"CHW"``; ``"CHW"`` or ``"HWC"``
            (channels last) says it, and is refused where it contradicts the file. A 2-d image is
            one channel.
        transform: applied to each block as a ``(1, C, h, w)`` tensor, per pixel, e.g.
            ``lambda t: (t.float() / 255 - mean) / std``; without one, blocks are cast to the
            model's dtype.
        level: the pyramid level of a TIFF or of a zarr group of levels.
        client: a ``dask.distributed.Client`` to run the tiles on its workers.
        overwrite: replace an ``out`` that holds another run's map (only a map fcconv wrote).
        wait: wait for another run writing ``out`` to finish, instead of refusing.
        progress: show a progress bar (tiles done, throughput, ETA).
        plane: for a stack (a TIFF with axes ``ZYX``, ``TYX``, ``TZCYX``...: planes beyond the
            channels and the model's spatial dims), the plane to map: an index along its one stack
            axis (``plane=2``), or one per stack axis (``plane={"T": 0, "Z": 2}``). A stack without
            ``plane`` is refused.
        mpp, magnification: for slides, the resolution to read (micrometres per pixel, or an
            objective power such as 20): the coarsest level at least as fine, area-averaged to it
            when no level matches (see ``docs/slides.md``).
        mask: compute only cells whose window touches tissue: ``"otsu"``, a boolean array (any
            resolution), an image file or a callable on a thumbnail. Tiles without tissue are never
            read; their cells are NaN (in memory too) and 0 in ``out/valid``. With a mask,
            ``method="auto"`` runs halo tiles (a streamed strip spans tissue and background).
        scores: ``"logits"`` (the model's outputs) or ``"probabilities"`` (softmax over classes).
        class_names: one name per class (or a file with one a line), for the OME-Zarr channel
            labels and ``fcconv.classes`` of ``out``.
        prefetch: on this machine (no ``client``), read the next halo tiles' blocks in a
            background thread while the model runs (streamed strips read their bands in turn).
        method: ``"auto"``, ``"stream"`` or ``"tiles"`` (see above).
        force: run halo tiles whose recompute factor exceeds 4 (refused otherwise, with the
            smallest tile that brings it under 2).

    Returns:
        ``(classes, *grid)``: numpy, or the zarr array ``out/0``.

    Raises:
        FcconvError: on a tile below the minimum (the message states it), an image smaller than
            the window, an unreadable image or level, an ``out`` of another run, not written by
            fcconv, being written by another run, or not writable.
        NotEquivalentError: for models whose cells are not local (e.g. squeeze-and-excitation).

    Example:
        >>> scores = fcconv.tiled_map(fcn, "slide.tif", tile=2048, out="scores.zarr")
    """
    if mask is not None and method == "auto":  # a mask skips whole tasks: tiles, not full-height strips
        method = "tiles"
    job = _prepare(fcn, image, tile, layout, transform, level, plane, mpp, magnification, method, force)
    if isinstance(job.plan, StreamPlan) and client is not None:  # segments: tasks for every worker
        workers = len(client.scheduler_info().get("workers", {})) or 1
        job = dataclasses.replace(job, plan=split_for(job.plan, workers))
    job = dataclasses.replace(job, fcn=_ome.with_scores(job.fcn, scores))  # logits or probabilities
    names = _ome.read_class_names(class_names, job.classes)
    plan = job.plan
    tissue = None if mask is None else _mask.tissue_cells(mask, job.source, fcn, plan.grid)
    if out is None:
        result = np.empty((job.classes, *plan.grid), dtype=job.dtype)
        todo = list(plan) if tissue is None else _mask.tiles_touching(list(plan), tissue)
        _run(_prefetching(job, todo, prefetch and client is None), todo, None, client, progress, result)
        return result if tissue is None else _mask.finish(result, None, list(plan), tissue)
    if not isinstance(out, (str, os.PathLike)):
        raise FcconvError(f"out must be None or a path to a zarr store; got {type(out).__name__}.")
    from dask.base import tokenize

    check_output_store(out)
    identity = {"image": job.source.identity, "image_shape": job.source.shape,
                "layout": job.source.layout, "level": level, "model": model_identity(job.fcn),
                "tile": plan.tile,
                "cells_per_tile": plan.cells_per_tile,
                "transform": None if transform is None else tokenize(transform), "scores": scores}
    if tissue is not None:
        identity["mask"] = _mask.mask_token(tissue)
    path = str(Path(out).expanduser().absolute())
    stored = open_output(path, shape=(job.classes, *plan.grid), chunks=(job.classes, *plan.cells_per_tile),
                         dtype=job.dtype, identity=identity, overwrite=overwrite,
                         geometry=_geometry(fcn, job, level), wait=wait)
    try:
        todo = _unfinished(plan, stored, path)
        if tissue is not None:  # tiles without tissue are never read nor written
            todo = _mask.tiles_touching(todo, tissue)
        if todo:
            mark_complete(path, False)
        _run(_prefetching(job, todo, prefetch and client is None), todo, path, client, progress, None)
        chunks = _chunk_indices(plan, todo)
        if len(finished(stored, path, chunks)) != len(chunks):
            raise FcconvError(f"Some chunks of {path!r} did not reach the disk intact; run the same command "
                              "again to recompute them.")
        if tissue is not None:
            _mask.finish(None, path, list(plan), tissue)
        _ome.finish(path, fcn, job.source, class_names=names, scores=scores, tissue=tissue)
        mark_complete(path, True)
    finally:
        release_output(path)
    return require("zarr").open_group(path, mode="r")["0"]


def _chunk_indices(plan: TilePlan | StreamPlan, tasks: list[Tile]) -> list[tuple[int, ...]]:
    """The map chunks the tasks write: one per halo tile, one per chunk row of a streamed segment."""
    if isinstance(plan, StreamPlan):
        return [i for t in tasks for i in plan.chunk_indices(t)]
    return [t.index for t in tasks]


def _prefetching(job: _Job, todo: list[Tile], prefetch: bool) -> _Job:
    """The job reading the next tiles' blocks in a background thread while the model runs."""
    if not prefetch or not todo or isinstance(job.plan, StreamPlan):
        return job
    ahead = Prefetching(job.source, ((t.read_start, t.read_stop) for t in todo))
    return dataclasses.replace(job, source=cast(Source, ahead))


def _run(job: _Job, todo: list[Tile], path: str | None, client: Any, progress: bool,
         result: np.ndarray | None) -> None:
    try:
        _run_all(job, todo, path, client, progress, result)
    finally:
        if isinstance(job.source, Prefetching):
            job.source.close()


def _run_all(job: _Job, todo: list[Tile], path: str | None, client: Any, progress: bool,
             result: np.ndarray | None) -> None:
    with tqdm(total=len(job.plan), initial=len(job.plan) - len(todo), unit="tile", desc="tiled map",
              disable=not progress) as bar:
        runs = _run_client(job, todo, path, client, bar) if client is not None else _run_local(
            job, todo, path, bar)
        for t, values in runs:
            if result is not None:
                cells = tuple(slice(s, e) for s, e in zip(t.cell_start, t.cell_stop))
                result[(slice(None),) + cells] = values
