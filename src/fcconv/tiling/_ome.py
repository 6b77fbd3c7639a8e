"""The map as an OME-NGFF 0.5 image: axes, coordinates on the slide, a pyramid, channel names.

The map's group (the store contract: ``0`` the map, group attributes ``fcconv``) gets:

* ``ome.multiscales``: axes ``c`` (channel), ``y``, ``x`` (space, in micrometres when the pixel
  size is known, else in level-0 pixels); per level, ``scale = [1, stride * d * p, ...]`` and a
  ``translation`` that puts each cell on the centre of the window it classifies. Coordinates are
  those of level-0 pixel centres (pixel ``q`` of level 0 at ``q * p``, as napari and QuPath place
  the slide): with ``d`` level-0 pixels per image pixel, ``p`` level-0 micrometres per pixel (1 in
  pixels), window offset ``o`` and window ``w``, cell 0 is at ``p * (d * (o + w / 2) - 0.5)``.
* levels ``1``, ``2``, ...: 2x2 means of the level below (NaN, i.e. skipped cells, ignored);
* ``omero.channels`` labels and ``fcconv.classes`` from the class names when known.

``scores="probabilities"`` maps softmax over classes instead of the logits (:func:`with_scores`).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn

from fcconv._deps import need_tiles as require
from fcconv.errors import FcconvError

__all__ = ["SCORES", "finish", "geometry_of", "multiscales", "read_class_names", "with_scores",
           "write_ome", "write_pyramid"]

SCORES = ("logits", "probabilities")
PYRAMID_SIDE = 256  # the pyramid goes down to at most this many cells a side (at least 2 levels)


class Probabilities(nn.Module):
    """``softmax(fcn(x), dim=1)``: each cell's class probabilities (a per-cell function, still exact)."""

    def __init__(self, fcn: nn.Module) -> None:
        super().__init__()
        self.fcn = fcn

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.fcn(x), dim=1)


def with_scores(fcn: nn.Module, scores: str) -> nn.Module:
    """The module a run computes: ``fcn`` for ``"logits"``; for ``"probabilities"``, a copy of a
    converted model whose graph ends in ``softmax(dim=1)`` (so both methods, streamed rows included,
    run it; its parameters are the model's own, shared), else :class:`Probabilities`."""
    if scores not in SCORES:
        raise FcconvError(f"scores must be one of {', '.join(SCORES)}; got {scores!r}.")
    if scores == "logits":
        return fcn
    graph_module = getattr(fcn, "graph_module", None)
    if not isinstance(graph_module, fx.GraphModule):
        return Probabilities(fcn)
    graph = copy.deepcopy(graph_module.graph)
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        soft = graph.call_function(torch.softmax, (output.args[0],), {"dim": 1})
    output.args = (soft,)
    probabilities = copy.copy(fcn)  # the user's module is left as it is: new module dicts below
    probabilities.__dict__["_modules"] = {**fcn._modules, "graph_module": fx.GraphModule(graph_module, graph)}
    if isinstance(getattr(fcn, "_analyses", None), dict):
        probabilities.__dict__["_analyses"] = type(fcn._analyses)()
    return probabilities


def read_class_names(names: Any, classes: int) -> list[str] | None:
    """Class names as a list of ``classes`` strings (from a list, or a file with one name a line)."""
    if names is None:
        return None
    if isinstance(names, (str, os.PathLike)):
        with open(names, encoding="utf-8") as handle:
            names = [line.strip() for line in handle if line.strip()]
    names = [str(n) for n in names]
    if len(names) != classes:
        raise FcconvError(f"class_names holds {len(names)} name(s); the map has {classes} classes. Give one "
                          "name per class, in the model's order.")
    return names


def geometry_of(fcn: Any, source: Any) -> dict[str, Any]:
    """The contract's ``fcconv.geometry`` of a map of ``fcn`` over ``source`` (slides: level and mpp)."""
    from fcconv.tiling._slide import slide_geometry

    spatial = tuple(int(s) for s in source.shape[1:])
    ndim = len(spatial)
    geometry: dict[str, Any] = {
        "stride": list(fcn.stride), "window": list(fcn.window),
        "window_offset": list(fcn.window_of((0,) * ndim, spatial)[:ndim]),
        "image_shape": list(source.shape), "level": int(source.level), "downsample": 1.0, "mpp": None,
    }
    geometry.update(slide_geometry(source) or {})
    return geometry


def _space_transform(geometry: dict[str, Any], k: int) -> tuple[list[float], list[float]]:
    """Scale and translation of the spatial axes of pyramid level ``k`` (see the module)."""
    d = float(geometry.get("downsample") or 1.0)
    mpp = geometry.get("mpp")
    base = [1.0] * len(geometry["stride"]) if mpp is None else [m / d for m in mpp]  # level-0 size
    scale0 = [p * d * s for p, s in zip(base, geometry["stride"])]
    offsets, windows = geometry["window_offset"], geometry["window"]
    first = [p * (d * (o + w / 2) - 0.5) for p, o, w in zip(base, offsets, windows)]
    return ([s * 2**k for s in scale0], [t + s * (2**k - 1) / 2 for t, s in zip(first, scale0)])


