"""Optional dependencies, imported when used, with the extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from fcconv.errors import FcconvError

__all__ = ["need_onnx", "need_tiles", "require"]


def require(name: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``name``, or say which extra of fcconv installs it.

    Args:
        name: the module, e.g. ``"zarr"`` or ``"onnxruntime"``.
        extra: the extra that installs it, e.g. ``"tiles"``.
        feature: what needs it, for the message, e.g. ``"Tiled maps"``.

    Raises:
        FcconvError: if it is not installed.

    Example:
        >>> require("math", extra="tiles", feature="Tiled maps").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        raise FcconvError(
            f"{feature} needs the package {name.split('.')[0]!r}, which is not installed. Install the extra: "
            f"pip install 'fcconv[{extra}]'."
        ) from None


def need_tiles(name: str) -> ModuleType:
    """:func:`require` for :mod:`fcconv.tiling` (dask, distributed, zarr, tifffile, filelock)."""
    return require(name, extra="tiles", feature="fcconv.tiling")


def need_onnx(name: str) -> ModuleType:
    """:func:`require` for :mod:`fcconv.onnx` (onnx, onnxruntime, onnxscript)."""
    return require(name, extra="onnx", feature="fcconv.onnx")
