"""Whole-slide images read through tiffslide or OpenSlide, at the level a resolution asks for.

A slide (a ``TiffSlide`` or ``OpenSlide`` object, or the path of a file they read) becomes a
:class:`~fcconv.tiling._source.Source` of kind ``"slide"`` whose pixels are one level of the slide,
or, when ``mpp=`` / ``magnification=`` falls between levels, that level resampled by **area
averaging**: image pixel ``i`` is the mean of the level's pixels over ``[i*f, (i+1)*f)``, each
weighted by its overlap (``f`` the asked over the level's pixel size), rounded to the slide's
integers. Every pixel depends on its own footprint only, so a block reads the same pixels as the
whole resampled image, and a tiled map of it is exact.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fcconv._deps import require
from fcconv.errors import FcconvError

__all__ = ["SlideLevel", "is_slide", "slide_geometry", "slide_source"]

# Formats OpenSlide reads and tifffile does not: such paths always go through the slide readers.
SLIDE_ONLY = (".mrxs", ".vms", ".vmu", ".bif", ".svslide", ".dcm")
TOLERANCE = 0.01  # a level within 1% of the asked resolution is used as it is (slides state 4.0004x)
_BACKENDS = ("tiffslide", "openslide")


def is_slide(image: Any, mpp: float | None, magnification: float | None) -> bool:
    """True for slide objects, for paths with ``mpp``/``magnification``, and for OpenSlide-only formats."""
    if type(image).__module__.split(".")[0] in _BACKENDS:
        return True
    if isinstance(image, (str, os.PathLike)):
        return mpp is not None or magnification is not None or Path(image).suffix.lower() in SLIDE_ONLY
    return False


@functools.lru_cache(maxsize=8)
def _open_path(backend: str, path: str, stamp: str) -> Any:
    """The slide object of a file, opened once per process (``stamp`` reopens a rewritten file)."""
    if backend == "tiffslide":
        return require("tiffslide", extra="slides", feature="Slides").TiffSlide(path)
    return require("openslide", extra="slides", feature="Slides").OpenSlide(path)


def _stamp(path: str) -> str:
    stat = Path(path).stat()
    return f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _path_of(slide: Any) -> str | None:
    """The file behind a slide object, so that workers reopen it instead of receiving it."""
    name = getattr(slide, "_filename", None)  # OpenSlide
    if name is None:
        handle = getattr(getattr(slide, "_tifffile", None), "filehandle", None)  # TiffSlide
        name = getattr(handle, "path", None)
    return str(name) if name is not None and Path(str(name)).is_file() else None


def _open_any(path: Path) -> tuple[str, Any]:
    errors = []
    for backend in _BACKENDS:
        try:
            return backend, _open_path(backend, str(path.resolve()), _stamp(str(path)))
        except Exception as error:  # each reader raises its own types for files it cannot read
            errors.append(f"{backend}: {error}")
    raise FcconvError(f"Cannot read {str(path)!r} as a slide ({'; '.join(errors)}). Check the file, or "
                      "install the slides extra: pip install 'fcconv[slides]'.")


def _number(properties: Any, backend: str, name: str) -> float | None:
    value = properties.get(f"{backend}.{name}")
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class SlideLevel:
    """One level of a slide (resampled by ``factor``), sliced like an ``(H, W, 3)`` array.

    Attributes:
        backend: ``"tiffslide"`` or ``"openslide"``.
        path: the slide's file (``None`` when only the object is known: then it is not picklable).
        level: the slide level read.
        level_downsample: level-0 pixels per pixel of that level.
        factor: level pixels per image pixel (1.0: the level as it is).
        shape: ``(H, W, 3)`` of the image read.
        mpp: level-0 micrometres per pixel ``(y, x)``, or ``None`` when the slide does not say.
    """

    backend: str
    path: str | None
    level: int
    level_downsample: float
    level_shape: tuple[int, int]
    factor: float
    shape: tuple[int, int, int]
    mpp: tuple[float, float] | None
    objective: float | None
    slide: Any = field(default=None, repr=False, compare=False)
    dtype: np.dtype = field(default=np.dtype(np.uint8), repr=False)

    def __reduce__(self) -> Any:
        if self.path is None:
            return super().__reduce__()
        values = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "slide"}
        return (_rebuild, (values,))

    def _slide(self) -> Any:
        if self.path is None:
            return self.slide
        return _open_path(self.backend, self.path, _stamp(self.path))

    def read_level(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows ``[y0, y1)`` and columns ``[x0, x1)`` of the level itself, ``(h, w, 3)`` uint8."""
        slide = self._slide()
        if self.backend == "tiffslide":
            return np.asarray(slide.zarr_group[str(self.level)][y0:y1, x0:x1])[..., :3]
        location = (round(x0 * self.level_downsample), round(y0 * self.level_downsample))
        region = slide.read_region(location, self.level, (x1 - x0, y1 - y0))
        return np.asarray(region)[..., :3]  # OpenSlide gives RGBA

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        ys, xs = index[0].indices(self.shape[0]), index[1].indices(self.shape[1])
        if ys[2] > 1 or xs[2] > 1:
            return self._thumbnail(ys, xs)[..., index[2]]
        if self.factor == 1.0:
            return self.read_level(ys[0], ys[1], xs[0], xs[1])[..., index[2]]
        return _area_block(self, ys[0], ys[1], xs[0], xs[1])[..., index[2]]

    def _thumbnail(self, ys: tuple[int, int, int], xs: tuple[int, int, int]) -> np.ndarray:
        """Every step-th pixel, read from the coarsest level fine enough (for pictures only)."""
        slide = self._slide()
        step = min(ys[2], xs[2]) * self.factor * self.level_downsample
        downsamples = list(slide.level_downsamples)
        level = max((i for i, d in enumerate(downsamples) if d <= step * (1 + TOLERANCE)),
                    key=lambda i: downsamples[i], default=0)
        rows = np.arange(*ys) * self.factor * self.level_downsample / downsamples[level]
        cols = np.arange(*xs) * self.factor * self.level_downsample / downsamples[level]
        height, width = (int(v) for v in reversed(slide.level_dimensions[level]))
        low = SlideLevel(self.backend, self.path, level, float(downsamples[level]), (height, width), 1.0,
                         (height, width, 3), self.mpp, self.objective, self.slide)
        pixels = low.read_level(0, height, 0, width)
        return pixels[np.minimum(rows.astype(int), height - 1)][:, np.minimum(cols.astype(int), width - 1)]


