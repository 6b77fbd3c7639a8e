"""Images read block by block: numpy arrays and memmaps, zarr arrays and stores, TIFF files, dask arrays.

A :class:`Source` is small and picklable (a path, or the array itself for in-memory ones): a task
on any worker reopens the file once per process and reads only the block it needs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import mmap
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fcconv._deps import need_tiles as require
from fcconv._shapes import format_shape
from fcconv.errors import FcconvError
from fcconv.tiling._axes import Layout, cap, check_dtype, resolve_axes, zarr_axes

__all__ = ["LAYOUTS", "Plane", "Source", "open_source"]

LAYOUTS = ("CHW", "HWC")
Plane = int | Mapping[str, int] | None
"""Which plane of a stack to read: an index along its one plane axis, or ``{axis: index}``."""
_TIFF = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".btf")


@dataclass(frozen=True)
class Source:
    """A (C, *spatial) image read block by block.

    Attributes:
        shape: ``(C, *spatial)``, whatever the stored layout.
        dtype: the stored dtype.
        identity: what identifies the pixels (path, level, size, modification time, or a hash).
    """

    kind: str  # "array", "zarr", "tiff" or "dask"
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: str  # "CHW", "HWC", or "HW" (no channel axis: one channel), once the planes are picked
    identity: str
    path: str | None = None
    level: int = 0
    data: Any = field(default=None, repr=False, compare=False)  # the array, for array and dask
    planes: tuple[tuple[int, int], ...] = ()  # (axis, index) of the stored axes fixed to one plane

    def __reduce_ex__(self, protocol: Any) -> Any:
        """A whole-file memmap travels as its file, reopened on arrival, never as its pixels."""
        data = self.data
        whole = isinstance(data, np.memmap) and isinstance(data.base, mmap.mmap)
        if whole and isinstance(data.filename, (str, os.PathLike)):
            order = "F" if data.flags.f_contiguous and not data.flags.c_contiguous else "C"
            bare = dataclasses.replace(self, data=None)
            return (_reopen, (bare, os.fspath(data.filename), data.dtype.str, data.offset, data.shape, order))
        return super().__reduce_ex__(protocol)

    def read(self, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
        """The block ``[start, stop)`` of the spatial dims, all channels, as ``(C, *block)``."""
        window = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
        array = self.data if self.path is None else _open(self.kind, self.path, self.level, self.identity)
        block = array[self._index(window)]
        if self.kind == "dask":
            block = block.compute(scheduler="sync")
        block = np.asarray(block)
        if self.layout == "HWC":
            block = np.moveaxis(block, -1, 0)
        elif self.layout == "HW":
            block = block[None]
        return block

    def thumbnail(self, step: int) -> np.ndarray:
        """Every ``step``-th pixel along each spatial dim, all channels, as ``(C, *small)``."""
        array = self.data if self.path is None else _open(self.kind, self.path, self.level, self.identity)
        every = tuple(slice(None, None, step) for _ in self.shape[1:])
        small = array[self._index(every)]
        small = np.asarray(small.compute(scheduler="sync") if self.kind == "dask" else small)
        if self.layout == "HWC":
            return np.moveaxis(small, -1, 0)
        return small[None] if self.layout == "HW" else small

    def _index(self, spatial: tuple[slice, ...]) -> tuple[Any, ...]:
        """The index of the stored array: ``spatial`` and every channel, on the chosen planes."""
        index: list[Any] = list({"CHW": (slice(None),) + spatial, "HWC": spatial + (slice(None),),
                                 "HW": spatial}[self.layout])
        for axis, plane in sorted(self.planes):
            index.insert(axis, plane)
        return tuple(index)


def _reopen(source: Source, filename: str, dtype: str, offset: int, shape: tuple[int, ...], order: Any
            ) -> Source:
    array = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape, order=order)
    return dataclasses.replace(source, data=array)


@functools.lru_cache(maxsize=8)
def _open(kind: str, path: str, level: int, stamp: str) -> Any:
    """The zarr array of a file, opened once per process (tasks on one worker share it).

    ``stamp`` (size and modification time) keys the cache too: a file rewritten is reopened.
    """
    zarr = require("zarr")
    if kind == "tiff":
        tifffile = require("tifffile")
        return zarr.open(tifffile.imread(path, aszarr=True, level=level), mode="r")
    node = zarr.open(path, mode="r")
    if hasattr(node, "shape"):
        return node
    return node[str(level)]


def _stat_identity(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _file_offset(view: np.memmap) -> int:
    """Where the first element of a memmap (or a view of one) lies in its file, in bytes."""
    mapped = getattr(view, "_mmap", None)
    if not isinstance(mapped, mmap.mmap):
        return int(getattr(view, "offset", 0))
    start = int(view.offset) - int(view.offset) % mmap.ALLOCATIONGRANULARITY  # where numpy mapped from
    base = np.frombuffer(mapped, dtype=np.uint8).__array_interface__["data"][0]
    return start + int(view.__array_interface__["data"][0]) - int(base)


def _listing_identity(root: Path) -> str:
    """A hash of every file under a zarr store with its size and modification time (stat only).

    A store rewritten in place, even one chunk, changes it; the pixels are never read.
    """
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            digest.update(f"{os.path.relpath(os.path.join(folder, name), root)}|{stat.st_size}|"
                          f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _hash_array(array: np.ndarray) -> str:
    digest = hashlib.sha256()
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, 1 << 26):
        digest.update(flat[start:start + (1 << 26)].tobytes())
    return digest.hexdigest()


def _tiff_levels(path: Path, level: int) -> None:
    tifffile = require("tifffile")
    try:
        with tifffile.TiffFile(path) as tif:
            levels = len(tif.series[0].levels) if tif.series else 0
    except (OSError, tifffile.TiffFileError) as error:
        raise FcconvError(f"Cannot read {str(path)!r} as a TIFF: {error}. Check the file.") from None
    if levels == 0:
        raise FcconvError(f"Cannot read {str(path)!r} as a TIFF: it holds no image. Check the file.")
    if not 0 <= level < levels:
        raise FcconvError(
            f"level {level} does not exist in {str(path)!r}: it has {levels} pyramid level(s), "
            f"0 to {levels - 1}. Pass level between 0 and {levels - 1}."
        )


def _from_path(path: Path, level: int) -> tuple[str, Any, str]:
    if not path.exists():
        raise FcconvError(f"Image {str(path)!r} not found. Check the path.")
    suffix = path.suffix.lower()
    if suffix in _TIFF and path.is_file():
        _tiff_levels(path, level)
        stamp = _stat_identity(path)
        return "tiff", _open("tiff", str(path), level, stamp), stamp
    if path.is_dir() and ((path / "zarr.json").is_file() or (path / ".zarray").is_file()
                          or (path / ".zgroup").is_file()):
        node = require("zarr").open(str(path), mode="r")
        if not hasattr(node, "shape"):
            names = sorted(node.array_keys())
            if str(level) not in names:
                raise FcconvError(
                    f"level {level} does not exist in the zarr group {str(path)!r}; its arrays are "
                    f"{', '.join(names) or 'none'}. Pass level= one of them (a pyramid's '0', '1', ...).")
        elif level:
            raise FcconvError(f"level {level} needs a zarr group of levels '0', '1', ...; {str(path)!r} "
                              "is one array. Pass level=0.")
        stamp = f"{path.resolve()}|{_listing_identity(path)}"
        return "zarr", _open("zarr", str(path), level, stamp), stamp
    raise FcconvError(
        f"Cannot read {str(path)!r}: unknown image type. Give a TIFF file ({', '.join(_TIFF)}), a "
        "zarr store (a directory with zarr.json), a numpy array or a dask array."
    )


def open_source(image: Any, *, layout: str | None = None, level: int = 0, ndim: int, channels: int,
                plane: Plane = None, mpp: float | None = None, magnification: float | None = None) -> Source:
    """Wrap ``image`` as a :class:`Source`, checking its dtype, rank, axes, channels and layout.

    Args:
        image: a numpy array or memmap, a zarr array or a path to one, a TIFF path, or a dask array.
        layout: ``None`` for the file's axes (a TIFF's, a zarr array's dimension names), else
            ``"CHW"``; ``"CHW"`` or ``"HWC"`` to say it, checked against the file's axes.
        level: the pyramid level of a TIFF or of a zarr group of levels.
        ndim, channels: the model's spatial dims and input channels.
        plane: for a stack (a z-stack, a time series: axes beyond the channels and spatial ones),
            the plane to read: an index along its one stack axis, or ``{axis: index}``.
        mpp, magnification: for slides, the resolution to read.

    Slides (``TiffSlide``/``OpenSlide`` objects, paths with ``mpp``/``magnification``) are read
    by :mod:`fcconv.tiling._slide`, always as RGB channels last (``layout`` does not apply).

    Raises:
        FcconvError: on an unknown type or file, a missing level, pixels that are not real numbers,
            a stack without ``plane``, or a shape that does not hold ``channels`` channels.
    """
    if layout is not None and layout not in LAYOUTS:
        raise FcconvError(
            f"layout must be one of {', '.join(LAYOUTS)} or None (from the file); got {layout!r}.")
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise FcconvError(f"level must be an int >= 0; got {level!r}.")
    from fcconv.tiling import _slide  # slides: their own reader (hook of issue 17)

    if _slide.is_slide(image, mpp, magnification):
        return _slide.slide_source(image, level=level, mpp=mpp, magnification=magnification,
                                   channels=channels)
    if mpp is not None or magnification is not None:
        raise FcconvError(f"mpp and magnification apply to slides; this image is a {type(image).__name__}. "
                          "Pass level= instead, or the slide's path or TiffSlide/OpenSlide object.")
    path: str | None = None
    if isinstance(image, (str, os.PathLike)):
        kind, array, identity = _from_path(Path(image).expanduser(), level)
        path = str(Path(image).expanduser().resolve())
        axes = _tiff_axes(Path(path), level) if kind == "tiff" else zarr_axes(array)
        where = f"the image {str(image)!r}"
    else:
        if level:
            raise FcconvError(f"level {level} applies to TIFF and zarr pyramids; this image is a "
                              f"{type(image).__name__}. Pass level=0.")
        check_dtype(getattr(image, "dtype", None))
        kind, array, identity = _from_object(image)
        axes = zarr_axes(array) if type(array).__module__.startswith("zarr") else None
        where = "the image"
    check_dtype(array.dtype)
    shape = tuple(int(s) for s in array.shape)
    if axes is not None:
        found = resolve_axes(axes, shape, layout=layout, plane=plane, ndim=ndim, where=where)
    else:
        found = _unnamed_layout(shape, layout, plane, ndim, channels)
    kept = [s for i, s in enumerate(shape) if i not in dict(found.planes)]
    stored = found.stored
    per_sample = (kept[0], *kept[1:]) if stored == "CHW" else (
        (kept[-1], *kept[:-1]) if stored == "HWC" else (1, *kept))
    _check_channels(per_sample[0], channels, shape, axes, stored, where)
    planes = "".join(f"|{axes[a] if axes else a}={i}" for a, i in found.planes)
    return Source(kind, tuple(per_sample), np.dtype(array.dtype), stored,
                  f"{kind}|{identity}|{stored}|{level}{planes}", path=path, level=level,
                  data=array if path is None else None, planes=found.planes)


def _tiff_axes(path: Path, level: int) -> str | None:
    """The axes tifffile reads in the TIFF's first series at ``level`` (``YXS``, ``CYX``, ``ZYX``...)."""
    tifffile = require("tifffile")
    with tifffile.TiffFile(path) as tif:
        axes = tif.series[0].levels[level].axes
    return str(axes) if axes else None


