"""Rules for reductions, average pooling and interpolation: linear sums of their input (their backward
ops, linear sums too, are in ``rules_backward``)."""

from __future__ import annotations

import math
from collections.abc import Callable

from fcconv.certify.rounding.registry import (
    Bound,
    Op,
    Rule,
    register,
    sum_bounds,
)


def linear_sum(count: Callable[[Op], float], extra: float = 1.0) -> Rule:
    """A linear op with nonnegative weights that sums at most ``count`` terms per element (pools,
    sums, means, interpolation, the backward of a gather): apply it to the bound, and add
    ``(count + extra) * eps * op(|x|)``."""
    def rule(op: Op, ch: int) -> Bound:
        x = op.args[0]
        e = op.e(x, ch)
        return sum_bounds(
            None if e is None else op.func(e.to(x.dtype), *op.args[1:], **op.kwargs),
            op.rnd(ch, "own", lambda: op.func(op.abs(x), *op.args[1:], **op.kwargs),
                   factor=count(op) + extra),
        )
    return rule


def _reduced(op: Op) -> float:
    return op.args[0].numel() / max(op.out.numel(), 1)


def _window(op: Op) -> float:
    return float(math.prod(op.args[1]))


def _adaptive_window(op: Op) -> float:
    x = op.args[0]
    out_size = op.args[1]
    spatial = x.shape[-len(out_size):]
    return float(math.prod(math.ceil(i / max(o, 1)) + 1 for i, o in zip(spatial, out_size)))


def _spatial_ops(op: Op) -> float:
    return float(2 ** max(op.args[0].dim() - 2, 1))


register({
    "sum": linear_sum(_reduced, extra=0.0),
    "mean": linear_sum(_reduced),
    "avg_pool1d": linear_sum(_window),
    "avg_pool2d": linear_sum(_window),
    "avg_pool3d": linear_sum(_window),
    "_adaptive_avg_pool2d": linear_sum(_adaptive_window),
    "_adaptive_avg_pool3d": linear_sum(_adaptive_window),
    "adaptive_avg_pool1d": linear_sum(_adaptive_window),
    "col2im": linear_sum(lambda op: float(math.prod(op.args[2]))),
    "upsample_linear1d": linear_sum(_spatial_ops),
    "upsample_bilinear2d": linear_sum(_spatial_ops),
    "upsample_trilinear3d": linear_sum(_spatial_ops),
})


