"""Distances in units in the last place: how many representable values lie between two floats."""

from __future__ import annotations

import torch
from torch import Tensor

from fcconv.errors import FcconvError

__all__ = ["bits", "ulp_distance"]

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_INT64_MAX = 2**63 - 1


def _ordered(x: Tensor) -> tuple[Tensor, Tensor]:
    """Map floats to int64 keys in the order of their values (``+0`` and ``-0`` both map to 0)."""
    size = x.element_size()
    bits = x.view(_INT_OF_SIZE[size]).to(torch.int64)
    magnitude = bits & (2 ** (8 * size - 1) - 1)  # the sign-extended sign bit is cleared
    return torch.where(bits < 0, -magnitude, magnitude), magnitude


def ulp_distance(a: Tensor, b: Tensor) -> Tensor:
    """The number of representable values of their dtype between ``a`` and ``b``, elementwise.

    Floats are mapped to integers in value order (sign-magnitude bits to two's complement), so the
    distance counts every representable value in between, across zero and subnormals: ``+0`` and
    ``-0`` are 0 apart, the smallest positive and negative subnormals 2. Two NaNs are 0 apart, a NaN
    and a number ``2**63 - 1``; distances that overflow int64 (float64 values of opposite sign near
    the largest finite ones) saturate at ``2**63 - 1``.

    Args:
        a: a floating-point tensor.
        b: a tensor of the same dtype, broadcastable with ``a``.

    Returns:
        An int64 tensor of the broadcast shape.

    Raises:
        FcconvError: if the dtypes differ or are not floating point.

    Example:
        >>> ulp_distance(torch.tensor([1.0, 0.0]), torch.tensor([1.0000001, -0.0]))
        tensor([1, 0])
    """
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise FcconvError(f"ulp_distance expects two tensors; got {type(a).__name__} and {type(b).__name__}.")
    if a.dtype != b.dtype or not a.is_floating_point():
        raise FcconvError(
            f"ulp_distance expects two floating-point tensors of one dtype; got {a.dtype} and {b.dtype}. "
            "Convert one to the other's dtype first: the distance is counted in that dtype's units."
        )
    a, b = torch.broadcast_tensors(a, b)
    oa, ma = _ordered(a.contiguous())
    ob, mb = _ordered(b.contiguous())
    same_side = (oa >= 0) == (ob >= 0)
    # Opposite signs: |oa - ob| = ma + mb, which only float64 can push past int64.
    across = torch.where(ma > _INT64_MAX - mb, torch.full_like(ma, _INT64_MAX), ma + mb)
    dist = torch.where(same_side, (oa - ob).abs(), across)
    na, nb = torch.isnan(a), torch.isnan(b)
    dist = torch.where(na & nb, torch.zeros_like(dist), dist)
    return torch.where(na ^ nb, torch.full_like(dist, _INT64_MAX), dist)



def bits(t: Tensor) -> Tensor:
    """The bit patterns of a floating tensor, as integers of the same width."""
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()])
