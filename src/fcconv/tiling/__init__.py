"""Dense maps of images larger than memory: exact tiles with a halo derived from the receptive field.

Needs the ``tiles`` extra (dask, distributed, zarr, tifffile), imported only when a map is made.

Example:
    >>> scores = fcconv.tiled_map(fcn, "slide.tif", tile=2048, out="scores.zarr")
"""

from fcconv.tiling._map import dask_map, plan_for, tiled_map
from fcconv.tiling._plan import Tile, TilePlan, field_of, plan_tiles
from fcconv.tiling._preview import winners, write_preview
from fcconv.tiling._store import open_map

__all__ = ["Tile", "TilePlan", "dask_map", "field_of", "open_map", "plan_for", "plan_tiles", "tiled_map",
           "winners", "write_preview"]