def multiscales(geometry: dict[str, Any], levels: int, name: str = "fcconv map") -> dict[str, Any]:
    """The OME-NGFF 0.5 ``multiscales`` entry for levels ``"0"`` to ``str(levels - 1)``."""
    unit = {} if geometry.get("mpp") is None else {"unit": "micrometer"}
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", **unit} for n in ("z", "y", "x")[-len(geometry["stride"]):]]
    datasets = []
    for k in range(levels):
        scale, translation = _space_transform(geometry, k)
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, *scale]},
            {"type": "translation", "translation": [0.0, *translation]}]})
    return {"name": name, "axes": axes, "datasets": datasets}


def _mean2(block: np.ndarray) -> np.ndarray:
    """2x2 means of cells over the spatial dims, NaN ignored (all NaN stays NaN)."""
    pad = [(0, 0)] + [(0, s % 2) for s in block.shape[1:]]
    block = np.pad(block, pad, constant_values=np.nan)
    c, h, w = block.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of empty slice: a skipped block
        return np.nanmean(block.reshape(c, h // 2, 2, w // 2, 2), axis=(2, 4)).astype(block.dtype)


def _levels_for(grid: Sequence[int]) -> int:
    levels, side = 1, max(grid)
    while levels < 3 or side > PYRAMID_SIDE:
        if side == 1:
            break
        side, levels = -(-side // 2), levels + 1
    return levels


def write_pyramid(group: Any, levels: int | None = None) -> int:
    """Write levels ``1, 2, ...`` of the map ``group["0"]``, each the 2x2 mean of the one before.

    Reads and writes one band of rows at a time. Returns the number of levels, ``"0"`` included.
    """
    previous = group["0"]
    count = _levels_for(previous.shape[1:]) if levels is None else levels
    for k in range(1, count):
        shape = (previous.shape[0], *(-(-s // 2) for s in previous.shape[1:]))
        chunks = (min(16, shape[0]), *(min(256, s) for s in shape[1:]))
        level = group.create_array(str(k), shape=shape, chunks=chunks, dtype=previous.dtype,
                                   fill_value=np.nan, overwrite=True)
        band = 2 * chunks[1]
        for top in range(0, previous.shape[1], band):
            level[:, top // 2:(top + band) // 2] = _mean2(np.asarray(previous[:, top:top + band]))
        previous = level
    return count


def write_ome(path: str | os.PathLike[str], *, geometry: dict[str, Any] | None = None,
              class_names: Sequence[str] | None = None, scores: str = "logits", pyramid: bool = True,
              extra: dict[str, Any] | None = None) -> None:
    """Make the map's group at ``path`` an OME-NGFF 0.5 image (see the module).

    Args:
        path: the zarr group holding the map ``0`` and the ``fcconv`` attributes.
        geometry: the ``fcconv.geometry`` fields to set (merged over those already there).
        class_names: one name per class, for ``omero`` channel labels and ``fcconv.classes``.
        scores: what the map holds, ``"logits"`` or ``"probabilities"`` (sets display windows).
        pyramid: write levels ``1, 2, ...`` (2x2 means) before the metadata.
        extra: more ``fcconv`` attributes (e.g. the mask's summary).

    Example:
        >>> write_ome("map.zarr", class_names=["tumour", "stroma", "background"])
    """
    zarr = require("zarr")
    group = zarr.open_group(str(path), mode="r+")
    fcconv_attrs = dict(group.attrs.get("fcconv", {}))
    merged = {**fcconv_attrs.get("geometry", {}), **(geometry or {})}
    missing = [k for k in ("stride", "window", "window_offset") if k not in merged]
    if missing:
        raise FcconvError(f"The map at {str(path)!r} has no fcconv.geometry {', '.join(missing)}; pass "
                          "geometry= (fcconv.tiling._ome.geometry_of(fcn, source)).")
    levels = write_pyramid(group) if pyramid else len([k for k in group.array_keys() if k.isdigit()])
    classes = int(group["0"].shape[0])
    fcconv_attrs.update({"version": fcconv_attrs.get("version", 1), "geometry": merged,
                         "classes": list(class_names) if class_names is not None else fcconv_attrs.get(
                             "classes"), "scores": scores, **(extra or {})})
    channels = [{"label": fcconv_attrs["classes"][c] if fcconv_attrs["classes"] else f"class {c}",
                 "active": c == 0, "color": "FF00FF",
                 **({"window": {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0}}
                    if scores == "probabilities" else {})} for c in range(classes)]
    ome = {"version": "0.5", "multiscales": [multiscales(merged, levels)], "omero": {"channels": channels}}
    group.attrs.update({"fcconv": fcconv_attrs, "ome": ome})


def finish(path: str | None, fcn: Any, source: Any, *, class_names: Sequence[str] | None, scores: str,
           tissue: np.ndarray | None) -> None:
    """After a complete run into a zarr group: the pyramid and the OME metadata (no-op for a bare array)."""
    if path is None:
        return
    zarr = require("zarr")
    if hasattr(zarr.open(str(path), mode="r"), "shape"):
        return  # a bare array store: no group to hold levels and attributes
    extra = {} if tissue is None else {"mask": {"tissue_cells": int(tissue.sum()), "cells": int(tissue.size)}}
    write_ome(path, geometry=geometry_of(fcn, source), class_names=class_names, scores=scores, extra=extra)
