"""The optional dependencies of tiling, imported when used, with the extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from fcconv.errors import FcconvError

__all__ = ["require"]


def require(name: str) -> ModuleType:
    """Import ``name`` (dask, distributed, zarr or tifffile), or say how to install it.

    Raises:
        FcconvError: if it is not installed.
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        raise FcconvError(
            f"Tiled maps need {name.split('.')[0]}, which is not installed. Install the extra: "
            "pip install 'fcconv[tiles]'."
        ) from None
