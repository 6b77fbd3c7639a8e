"""Rules for the backward ops that ``grad=True`` runs."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fcconv.certify.rounding.registry import (
    Bound,
    Op,
    Rule,
    Unsupported,
    register,
    rule_for,
    scale_bound,
    sum_bounds,
)
from fcconv.certify.rounding.rules_norm import channel_view, normalized_bound
from fcconv.certify.rounding.rules_reduce import linear_sum


@rule_for("convolution_backward")
def _r_convolution_backward(op: Op, ch: int) -> tuple[Bound, Bound, Bound]:
    g, x, w, bias_sizes = op.args[:4]
    params = tuple(op.args[4:10])
    mask = op.args[10]
    transposed, groups = params[3], params[5]
    if not mask[0]:
        return (None, None, None)

    def back(u: Tensor, v: Tensor) -> Tensor:
        return torch.ops.aten.convolution_backward.default(u, x, v, None, *params, [True, False, False])[0]

    # A gradient element sums over the output channels of its group and the kernel taps.
    fan_out = (w.shape[1] if transposed else w.shape[0] // groups) * math.prod(w.shape[2:])
    eg, ew = op.e(g, ch), op.e(w, ch)
    gi = sum_bounds(
        None if eg is None else back(eg, op.abs(w)),
        None if ew is None else back(op.abs(g), ew),
        op.rnd(ch, "dot", lambda: back(op.abs(g), op.abs(w)), factor=fan_out),
    )
    return (gi, None, None)


# ---- gradients of elementwise ops -----------------------------------------------------------------


@rule_for("threshold_backward")
def _r_threshold_backward(op: Op, ch: int) -> Bound:
    g, s, threshold = op.args[:3]
    eg = op.e(g, ch)
    kink = op.tracker.kink(s, ch, float(threshold))
    passed = None if eg is None else torch.where(s > threshold, eg, 0.0)
    if kink is None:
        return passed
    # Where a rounding could move the input across the threshold the gradient may pass or not.
    switched = op.abs(g) if eg is None else op.abs(g) + eg
    return torch.where(kink, switched, 0.0 if passed is None else passed)


@rule_for("hardtanh_backward")
def _r_hardtanh_backward(op: Op, ch: int) -> Bound:
    g, x, lo, hi = op.args[:4]
    eg, ex = op.e(g, ch), op.e(x, ch)
    passed = None if eg is None else torch.where((x > lo) & (x < hi), eg, 0.0)
    if ex is None:
        return passed
    kink = ((x - lo).abs() <= ex) | ((x - hi).abs() <= ex)
    switched = op.abs(g) if eg is None else op.abs(g) + eg
    return torch.where(kink, switched, 0.0 if passed is None else passed)


@rule_for("leaky_relu_backward")
def _r_leaky_relu_backward(op: Op, ch: int) -> Bound:
    g, x, slope = op.args[:3]
    slope = float(slope)
    eg = op.e(g, ch)
    factor = torch.where(x > 0, 1.0, abs(slope))
    kink = op.tracker.kink(x, ch)
    return sum_bounds(
        None if eg is None else eg * factor,
        None if kink is None else torch.where(kink, op.abs(g) * abs(1 - slope), 0.0),
        op.rnd(ch, "own", lambda: op.abs(op.out)),
    )


def _smooth_backward(first: float, second: Callable[[Op], Tensor | float],
                     rounding: Callable[[Op], Tensor], uses_output: bool = False) -> Rule:
    """``g * f'(x)``: ``|f'| E(g) + |g| |f''| E(x)`` plus rounding."""
    def rule(op: Op, ch: int) -> Bound:
        g, x = op.args[:2]
        eg, ex = op.e(g, ch), op.e(x, ch)
        return sum_bounds(
            scale_bound(eg, first),
            None if ex is None else op.abs(g) * ex * op.memo("second", lambda: second(op)),
            op.rnd(ch, "own", lambda: rounding(op)),
        )
    return rule


register({
    "gelu_backward": _smooth_backward(1.13, lambda op: 0.8, lambda op: 8 * op.abs(op.args[0])),
    "silu_backward": _smooth_backward(
        1.1, lambda op: 0.5, lambda op: 8 * op.abs(op.args[0]) * (1 + op.abs(op.args[1]))),
    # For these the saved tensor is the output s: f' = s(1-s) or 1-s^2, d f'/ds = 1-2s or -2s.
    "sigmoid_backward": _smooth_backward(
        0.25, lambda op: (1 - 2 * op.args[1]).abs(), lambda op: 4 * op.abs(op.args[0])),
    "tanh_backward": _smooth_backward(
        1.0, lambda op: 2 * op.abs(op.args[1]), lambda op: 8 * op.abs(op.args[0])),
})


@rule_for("hardswish_backward")
def _r_hardswish_backward(op: Op, ch: int) -> Bound:
    # f' = 0 below -3, (2x + 3) / 6 between, 1 above; f' jumps by 1/2 at both ends.
    g, x = op.args[:2]
    eg, ex = op.e(g, ch), op.e(x, ch)
    middle = (x >= -3) & (x <= 3)
    slope = op.memo("slope", lambda: torch.where(middle, ((2 * x + 3) / 6).abs(), (x > 3).to(x.dtype)))
    return sum_bounds(
        None if eg is None else eg * slope,
        None if ex is None else op.abs(g) * ex * torch.where(middle, 1 / 3, 0.0)
        + torch.where(((x + 3).abs() <= ex) | ((x - 3).abs() <= ex), 0.5 * op.abs(g), 0.0),
        op.rnd(ch, "own", lambda: 4 * op.abs(g) * (slope + op.abs(x) / 3)),
    )


@rule_for("hardsigmoid_backward")
def _r_hardsigmoid_backward(op: Op, ch: int) -> Bound:
    g, x = op.args[:2]
    eg, ex = op.e(g, ch), op.e(x, ch)
    middle = (x > -3) & (x < 3)
    return sum_bounds(
        None if eg is None else torch.where(middle, eg / 6, 0.0),
        None if ex is None else torch.where(((x + 3).abs() <= ex) | ((x - 3).abs() <= ex),
                                            op.abs(g) / 6, 0.0),
        op.rnd(ch, "own", lambda: op.abs(g) / 3),
    )


@rule_for("softplus_backward")
def _r_softplus_backward(op: Op, ch: int) -> Bound:
    g, x, beta = op.args[:3]
    eg, ex = op.e(g, ch), op.e(x, ch)
    return sum_bounds(eg, None if ex is None else op.abs(g) * ex * abs(float(beta)) / 4,
                      op.rnd(ch, "own", lambda: 4 * op.abs(g)))


@rule_for("native_layer_norm_backward")
def _r_layer_norm_backward(op: Op, ch: int) -> tuple[Bound, Bound, Bound]:
    g, x, normalized_shape, mean, rstd, w, _b, mask = op.args[:8]
    if not mask[0]:
        return (None, None, None)
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    n = math.prod(normalized_shape)
    # The saved statistics (rstd includes layer norm's eps), broadcast over the normalised dims.
    r = rstd.reshape(rstd.shape + (1,) * (x.dim() - rstd.dim())) if rstd.dim() < x.dim() else rstd
    xhat = op.memo("xhat", lambda: (x - mean.reshape(r.shape)) * r)
    xa = op.memo("xhat_abs", xhat.abs)
    wa = 1.0 if w is None else op.abs(w)
    ghat = op.memo("ghat", lambda: g * w if w is not None else g)
    ga = op.memo("ghat_abs", ghat.abs)
    gi = op.out[0]
    eg, ew, ex = op.e(g, ch), op.e(w, ch), op.e(x, ch)
    terms: list[Bound] = []
    for e_hat in (None if eg is None else wa * eg, None if ew is None else op.abs(g) * ew):
        if e_hat is not None:
            terms.append(r * (e_hat + e_hat.mean(dims, keepdim=True)
                              + xa * (e_hat * xa).mean(dims, keepdim=True)))
    if ex is not None:
        d = normalized_bound(ex, xa, r, dims)
        terms.append((xa * d).mean(dims, keepdim=True) * gi.abs()
                     + r * (d * (ghat * xhat).mean(dims, keepdim=True).abs()
                            + xa * (ga * d).mean(dims, keepdim=True)))
    mean_abs = op.memo("mean_abs", lambda: x.abs().mean(dims, keepdim=True))
    terms.append(op.rnd(ch, "own", lambda: (1 + mean_abs * r) * (
        r * (ga + ga.mean(dims, keepdim=True) + xa * (ga * xa).mean(dims, keepdim=True)) + gi.abs()),
        factor=n + 4))
    return (sum_bounds(*terms), None, None)


_AVG_BACKWARD = {"max_pool2d_with_indices_backward": torch.ops.aten.avg_pool2d_backward.default,
                 "max_pool3d_with_indices_backward": torch.ops.aten.avg_pool3d_backward.default}
_MAX_POOL = {"max_pool2d_with_indices_backward": torch.ops.aten.max_pool2d_with_indices.default,
             "max_pool3d_with_indices_backward": torch.ops.aten.max_pool3d_with_indices.default}


@rule_for("max_pool2d_with_indices_backward", "max_pool3d_with_indices_backward")
def _r_max_pool_backward(op: Op, ch: int) -> Bound:
    g, x, kernel, stride, padding, dilation, ceil_mode, indices = op.args[:8]
    name = op.func.overloadpacket.__name__
    eg, ex = op.e(g, ch), op.e(x, ch)
    k = float(math.prod(kernel))
    prop = sum_bounds(
        None if eg is None else op.func(eg, *op.args[1:], **op.kwargs),
        op.rnd(ch, "own", lambda: op.func(op.abs(g), *op.args[1:], **op.kwargs), factor=k),
    )
    if ex is None:
        return prop
    if any(d != 1 for d in dilation):
        raise Unsupported("dilated max-pool gradient")
    # A window whose two largest values lie within rounding of each other may send its gradient to
    # either position: add |g| (and its bound) to every position of such a window.
    top1 = x.flatten(2).gather(2, indices.flatten(2)).view_as(indices)
    masked = x.flatten(2).scatter(2, indices.flatten(2), -math.inf).view_as(x)
    pool = _MAX_POOL[name]
    top2 = pool(masked, kernel, stride, padding, dilation, ceil_mode)[0]
    reach = pool(ex, kernel, stride, padding, dilation, ceil_mode)[0]
    contested = (top1 - top2) <= 2 * reach
    if not bool(contested.any()):
        return prop
    moved = torch.where(contested, op.abs(g) if eg is None else op.abs(g) + eg, 0.0)
    spread = _AVG_BACKWARD[name](moved, x, kernel, stride, padding, ceil_mode, True, 1)
    return sum_bounds(prop, spread)


@rule_for("native_batch_norm_backward")
def _r_batch_norm_backward(op: Op, ch: int) -> tuple[Bound, Bound, Bound]:
    g, x, w, mean, var, _sm, _si, train, eps = op.args[:9]
    if train or var is None:
        raise Unsupported("batch norm gradient in training mode")
    std = channel_view(torch.sqrt(var + float(eps)), x)
    scale = (1 / std) if w is None else channel_view(w, x).abs() / std
    eg, ew, ev = op.e(g, ch), op.e(w, ch), op.e(var, ch)
    gi = sum_bounds(
        None if eg is None else eg * scale,
        None if ew is None else op.abs(g) * channel_view(ew, x) / std,
        None if ev is None else op.abs(g) * scale * channel_view(ev, x) / (2 * std * std),
        op.rnd(ch, "own", lambda: op.abs(g) * scale, factor=4.0),
    )
    return (gi, None, None)


@rule_for("_softmax_backward_data")
def _r_softmax_backward(op: Op, ch: int) -> Bound:
    g, s, dim = op.args[:3]
    n = s.shape[dim] if s.dim() else 1
    eg, es = op.e(g, ch), op.e(s, ch)
    gs = op.memo("gs", lambda: (g * s).sum(dim, keepdim=True))
    return sum_bounds(
        None if eg is None else s * eg + s * (s * eg).sum(dim, keepdim=True),
        None if es is None else (g - gs).abs() * es + s * (op.abs(g) * es).sum(dim, keepdim=True),
        op.rnd(ch, "own", lambda: s * (op.abs(g) + (op.abs(g) * s).sum(dim, keepdim=True)), factor=n + 3),
    )


@rule_for("_log_softmax_backward_data")
def _r_log_softmax_backward(op: Op, ch: int) -> Bound:
    g, out, dim = op.args[:3]
    n = out.shape[dim] if out.dim() else 1
    eg, eo = op.e(g, ch), op.e(out, ch)
    s = op.memo("s", lambda: out.exp())
    gsum = op.memo("gsum", lambda: g.sum(dim, keepdim=True))
    return sum_bounds(
        None if eg is None else eg + s * eg.sum(dim, keepdim=True),
        None if eo is None else gsum.abs() * s * eo,
        op.rnd(ch, "own", lambda: op.abs(op.out) + s * op.abs(g).sum(dim, keepdim=True), factor=n + 3),
    )


def _backward_window(op: Op) -> float:
    return float(math.prod(op.args[2]))


# The backward of average pools and padding: linear sums of the gradient.
register({
    "avg_pool2d_backward": linear_sum(_backward_window),
    "avg_pool3d_backward": linear_sum(_backward_window),
    "_adaptive_avg_pool2d_backward": linear_sum(lambda op: float(2 ** (op.args[1].dim() - 2)) + 1),
    "_adaptive_avg_pool3d_backward": linear_sum(lambda op: float(2 ** (op.args[1].dim() - 2)) + 1),
    "reflection_pad1d_backward": linear_sum(lambda op: 3.0),
    "reflection_pad2d_backward": linear_sum(lambda op: 9.0),
    "reflection_pad3d_backward": linear_sum(lambda op: 27.0),
    "replication_pad1d_backward": linear_sum(lambda op: float(1 + max(op.args[2]))),
    "replication_pad2d_backward": linear_sum(lambda op: float((1 + max(op.args[2])) ** 2)),
    "replication_pad3d_backward": linear_sum(lambda op: float((1 + max(op.args[2])) ** 3)),
})