def _rebuild(values: dict[str, Any]) -> SlideLevel:
    return SlideLevel(**values)


def _area_weights(start: int, stop: int, factor: float, size: int) -> tuple[int, np.ndarray, np.ndarray]:
    """For image pixels ``[start, stop)``: the first level pixel read, the level pixels and weights.

    Returns ``(first, index, weight)`` with ``index, weight`` of shape ``(n, taps)``: image pixel
    ``i`` is ``sum_t weight[i, t] * level[index[i, t]]``, from absolute coordinates, so any block
    gives the same weights as the whole image.
    """
    taps = math.ceil(factor) + 1
    pixels = np.arange(start, stop, dtype=np.float64)
    low, high = pixels * factor, (pixels + 1) * factor
    first = np.floor(low).astype(np.int64)
    index = first[:, None] + np.arange(taps)[None, :]
    overlap = np.minimum(high[:, None], index + 1.0) - np.maximum(low[:, None], index.astype(np.float64))
    weight = np.clip(overlap, 0.0, None) / factor
    weight[index >= size] = 0.0
    return int(first[0]) if len(first) else 0, np.minimum(index, size - 1), weight


def _area_block(level: SlideLevel, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Image pixels ``[y0, y1) x [x0, x1)`` of the resampled level (see the module)."""
    first_y, index_y, weight_y = _area_weights(y0, y1, level.factor, level.level_shape[0])
    first_x, index_x, weight_x = _area_weights(x0, x1, level.factor, level.level_shape[1])
    block = level.read_level(first_y, int(index_y.max()) + 1, first_x, int(index_x.max()) + 1)
    block = block.astype(np.float64)
    rows = np.zeros((y1 - y0, block.shape[1], block.shape[2]))
    for t in range(index_y.shape[1]):  # a fixed order of sums: the same bits in any block
        rows += weight_y[:, t, None, None] * block[index_y[:, t] - first_y]
    out = np.zeros((y1 - y0, x1 - x0, block.shape[2]))
    for t in range(index_x.shape[1]):
        out += weight_x[None, :, t, None] * rows[:, index_x[:, t] - first_x]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _pick(downsamples: Sequence[float], wanted: float, what: str) -> tuple[int, float]:
    """The coarsest level at least as fine as ``wanted`` (a level-0 downsample) and the factor left."""
    fine = [i for i, d in enumerate(downsamples) if d <= wanted * (1 + TOLERANCE)]
    if not fine:
        raise FcconvError(f"{what} is finer than the slide's level 0; fcconv does not upsample. Ask for a "
                          "coarser resolution.")
    level = max(fine, key=lambda i: downsamples[i])
    factor = wanted / downsamples[level]
    return level, 1.0 if abs(factor - 1.0) <= TOLERANCE else factor


def _choose(slide: Any, backend: str, level: int, mpp: float | None, magnification: float | None
            ) -> tuple[int, float, tuple[float, float] | None, float | None]:
    properties = slide.properties
    mpp_x, mpp_y = _number(properties, backend, "mpp-x"), _number(properties, backend, "mpp-y")
    mpp_x, mpp_y = mpp_x or mpp_y, mpp_y or mpp_x  # one stated: square pixels
    base = None if mpp_x is None or mpp_y is None else (mpp_y, mpp_x)
    objective = _number(properties, backend, "objective-power")
    downsamples = [float(d) for d in slide.level_downsamples]
    if mpp is not None and magnification is not None:
        raise FcconvError("Give mpp or magnification, not both.")
    if (mpp is not None or magnification is not None) and level:
        raise FcconvError(f"Give level or mpp/magnification, not both; got level={level}.")
    if mpp is not None:
        if not isinstance(mpp, (int, float)) or mpp <= 0:
            raise FcconvError(f"mpp must be a positive number of micrometres per pixel; got {mpp!r}.")
        if base is None:
            raise FcconvError("mpp needs the slide's pixel size, and this slide does not state one. Pass "
                              "level= (or magnification= if it states an objective power).")
        level, factor = _pick(downsamples, mpp / max(base), f"mpp {mpp} (level 0: {max(base)} mpp)")
        return level, factor, base, objective
    if magnification is not None:
        if not isinstance(magnification, (int, float)) or magnification <= 0:
            raise FcconvError(f"magnification must be a positive number (e.g. 20); got {magnification!r}.")
        if objective is None:
            raise FcconvError("magnification needs the slide's objective power, and this slide does not "
                              "state one. Pass level= (or mpp= if it states a pixel size).")
        level, factor = _pick(downsamples, objective / magnification,
                              f"magnification {magnification}x (level 0: {objective}x)")
        return level, factor, base, objective
    if not 0 <= level < len(downsamples):
        raise FcconvError(f"level {level} does not exist in this slide: it has {len(downsamples)} "
                          f"level(s), 0 to {len(downsamples) - 1}. Pass level between them.")
    return level, 1.0, base, objective


def slide_level(image: Any, *, level: int = 0, mpp: float | None = None,
                magnification: float | None = None) -> SlideLevel:
    """The :class:`SlideLevel` of a slide object or path at ``level``, ``mpp`` or ``magnification``."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.exists():
            raise FcconvError(f"Image {str(path)!r} not found. Check the path.")
        backend, slide = _open_any(path)
        name: str | None = str(path.resolve())
    else:
        backend, slide = type(image).__module__.split(".")[0], image
        name = _path_of(image)
    level, factor, base, objective = _choose(slide, backend, level, mpp, magnification)
    width, height = (int(v) for v in slide.level_dimensions[level])
    shape = (math.floor(height / factor), math.floor(width / factor), 3)
    return SlideLevel(backend, name, level, float(slide.level_downsamples[level]), (height, width), factor,
                      shape, base, objective, None if name is not None else slide)


def slide_source(image: Any, *, level: int, mpp: float | None, magnification: float | None,
                 channels: int) -> Any:
    """A ``Source`` (kind ``"slide"``, RGB channels last) reading a slide through :class:`SlideLevel`."""
    from fcconv.tiling._source import Source

    reader = slide_level(image, level=level, mpp=mpp, magnification=magnification)
    if channels != 3:
        raise FcconvError(f"Slides are read as RGB (3 channels); the model takes {channels}. Use a model "
                          "for RGB images.")
    where = _stamp(reader.path) if reader.path is not None else f"object{id(reader.slide)}"
    identity = (f"slide|{reader.backend}|{where}|level{reader.level}|factor{reader.factor!r}")
    height, width, _ = reader.shape
    return Source("slide", (3, height, width), reader.dtype, "HWC", identity, level=reader.level,
                  data=reader)


def slide_geometry(source: Any) -> dict[str, Any] | None:
    """The contract's geometry fields a slide knows (level, downsample, mpp) and how it was resampled."""
    reader = getattr(source, "data", None)
    if not isinstance(reader, SlideLevel):
        return None
    downsample = reader.level_downsample * reader.factor
    return {
        "level": reader.level,
        "downsample": downsample,
        "mpp": None if reader.mpp is None else [m * downsample for m in reader.mpp],
        "resampling": "none" if reader.factor == 1.0 else "area",
        "level_downsample": reader.level_downsample,
        "factor": reader.factor,
        "reader": reader.backend,
        "objective_power": reader.objective,
    }
