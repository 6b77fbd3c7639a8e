"""Maps in fcconv's map store layout, written by the tests themselves, and a server in a thread."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from fcconv.viewer import ViewerApp, make_server


def write_map(path: Path, scores: np.ndarray, *, stride: Sequence[float], window: Sequence[float],
              window_offset: Sequence[float] = (0, 0), image_shape: Sequence[int], level: int = 0,
              downsample: float = 1.0, mpp: Sequence[float] | None = None,
              classes: Sequence[str] | None = None, valid: np.ndarray | None = None,
              complete: bool | None = True, chunks: Sequence[int] | None = None) -> Path:
    """A zarr v3 group as the map store contract lays it out: "0", optional "valid", the attributes."""
    group = zarr.open_group(str(path), mode="w")
    geometry = {"stride": list(stride), "window": list(window), "window_offset": list(window_offset),
                "image_shape": list(image_shape), "level": level, "downsample": downsample,
                "mpp": None if mpp is None else list(mpp)}
    attrs: dict[str, Any] = {"version": 1, "identity": {}, "geometry": geometry,
                             "classes": None if classes is None else list(classes)}
    if complete is not None:
        attrs["complete"] = complete
    group.attrs["fcconv"] = attrs
    array = group.create_array("0", shape=scores.shape, dtype="float32", fill_value=np.nan,
                               chunks=tuple(chunks) if chunks else scores.shape)
    array[...] = scores.astype(np.float32)
    if valid is not None:
        mask = group.create_array("valid", shape=valid.shape, dtype="uint8", fill_value=0)
        mask[...] = valid.astype(np.uint8)
    return path


def one_hot_map(classes: Sequence[Sequence[int]], count: int) -> np.ndarray:
    """Scores ``(count, h, w)``: 4 for the class given per cell, 0 for the others."""
    winners = np.asarray(classes)
    scores = np.zeros((count, *winners.shape), dtype=np.float32)
    for k in range(count):
        scores[k][winners == k] = 4.0
    return scores


@contextmanager
def serving(app: ViewerApp, host: str = "127.0.0.1") -> Iterator[str]:
    """The app served on a free port in a thread; yields its base URL."""
    server = make_server(app, host, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """Status, content type and body of a GET (errors included)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers.get("Content-Type", ""), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def digits_map(folder: Path, height: int = 256, width: int = 384, seed: int = 0) -> tuple[Path, Path]:
    """The digits demo: a canvas TIFF and its map in the contract's layout, written here (quick)."""
    import tifffile
    import torch

    import fcconv
    from fcconv.demo.digits import CLASS_NAMES, load_digits_model, make_canvas

    canvas = make_canvas(height, width, seed=seed)
    pixels = (canvas.image[0].numpy() * 255).round().astype(np.uint8)
    slide = folder / "digits.tif"
    tifffile.imwrite(slide, pixels, tile=(256, 256))
    fcn = fcconv.convolutionalize(load_digits_model(), (1, 12, 12))
    with torch.inference_mode():
        scores = fcn(torch.from_numpy(pixels).float()[None, None] / 255)[0].numpy()
    top, left = fcn.window_of((0, 0))[:2]
    path = write_map(folder / "digits-map.zarr", scores, stride=fcn.stride, window=fcn.window,
                     window_offset=(top, left), image_shape=(1, height, width), classes=CLASS_NAMES,
                     chunks=(len(CLASS_NAMES), 256, 256))
    return slide, path
