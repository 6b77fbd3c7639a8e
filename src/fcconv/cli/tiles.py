"""``fcconv heatmap MODEL slide.tif -o scores.zarr``: the map of a large image, tile by tile, resumable.

``fcconv heatmap`` hands over to :func:`run` when ``-o`` names a ``.zarr`` store: the image (a TIFF,
possibly a whole-slide pyramid, or a zarr store) is read block by block, the map is written chunk by
chunk with :func:`fcconv.tiled_map`, and ``--preview`` draws a small PNG of it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import warnings
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import torch
from torch import Tensor

from fcconv._io import check_output_store
from fcconv.cli._app import OutputPath, fail, step
from fcconv.errors import FcconvError

__all__ = ["MapOutput", "PixelScale", "is_map_output", "parse_plane", "run"]


def is_map_output(path: Path) -> bool:
    """True when ``-o`` asks for a zarr map rather than a picture."""
    return path.suffix.lower() == ".zarr"


class MapOutput(OutputPath):
    """An output picture, or a ``.zarr`` map, which may already exist (a run to resume)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        path = Path(os.fsdecode(value)).expanduser()
        if not is_map_output(path):
            return super().convert(value, param, ctx)
        try:
            return check_output_store(path, what=self.what)
        except FcconvError as error:
            self.fail(str(error), param, ctx)


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


def parse_plane(text: str | None) -> Any:
    """``--plane 3`` -> ``3``; ``--plane T=0,Z=3`` -> ``{"T": 0, "Z": 3}``; None stays None."""
    if text is None:
        return None
    try:
        if "=" not in text:
            return int(text)
        pairs = (part.split("=") for part in text.replace(" ", "").split(",") if part)
        return {axis.upper(): int(index) for axis, index in pairs}
    except ValueError:
        raise click.BadParameter(f"expected an index such as 2, or AXIS=INDEX pairs such as T=0,Z=2; "
                                 f"got {text!r}.", param_hint="--plane") from None


@contextlib.contextmanager
def _log_to_stderr() -> Iterator[None]:
    """Print the tiling's one-line notes (a damaged chunk recomputed) on stderr, as they come."""
    import logging

    logger = logging.getLogger("fcconv.tiling")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


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


class Stopped(BaseException):
    """A signal (SIGTERM) that stops the run as Ctrl-C does."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """While the map runs, SIGTERM (what batch schedulers send) raises :class:`Stopped` as Ctrl-C would."""

    def stop(signum: int, frame: Any) -> None:
        raise Stopped("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: signals cannot be caught here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(output: Path, name: str, code: int) -> None:
    """Say how much of the map is on disk and how to resume, then exit with ``code``."""
    from fcconv.tiling._store import stored_progress

    try:
        done, total = stored_progress(output)
        kept = f"{done} of {total} tiles are on disk in {str(output)!r}"
    except Exception:  # noqa: BLE001 - stopped before the store existed
        kept = f"nothing was kept in {str(output)!r}"
    click.echo(f"Stopped by {name}: {kept}; run the same command to resume.", err=True)
    raise click.exceptions.Exit(code)


def _describe(plan: Any, where: str) -> str:
    """One line: the image, the map, the method and its recompute factor."""
    size = f"Image {plan.image[1]}x{plan.image[0]} ({where}): a {plan.grid[0]}x{plan.grid[1]} map"
    factor = f"recompute factor {plan.recompute_factor():.2f}"
    if plan.method == "stream":
        strips = len(plan.strips)
        return (f"{size} streamed by rows in {strips} strip{'s' * (strips > 1)} of at most "
                f"{plan.tile[-1]} px wide, {factor}, row buffers about {plan.peak_bytes / 2**20:.0f} MiB "
                "per task.")
    return f"{size} in {len(plan)} halo tiles of at most {max(plan.tile)} px, {factor}."


def run(fcn: Any, image: Path, output: Path, *, tile: int | None, level: int, mean: Sequence[float] | None,
        std: Sequence[float] | None, preview: Path | None, labels: Sequence[str], hidden: Collection[int],
        workers: int | None, scheduler: str | None, overwrite: bool, quiet: bool, layout: str | None = None,
        plane: Any = None, wait: bool = False, mpp: float | None = None, magnification: float | None = None,
        mask: str | None = None, score_kind: str = "logits", show_class: str | None = None,
        class_names: Sequence[str] | None = None, prefetch: bool = False, model_dtype: str | None = None,
        method: str = "auto", force: bool = False) -> None:
    """Write the map of ``fcn`` over ``image`` to the zarr store ``output``, resuming a killed run.

    ``mpp``, ``magnification``, ``mask``, ``class_names``, ``method``, ``force``: as for
    :func:`fcconv.tiled_map`; ``score_kind``: its ``scores``; ``show_class``: the class the preview
    draws; ``prefetch``: read ahead (local runs); ``model_dtype``: the dtype the model runs in.
    """
    from fcconv.tiling import plan_for, tiled_map, write_preview
    from fcconv.tiling._source import open_source

    if workers is not None and scheduler is not None:
        raise click.UsageError("Give --workers (a local cluster) or --scheduler (a running one), not both.")
    if not image.exists():
        fail(f"Image {str(image)!r} not found. Check the path.")
    if model_dtype is not None:  # the model was loaded by the command: converting it changes no user's module
        fcn = fcn.to(getattr(torch, model_dtype))
    resolution: dict[str, Any] = {"mpp": mpp, "magnification": magnification}
    source = open_source(image, layout=layout, level=level, ndim=2, channels=fcn.input_shape[0], plane=plane,
                         **resolution)
    dtype = next(iter(fcn.parameters())).dtype
    transform = PixelScale(_pixel_scale(source.dtype), mean, std, dtype)
    if mask is not None and method == "auto":  # as tiled_map: a mask skips whole halo tiles
        method = "tiles"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reason is printed below
        plan = plan_for(fcn, image, tile=tile, layout=layout, level=level, plane=plane, method=method,
                        force=force, **resolution)
    if plan.reason is not None:
        click.echo(f"Streaming is not possible ({plan.reason}); using halo tiles.", err=True)
    if not quiet:
        factor = float(getattr(source.data, "factor", 1.0) or 1.0)
        where = (f"{source.layout}, level {source.level}"
                 + (f", resampled x{factor:g}" if factor != 1.0 else "")
                 + "".join(f", plane {i}" for _, i in source.planes))
        click.echo(_describe(plan, where))
    client = _client(workers, scheduler)
    try:
        with _sigterm_stops(), _log_to_stderr():
            scores = tiled_map(fcn, image, tile=tile, out=output, layout=layout, transform=transform,
                               level=level, client=client, overwrite=overwrite, wait=wait, progress=not quiet,
                               plane=plane, mask=mask, scores=score_kind, class_names=class_names,
                               prefetch=prefetch, method=plan.method, force=force, **resolution)
    except Stopped as stop:
        _stopped(output, stop.name, 128 + signal.SIGTERM)
    except KeyboardInterrupt:
        _stopped(output, "Ctrl-C (SIGINT)", 128 + signal.SIGINT)
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
                          hide=hidden, plane=plane, show_class=show_class,
                          probabilities=score_kind == "probabilities", mpp=mpp, magnification=magnification)
        click.echo(f"Wrote {preview}")
