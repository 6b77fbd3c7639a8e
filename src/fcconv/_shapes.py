"""The toolkit every layer shares: shapes, one value per spatial dim, dim labels, module dtype and mode."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Any, SupportsIndex, cast

import torch
import torch.nn.functional as F
from torch import nn

from fcconv.errors import FcconvError, NotEquivalentError

__all__ = [
    "SPATIAL_LABELS",
    "STOCHASTIC_FUNCTIONS",
    "STOCHASTIC_MODULES",
    "broadcast",
    "check_input_shape",
    "conv_rank",
    "dim_labels",
    "format_shape",
    "module_dtype_device",
    "per_dim",
    "stochastic_in_training",
]


def format_shape(shape: Sequence[int]) -> str:
    """``(3, 5, 5)`` for a shape, the way messages print it."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_input_shape(
    input_shape: object,
    *,
    what: str = "input_shape",
    any_rank: bool = False,
    conv: nn.Module | None = None,
    caller: str | None = None,
) -> tuple[int, ...]:
    """Return ``input_shape`` as a tuple of positive ints, or raise: the one per-sample shape check.

    By default the shape is ``(C, *spatial)`` with 1 to 3 spatial dims, the input of a Conv1d/2d/3d.
    Python and numpy integers and 0-d integer tensors are accepted; bools are refused.

    Args:
        input_shape: the per-sample shape, without the batch dimension, e.g. ``(3, 224, 224)``.
        what: the argument name used in error messages (``"--input"`` on the command line).
        any_rank: accept any rank from 1 up, and one int ``n`` for ``(n,)`` (a flat vector of ``n``
            features), as :func:`fcconv.compare` does for any module.
        conv: also check that the shape enters this convolution: rank ``1 + len(conv.kernel_size)``
            and ``conv.in_channels`` channels.
        caller: the function named at the start of the messages about ``conv``.

    Raises:
        FcconvError: if it is not a sequence of positive integers of an accepted rank.
        NotEquivalentError: if its channel count is not ``conv.in_channels``.

    Example:
        >>> check_input_shape((3, 32, 32)), check_input_shape(4, any_rank=True)
        ((3, 32, 32), (4,))
    """
    if any_rank and _is_int(input_shape):
        input_shape = (input_shape,)
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        example = "(3, 32, 32), or 4 for 4 features" if any_rank else "(3, 32, 32)"
        raise FcconvError(
            f"{what} must be a per-sample shape (C, *spatial) such as {example}; got "
            f"{input_shape!r:.80}. Pass a tuple of positive integers, without the batch size."
        )
    if not all(_is_int(s) for s in input_shape):
        raise FcconvError(
            f"{what} must hold integers; got {input_shape!r:.80}. Pass e.g. (3, 32, 32)."
        )
    shape = tuple(operator.index(s) for s in input_shape)  # ints, numpy ints, 0-d int tensors
    if any_rank and not shape:
        raise FcconvError(f"{what} must have at least one dim; got (). Pass e.g. (4,) for 4 features.")
    if not any_rank and not 2 <= len(shape) <= 4:
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
    if conv is not None:
        _check_fits_conv(shape, conv, caller or "fcconv")
    return shape


def _check_fits_conv(shape: tuple[int, ...], conv: nn.Module, caller: str) -> None:
    ndim, c_in = len(cast(Sequence[int], conv.kernel_size)), cast(int, conv.in_channels)
    name = f"{type(conv).__name__}(in_channels={c_in})"
    if len(shape) != ndim + 1:
        raise FcconvError(
            f"{caller}: {name} takes inputs of rank {ndim + 1} (C plus {ndim} spatial dims); got "
            f"input_shape {format_shape(shape)} of rank {len(shape)}. Pass the per-sample shape "
            "without the batch dimension."
        )
    if shape[0] != c_in:
        raise NotEquivalentError(
            f"{caller}: {name} expects {c_in} input channels; got input_shape "
            f"{format_shape(shape)} with {shape[0]}. Pass the shape of the tensor that enters "
            "this conv."
        )