def _unnamed_layout(shape: tuple[int, ...], layout: str | None, plane: Plane, ndim: int, channels: int
                    ) -> Layout:
    """The layout of an array that does not name its axes: ``layout``, else channels first."""
    if plane is not None:
        raise FcconvError(
            "plane picks a plane of a file that states its axes (a TIFF, a zarr array with dimension "
            "names); this image does not name its axes. Index it yourself (image[k]) and drop plane.")
    stored = (layout or "CHW") if len(shape) == ndim + 1 else "HW" if len(shape) == ndim else None
    if stored is None:
        raise FcconvError(
            f"The image has shape {format_shape(shape)}; the model needs {ndim} spatial dim(s) and "
            f"{channels} channel(s): ({channels}, *spatial) with layout='CHW', (*spatial, {channels}) "
            "with layout='HWC', or (*spatial) for one channel."
        )
    return Layout(stored)


def _check_channels(found: int, channels: int, shape: tuple[int, ...], axes: str | None, stored: str,
                    where: str) -> None:
    if found == channels:
        return
    if axes is None:
        other = "HWC" if stored == "CHW" else "CHW"
        raise FcconvError(
            f"{cap(where)} {format_shape(shape)} read as {stored} has {found} channel(s); the model "
            f"takes {channels}. Check the image, or pass layout='{other}' if channels come "
            f"{'last' if other == 'HWC' else 'first'}."
        )
    if stored == "HW":
        raise FcconvError(
            f"{cap(where)} is grayscale (axes {axes}: one channel); the model takes {channels} "
            "channels. Give an image with that many channels, or a model of one channel.")
    if found == 4 and channels == 3 and "S" in axes:
        raise FcconvError(
            f"{cap(where)} has 4 samples per pixel (axes {axes}: RGB and alpha); the model takes 3. "
            "fcconv does not drop the alpha channel silently: write an RGB copy of the image "
            "without alpha first (e.g. with tifffile: imwrite(out, imread(image)[..., :3])).")
    raise FcconvError(
            f"{cap(where)} has {found} channels (axes {axes}, shape {format_shape(shape)}); the "
            f"model takes {channels}. Check the image or the model.")


def _from_object(image: Any) -> tuple[str, Any, str]:
    if isinstance(image, np.memmap) and isinstance(image.filename, (str, os.PathLike)):
        return "array", image, (f"memmap|{_stat_identity(Path(image.filename))}|{_file_offset(image)}"
                                f"|{image.shape}|{image.strides}|{image.dtype}")
    if isinstance(image, np.ndarray):
        return "array", image, f"sha256|{_hash_array(image)}|{image.shape}|{image.dtype}"
    module = type(image).__module__.split(".")[0]
    if module == "dask":
        return "dask", image, f"dask|{image.name}"
    if module == "zarr" and hasattr(image, "shape"):
        root = getattr(getattr(image.store_path, "store", None), "root", None)
        files = _listing_identity(Path(root) / str(image.path)) if root is not None else "in-memory"
        return "array", image, f"zarr|{image.store_path}|{image.shape}|{image.dtype}|{files}"
    if module == "torch":
        raise FcconvError("image is a torch tensor; pass image.numpy() (CPU) or a path to the file.")
    raise FcconvError(
        f"Cannot read an image of type {type(image).__name__}. Give a numpy array or memmap, a zarr "
        "array or a path to one, a TIFF path or a dask array."
    )
