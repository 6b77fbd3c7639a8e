"""The zarr map on disk: created with the run's identity, reopened to resume, one chunk per tile.

A chunk is finished when its key exists: zarr's ``LocalStore`` writes every chunk to a temporary
file and renames it, so a run killed mid-write (even ``kill -9``) leaves no half-written chunk
under a chunk key, only a ``*.partial`` file that resuming removes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcconv._deps import need_tiles as require
from fcconv.errors import FcconvError

__all__ = ["finished", "open_output", "write_chunk"]

ATTRIBUTE = "fcconv_tiled_map"


def _differences(saved: Any, identity: dict[str, Any]) -> list[str]:
    if not isinstance(saved, dict):
        return ["it was not written by fcconv.tiled_map"]
    return [key for key in identity if saved.get(key) != identity[key]]


def open_output(out: str | os.PathLike[str], *, shape: Sequence[int], chunks: Sequence[int],
                dtype: np.dtype, identity: dict[str, Any], overwrite: bool) -> Any:
    """Create the zarr array ``out`` for this run, or reopen it to resume the same run.

    Args:
        out: a directory path for the zarr store.
        shape, chunks, dtype: the map's.
        identity: what identifies the run (image, model, tile, transform), JSON-compatible.
        overwrite: replace an ``out`` that holds another run's map.

    Raises:
        FcconvError: if ``out`` holds another run's map (unless ``overwrite``), is not a zarr
            array, or cannot be written. Nothing is changed on disk in those cases.
    """
    zarr = require("zarr")
    path = Path(out).expanduser()
    identity = json.loads(json.dumps(identity))  # what the attributes give back (lists, not tuples)
    if path.exists():
        if not path.is_dir() or not (path / "zarr.json").is_file():
            raise FcconvError(
                f"out {str(path)!r} exists and is not a zarr array; it was left as it is. Choose a new "
                "path (e.g. scores.zarr) or remove it yourself."
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise FcconvError(f"out {str(path)!r} is read-only; nothing was written. Make it writable or "
                              "choose another path.")
        try:
            array = zarr.open_array(str(path), mode="r+")
        except Exception as error:  # zarr raises several types for a group or broken metadata
            raise FcconvError(f"out {str(path)!r} is not a zarr array ({error}); it was left as it is. "
                              "Choose another path.") from None
        saved = dict(array.attrs).get(ATTRIBUTE)
        differs = _differences(saved, identity)
        if not differs and array.shape == tuple(shape) and array.dtype == dtype:
            _remove_partial(path)
            return array
        if not overwrite:
            raise FcconvError(
                f"out {str(path)!r} holds another run's map (it differs in: "
                f"{', '.join(differs) or 'shape'}); it was left as it is. Pass overwrite=True "
                "(--overwrite) to replace it, or choose another path."
            )
    try:
        return zarr.open_array(str(path), mode="w", shape=tuple(shape), chunks=tuple(chunks), dtype=dtype,
                               fill_value=np.nan, attributes={ATTRIBUTE: identity},
                               config={"write_empty_chunks": True})
    except OSError as error:
        raise FcconvError(f"Cannot write out {str(path)!r}: {error.strerror or error}. Choose a writable "
                          "path.") from None


def _remove_partial(path: Path) -> None:
    """Remove the temporary files of chunk writes a killed run left behind."""
    for leftover in path.rglob("*.partial"):
        leftover.unlink(missing_ok=True)


def finished(array: Any, path: str | os.PathLike[str], indices: Iterable[tuple[int, ...]]
             ) -> set[tuple[int, ...]]:
    """The tile indices whose output chunk is already on disk."""
    root = Path(path).expanduser()
    return {index for index in indices
            if (root / array.metadata.encode_chunk_key((0, *index))).is_file()}


def write_chunk(path: str, cell_start: Sequence[int], values: np.ndarray) -> None:
    """Write one tile's scores: exactly one chunk of the map at ``path``."""
    zarr = require("zarr")
    array = zarr.open_array(path, mode="r+")
    window = tuple(slice(s, s + n) for s, n in zip(cell_start, values.shape[1:]))
    array[(slice(None),) + window] = values