# ----------------------------------------------------------------------------------------------
# One value per spatial dim

SPATIAL_LABELS: dict[int, tuple[str, ...]] = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}
"""The names of the spatial dims of a 1d, 2d and 3d map."""


def dim_labels(ndim: int) -> tuple[str, ...]:
    """``('N', 'C', 'H', 'W')``: the canonical dims of a batch of maps with ``ndim`` spatial dims."""
    return ("N", "C", *SPATIAL_LABELS[ndim])


def broadcast(value: Any, n: int) -> tuple[Any, ...] | None:
    """``value`` with one entry per spatial dim, as PyTorch broadcasts it, or None if it cannot be.

    A scalar (an int, a str such as ``'same'``) or a one-element sequence is repeated ``n`` times; a
    sequence of ``n`` entries is kept. The entries are not checked (traced arguments may hold
    nodes); :func:`per_dim` checks they are integers.
    """
    if isinstance(value, (str, bool)) or _is_int(value):
        return None if isinstance(value, bool) else (value,) * n
    if isinstance(value, (tuple, list, torch.Size)):
        if len(value) == n:
            return tuple(value)
        if len(value) == 1:
            return (value[0],) * n
    return None


def per_dim(value: object, n: int, what: str, *, allow_one: bool = False) -> tuple[int, ...]:
    """``value`` as ``n`` integers, one per spatial dim: an int for all, or a sequence of ``n`` ints.

    Accepts Python and numpy integers and 0-d integer tensors; refuses bools. With ``allow_one``, a
    one-element sequence is repeated too, as PyTorch does for a conv's ``stride=(2,)``.

    Raises:
        FcconvError: if ``value`` is not that.

    Example:
        >>> per_dim(3, 2, "stride"), per_dim((2,), 2, "stride", allow_one=True)
        ((3, 3), (2, 2))
    """
    one = isinstance(value, (tuple, list, torch.Size)) and len(value) == 1 and n != 1
    values = None if isinstance(value, str) or (one and not allow_one) else broadcast(value, n)
    if values is None or not all(_is_int(v) for v in values):
        raise FcconvError(
            f"{what} must be {n} integer(s), one per spatial dim (or one int for all); got {value!r}."
        )
    return tuple(operator.index(cast(SupportsIndex, v)) for v in values)


def _is_int(value: object) -> bool:
    if isinstance(value, bool):
        return False
    try:
        operator.index(cast(SupportsIndex, value))
    except TypeError:
        return False
    return True


def conv_rank(module: nn.Module) -> int | None:
    """The number of spatial dims of a ``*1d``/``*2d``/``*3d`` module (conv, pooling, norm), else None."""
    return {"1d": 1, "2d": 2, "3d": 3}.get(type(module).__name__[-2:].lower())


# ----------------------------------------------------------------------------------------------
# Modules


def module_dtype_device(module: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    """The dtype and device of the module's first floating parameter or buffer; ``(None, None)`` if none."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return None, None


# Modules whose output, in training mode, depends on the rest of the batch or on chance.
STOCHASTIC_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.RReLU,
)
# Their functional forms, which take the mode as a ``training`` argument.
STOCHASTIC_FUNCTIONS: frozenset[Any] = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.batch_norm, F.rrelu,
})


def stochastic_in_training(model: nn.Module) -> list[str]:
    """Qualified names of the submodules in training mode whose output depends on the batch or on chance.

    BatchNorm, Dropout and RReLU modules with ``training=True``; ``''`` names ``model`` itself.

    Example:
        >>> stochastic_in_training(nn.Sequential(nn.Linear(2, 2), nn.Dropout()))
        ['1']
    """
    return [name for name, m in model.named_modules() if isinstance(m, STOCHASTIC_MODULES) and m.training]
