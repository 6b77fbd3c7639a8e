"""What one task does: read its block, run the model on it, keep its cells (and write its chunk)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from fcconv._shapes import format_shape, module_dtype_device
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.tiling._plan import Tile
from fcconv.tiling._source import Source
from fcconv.tiling._store import write_chunk

__all__ = ["compute_tile", "model_identity", "model_placement", "tile_to_zarr"]

Transform = Callable[[Tensor], Tensor]


def model_placement(fcn: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model (float32 on the CPU for a model without floating tensors)."""
    dtype, device = module_dtype_device(fcn)
    return dtype or torch.float32, device or torch.device("cpu")


def model_identity(fcn: nn.Module) -> str:
    """A hash of the model's class, geometry and every parameter and buffer, bit for bit."""
    digest = hashlib.sha256(type(fcn).__qualname__.encode())
    geometry = getattr(fcn, "geometry", None)
    if callable(geometry):
        digest.update(repr(sorted(geometry().items())).encode())
    for name, value in sorted(fcn.state_dict().items()):
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def compute_tile(fcn: nn.Module, source: Source, tile: Tile, transform: Transform | None) -> np.ndarray:
    """The map's cells ``[tile.cell_start, tile.cell_stop)`` computed from the tile's block alone.

    Returns:
        ``(classes, *tile.cells)`` in the model's dtype.
    """
    block = source.read(tile.read_start, tile.read_stop)
    if not block.flags.writeable:
        block = block.copy()  # torch wants writable memory
    x = torch.from_numpy(np.ascontiguousarray(block)).unsqueeze(0)
    dtype, device = model_placement(fcn)
    with torch.inference_mode():
        x = transform(x) if transform is not None else x.to(dtype)
        if not isinstance(x, Tensor) or tuple(x.shape) != (1, *block.shape):
            got = format_shape(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise FcconvError(
                f"transform must return a tensor of the block's shape {format_shape((1, *block.shape))} "
                f"(a per-pixel function); it returned {got}."
            )
        scores = fcn(x.to(device=device))[0]
    keep = tuple(slice(f, f + n) for f, n in zip(tile.first, tile.cells))
    if any(k.stop > s for k, s in zip(keep, scores.shape[1:])):
        raise NotEquivalentError(
            f"The block {tile.read_start}..{tile.read_stop} gave a map of {format_shape(scores.shape[1:])} "
            f"cells, fewer than the {keep} it should hold; this is a bug in fcconv, please report it."
        )
    kept = scores[(slice(None),) + keep].cpu()
    return (kept.float() if kept.dtype == torch.bfloat16 else kept).numpy()


def tile_to_zarr(fcn: nn.Module, source: Source, tile: Tile, transform: Transform | None, out: str) -> int:
    """Compute one tile and write it as one chunk of the zarr map at ``out``; returns its cell count."""
    values = compute_tile(fcn, source, tile, transform)
    write_chunk(out, tile.cell_start, values)
    return int(np.prod(tile.cells))

