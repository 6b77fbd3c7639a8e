"""Rules for reductions, average pooling and interpolation: linear sums of their input."""

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

# ---- reductions, pooling, resampling --------------------------------------------------------------


def _linear_sum(count: Callable[[Op], float], extra: float = 1.0) -> Rule:
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


def _backward_window(op: Op) -> float:
    return float(math.prod(op.args[2]))


def _spatial_ops(op: Op) -> float:
    return float(2 ** max(op.args[0].dim() - 2, 1))


register({
    "sum": _linear_sum(_reduced, extra=0.0),
    "mean": _linear_sum(_reduced),
    "avg_pool1d": _linear_sum(_window),
    "avg_pool2d": _linear_sum(_window),
    "avg_pool3d": _linear_sum(_window),
    "_adaptive_avg_pool2d": _linear_sum(_adaptive_window),
    "_adaptive_avg_pool3d": _linear_sum(_adaptive_window),
    "adaptive_avg_pool1d": _linear_sum(_adaptive_window),
    "avg_pool2d_backward": _linear_sum(_backward_window),
    "avg_pool3d_backward": _linear_sum(_backward_window),
    "_adaptive_avg_pool2d_backward": _linear_sum(lambda op: float(2 ** (op.args[1].dim() - 2)) + 1),
    "_adaptive_avg_pool3d_backward": _linear_sum(lambda op: float(2 ** (op.args[1].dim() - 2)) + 1),
    "reflection_pad1d_backward": _linear_sum(lambda op: 3.0),
    "reflection_pad2d_backward": _linear_sum(lambda op: 9.0),
    "reflection_pad3d_backward": _linear_sum(lambda op: 27.0),
    "replication_pad1d_backward": _linear_sum(lambda op: float(1 + max(op.args[2]))),
    "replication_pad2d_backward": _linear_sum(lambda op: float((1 + max(op.args[2])) ** 2)),
    "replication_pad3d_backward": _linear_sum(lambda op: float((1 + max(op.args[2])) ** 3)),
    "col2im": _linear_sum(lambda op: float(math.prod(op.args[2]))),
    "upsample_linear1d": _linear_sum(_spatial_ops),
    "upsample_bilinear2d": _linear_sum(_spatial_ops),
    "upsample_trilinear3d": _linear_sum(_spatial_ops),
})


