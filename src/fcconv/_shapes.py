"""Validation of per-sample input shapes, shared by every layer of the package."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

from fcconv.errors import FcconvError

__all__ = ["check_input_shape", "format_shape"]


def format_shape(shape: Sequence[int]) -> str:
    """``(3, 5, 5)`` for a shape, the way messages print it."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_input_shape(input_shape: object, *, what: str = "input_shape") -> tuple[int, ...]:
    """Return ``input_shape`` as a tuple ``(C, *spatial)`` with 1 to 3 spatial dims, or raise.

    Args:
        input_shape: the per-sample shape, without the batch dimension, e.g. ``(3, 224, 224)``.
        what: the argument name used in error messages.

    Raises:
        FcconvError: if it is not a sequence of 2 to 4 positive integers.
    """
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise FcconvError(
            f"{what} must be a per-sample shape (C, *spatial) such as (3, 32, 32); "
            f"got {input_shape!r}. Pass a tuple of 2 to 4 positive integers, without the batch size."
        )
    try:
        if any(isinstance(s, bool) for s in input_shape):
            raise TypeError
        shape = tuple(operator.index(s) for s in input_shape)  # ints, numpy ints, 0-d int tensors
    except TypeError:
        raise FcconvError(
            f"{what} must hold integers; got {input_shape!r}. Pass e.g. (3, 32, 32)."
        ) from None
    if not 2 <= len(shape) <= 4:
        raise FcconvError(
            f"{what} must have rank 2 to 4, (C, L), (C, H, W) or (C, D, H, W), for Conv1d/2d/3d; "
            f"got rank {len(shape)}: {format_shape(shape)}. Leave out the batch dimension; "
            "for a flat vector of n features use (n, 1) or (n, 1, 1)."
        )
    if any(s <= 0 for s in shape):
        raise FcconvError(
            f"{what} sizes must be positive; got {format_shape(shape)}. "
            "Every channel and spatial size must be at least 1."
        )
    return shape


def numel(shape: Sequence[int]) -> int:
    """The number of elements of a per-sample shape."""
    return math.prod(shape)
