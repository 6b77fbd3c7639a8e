"""What the axes of a stored image mean: channels, spatial dims, and planes of a stack.

A TIFF states its axes (tifffile's ``series[0].axes``: ``YX``, ``YXS``, ``CYX``, ``ZYX``, ``TZCYX``...),
a zarr v3 array may name its dimensions. They decide the layout: samples ``S`` or channels ``C``
are the model's channels, the last ``ndim`` of ``ZYX`` its spatial dims, and every other axis
(``Z`` for a 2-d model, ``T``, ``Q``, ``I``...) a stack whose planes are read one at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fcconv._shapes import format_shape
from fcconv.errors import FcconvError

__all__ = ["Layout", "cap", "check_dtype", "resolve_axes", "zarr_axes"]

_CHANNELS = "CS"
_NAMES = {"Z": "z-stack", "T": "time series", "Q": "planes of unknown meaning", "I": "image sequence",
          "R": "tiles or positions", "E": "lambda", "H": "lifetime histogram", "P": "phases",
          "A": "angles", "L": "exposures", "V": "views", "M": "mosaic"}
_DIMENSION_NAMES = {"c": "C", "ch": "C", "channel": "C", "channels": "C", "s": "S", "sample": "S",
                    "samples": "S", "z": "Z", "y": "Y", "x": "X", "t": "T", "time": "T"}


@dataclass(frozen=True)
class Layout:
    """How a stored array holds a ``(C, *spatial)`` image.

    Attributes:
        stored: ``"CHW"``, ``"HWC"`` or ``"HW"`` once the planes are picked.
        planes: ``(axis, index)`` of the stored axes fixed to one plane.
    """

    stored: str
    planes: tuple[tuple[int, int], ...] = ()


def check_dtype(dtype: Any, what: str = "the image") -> None:
    """Refuse images (or maps: ``what``) whose values are not real numbers: complex, boolean, object,
    text, dates."""
    if dtype is None:
        return
    kind = np.dtype(dtype)
    if kind.kind in "iuf":
        return
    fixes = {
        "c": "pass image.real, image.imag or abs(image): fcconv does not drop the imaginary part "
             "silently",
        "b": "pass image.astype(numpy.uint8) (0 and 1), scaled as you need",
        "O": "an object array holds Python objects, not pixels: convert it with "
             "numpy.asarray(image, dtype=numpy.float32) first",
    }
    fix = fixes.get(kind.kind, "convert it to integer or floating-point pixels first")
    raise FcconvError(f"{cap(what)} has dtype {kind} ({_kind_name(kind)}); expected integer or "
                      f"floating-point values. {fix[0].upper() + fix[1:]}.")


def _kind_name(dtype: np.dtype) -> str:
    return {"c": "complex", "b": "boolean", "O": "object", "U": "text", "S": "bytes", "V": "structured",
            "M": "dates", "m": "time spans"}.get(dtype.kind, dtype.kind)


def zarr_axes(array: Any) -> str | None:
    """The axes a zarr v3 array names (``dimension_names`` such as ``("c", "y", "x")``), else None."""
    names = getattr(getattr(array, "metadata", None), "dimension_names", None)
    if not names or any(n is None for n in names):
        return None
    letters = [_DIMENSION_NAMES.get(str(n).lower()) for n in names]
    if any(letter is None for letter in letters) or len(set(letters)) != len(letters):
        return None
    return "".join(letters)  # type: ignore[arg-type]


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _spatial(ndim: int) -> str:
    return "ZYX"[3 - ndim:] if 1 <= ndim <= 3 else ""


def _plane_indices(axes: str, shape: Sequence[int], stack: list[int], plane: Any, where: str
                   ) -> tuple[tuple[int, int], ...]:
    """The ``(axis, index)`` pairs ``plane`` picks on the ``stack`` axes."""
    letters = [axes[i] for i in stack]
    if isinstance(plane, bool) or not isinstance(plane, (int, np.integer, Mapping)):
        raise FcconvError(
            f"plane must be an int or a dict {{axis: index}}; got {plane!r}.")
    if not isinstance(plane, Mapping):
        if len(stack) != 1:
            example = ", ".join(f"'{a}': 0" for a in letters)
            raise FcconvError(
            f"{cap(where)} has {len(stack)} stack axes ({', '.join(letters)}); one index cannot "
            f"pick a plane. Pass plane={{{example}}}.")
        plane = {letters[0]: int(plane)}
    keys = {str(k).upper(): v for k, v in plane.items()}
    if sorted(keys) != sorted(letters):
        example = ", ".join(f"'{a}': 0" for a in letters)
        raise FcconvError(
            f"plane names axes {', '.join(sorted(keys)) or 'none'}; {where} has the stack axes "
            f"{', '.join(letters)}. Pass plane={{{example}}}.")
    picked = []
    for axis in stack:
        index = keys[axes[axis]]
        size = int(shape[axis])
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < size:
            raise FcconvError(
            f"plane {axes[axis]}={index!r} does not exist: axis {axes[axis]} of {where} has "
            f"{size} planes, 0 to {size - 1}. Pass an index from 0 to {size - 1}.")
        picked.append((axis, int(index)))
    return tuple(picked)


def _refuse_stack(axes: str, shape: Sequence[int], stack: list[int], ndim: int, where: str) -> None:
    parts = [f"{int(shape[i])} planes along axis {axes[i]} ({_NAMES.get(axes[i], 'a stack')})" for i in stack]
    if len(stack) == 1:
        last = int(shape[stack[0]]) - 1
        fix = f"Pass plane=k (k from 0 to {last}) to map plane k"
    else:
        fix = "Pass plane={" + ", ".join(f"'{axes[i]}': 0" for i in stack) + "} to map one plane"
    unknown = (" (or layout='CHW' if these planes are the image's channels)"
               if [axes[i] for i in stack] == ["Q"] else "")
    raise FcconvError(
            f"{cap(where)} (axes {axes}, shape {format_shape(shape)}) is a stack of {' by '.join(parts)}; "
            f"a {ndim}-d model maps one plane at a time. {fix}{unknown}.")


def resolve_axes(axes: str, shape: Sequence[int], *, layout: str | None, plane: Any, ndim: int, where: str
                 ) -> Layout:
    """The layout of an image whose axes are known, with the planes ``plane`` picks.

    Args:
        axes: one letter per stored axis (tifffile's convention).
        shape: the stored shape.
        layout: ``None`` (from ``axes``) or the layout the caller asked for, checked against ``axes``.
        plane: ``None``, an index along the one stack axis, or ``{axis: index}``.
        ndim: the model's spatial dims.
        where: the image, for messages.

    Raises:
        FcconvError: on a stack without ``plane``, a ``plane`` that names no stack axis or is out
            of range, axes the model cannot read, or a ``layout`` that contradicts ``axes``.
    """
    spatial = _spatial(ndim)
    if len(axes) != len(shape) or not spatial or "".join(a for a in axes if a in spatial) != spatial:
        raise FcconvError(
            f"{cap(where)} has axes {axes} (shape {format_shape(shape)}); a {ndim}-d model needs the "
            f"spatial axes {spatial or '(more than 3)'} in that order. Check the image or the "
            "model.")
    channel = [i for i, a in enumerate(axes) if a in _CHANNELS]
    stack = [i for i, a in enumerate(axes) if a not in spatial and a not in _CHANNELS]
    if not channel and layout == "CHW" and [axes[i] for i in stack] == ["Q"] and plane is None:
        channel, stack = stack, []  # the caller says the unnamed planes are channels
    if len(channel) > 1:
        raise FcconvError(
            f"{cap(where)} has two channel axes ({axes}, shape {format_shape(shape)}); fcconv reads "
            "one. Write the image with one channel axis.")
    if stack and plane is None:
        _refuse_stack(axes, shape, stack, ndim, where)
    if not stack and plane is not None:
        raise FcconvError(
            f"plane picks one plane of a stack; {where} (axes {axes}) is not a stack. Drop plane.")
    planes = _plane_indices(axes, shape, stack, plane, where) if stack else ()
    rest = "".join(a for i, a in enumerate(axes) if i not in stack)
    stored = {"C" + spatial: "CHW", "S" + spatial: "CHW", spatial + "C": "HWC", spatial + "S": "HWC",
              spatial: "HW"}.get(rest)
    if channel and axes[channel[0]] == "Q":
        stored = "CHW" if rest == "Q" + spatial else None
    if stored is None:
        raise FcconvError(
            f"{cap(where)} has axes {axes}: its channel axis lies between spatial axes. Write it "
            "channels first or last.")
    if layout is not None and stored != "HW" and stored != layout:
        raise FcconvError(f"layout='{layout}' contradicts {where}: its axes {axes} store channels "
                          f"{'first' if stored == 'CHW' else 'last'} ({stored}). Drop layout to read the "
                          f"file's axes, or pass layout='{stored}'.")
    return Layout(stored, planes)
