"""``fcconv heatmap MODEL slide.tif -o scores.zarr``: the map of a large image, tile by tile, resumable.

``fcconv heatmap`` hands over to :func:`run` when ``-o`` names a ``.zarr`` store: the image (a TIFF,
possibly a whole-slide pyramid, or a zarr store) is read block by block, the map is written chunk by
chunk with :func:`fcconv.tiled_map`, and ``--preview`` draws a small PNG of it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import click
import torch
from torch import Tensor

from fcconv.cli._app import OutputPath, fail, step
from fcconv.errors import FcconvError

__all__ = ["MapOutput", "PixelScale", "is_map_output", "run"]


def is_map_output(path: Path) -> bool:
    """True when ``-o`` asks for a zarr map rather than a picture."""
    return path.suffix.lower() == ".zarr"


class MapOutput(OutputPath):
    """An output picture, or a ``.zarr`` map, which may already exist (a run to resume)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        path = Path(os.fsdecode(value)).expanduser()
        if is_map_output(path) and path.is_dir():
            return path
        return super().convert(value, param, ctx)


class PixelScale:
    """Pixels to model inputs: ``(x * scale - mean) / std`` per channel, in the model's dtype.

    A plain class with a stable repr, so that a rerun recognises the same transform and resumes.
    """

    def __init__(self, scale: float, mean: Sequence[float] | None, std: Sequence[float] | None,
                 dtype: torch.dtype) -> None:
        self.scale, self.mean, self.std, self.dtype = scale, mean, std, dtype

    def __repr__(self) -> str:
        return f"PixelScale({self.scale!r}, {self.mean!r}, {self.std!r}, {self.dtype})"

    def __dask_tokenize__(self) -> str:
        return repr(self)

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype) * self.scale
        view = (1, -1) + (1,) * (x.dim() - 2)
        if self.mean is not None:
            x = x - torch.tensor(self.mean, dtype=self.dtype).view(view)
        if self.std is not None:
            x = x / torch.tensor(self.std, dtype=self.dtype).view(view)
        return x


def _layout(fcn: Any, image: Path, level: int) -> str:
    """``"HWC"`` for images stored channels last (RGB TIFFs), else ``"CHW"``."""
    from fcconv.tiling import plan_for

    try:
        plan_for(fcn, image, tile=10**9, layout="CHW", level=level, method="tiles")
        return "CHW"
    except FcconvError as error:
        if "layout='HWC'" not in str(error):
            raise
    return "HWC"


def _pixel_scale(dtype: Any) -> float:
    import numpy as np

    kind = np.dtype(dtype)
    return 1.0 / float(np.iinfo(kind).max) if kind.kind in "ui" else 1.0


def _client(workers: int | None, scheduler: str | None) -> Any:
    if workers is None and scheduler is None:
        return None
    from fcconv._deps import need_tiles as require

    distributed = require("distributed")
    if scheduler is not None:
        return distributed.Client(scheduler)
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None)
    return distributed.Client(cluster)


def _describe(plan: Any, layout: str, level: int) -> str:
    """One line: the image, the map, the method and its recompute factor."""
    size = (f"Image {plan.image[1]}x{plan.image[0]} ({layout}, level {level}): a "
            f"{plan.grid[0]}x{plan.grid[1]} map")
    factor = f"recompute factor {plan.recompute_factor():.2f}"
    if plan.method == "stream":
        strips = len(plan.strips)
        return (f"{size} streamed by rows in {strips} strip{'s' * (strips > 1)} of at most "
                f"{plan.tile[-1]} px wide, {factor}, row buffers about {plan.peak_bytes / 2**20:.0f} MiB "
                "per task.")
    return f"{size} in {len(plan)} halo tiles of at most {max(plan.tile)} px, {factor}."


def run(fcn: Any, image: Path, output: Path, *, tile: int | None, level: int, mean: Sequence[float] | None,
        std: Sequence[float] | None, preview: Path | None, labels: Sequence[str], hidden: Collection[int],
        workers: int | None, scheduler: str | None, overwrite: bool, quiet: bool, method: str = "auto",
        force: bool = False) -> None:
    """Write the map of ``fcn`` over ``image`` to the zarr store ``output``, resuming a killed run."""
    from fcconv.tiling import plan_for, tiled_map, write_preview
    from fcconv.tiling._source import open_source

    if workers is not None and scheduler is not None:
        raise click.UsageError("Give --workers (a local cluster) or --scheduler (a running one), not both.")
    if not image.exists():
        fail(f"Image {str(image)!r} not found. Check the path.")
    layout = _layout(fcn, image, level)
    stored = open_source(image, layout=layout, level=level, ndim=2, channels=fcn.input_shape[0]).dtype
    dtype = next(iter(fcn.parameters())).dtype
    transform = PixelScale(_pixel_scale(stored), mean, std, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reason is printed below
        plan = plan_for(fcn, image, tile=tile, layout=layout, level=level, method=method, force=force)
    if plan.reason is not None:
        click.echo(f"Streaming is not possible ({plan.reason}); using halo tiles.", err=True)
    if not quiet:
        click.echo(_describe(plan, layout, level))
    client = _client(workers, scheduler)
    try:
        scores = tiled_map(fcn, image, tile=tile, out=output, layout=layout, transform=transform, level=level,
                           client=client, overwrite=overwrite, progress=not quiet, method=plan.method,
                           force=force)
    except KeyboardInterrupt:
        fail(f"Interrupted. The finished tiles are kept in {str(output)!r}: run the same command again to "
             "resume.")
    finally:
        if client is not None:
            cluster = client.cluster if workers is not None else None
            client.close()
            if cluster is not None:
                cluster.close()
    click.echo(f"Wrote {output} ({scores.shape[0]} classes x {scores.shape[1]}x{scores.shape[2]} cells)")
    if preview is not None:
        with step(f"Drawing {preview}", quiet=quiet):
            write_preview(scores, image, preview, fcn=fcn, layout=layout, level=level, labels=labels,
                          hide=hidden)
        click.echo(f"Wrote {preview}")
