"""Rules for normalisation (batch norm in eval, layer norm) and softmax."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fcconv.certify.rounding.registry import (
    Bound,
    Op,
    Unsupported,
    rule_for,
    sum_bounds,
)


def _layer_norm_stats(op: Op, x: Tensor, normalized_shape: Sequence[int], eps: float) -> tuple[Any, ...]:
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    n = math.prod(normalized_shape)

    def stats() -> tuple[Any, ...]:
        mu = x.mean(dims, keepdim=True)
        r = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
        return dims, n, r, (x - mu) * r, x.abs().mean(dims, keepdim=True)

    return op.memo("stats", stats)


def normalized_bound(e: Tensor, xhat_abs: Tensor, r: Tensor, dims: tuple[int, ...]) -> Tensor:
    """A bound on the change of ``(x - mean) * rstd`` when ``x`` moves by at most ``e``."""
    return r * (e + e.mean(dims, keepdim=True) + xhat_abs * (xhat_abs * e).mean(dims, keepdim=True))


@rule_for("native_layer_norm")
def _r_layer_norm(op: Op, ch: int) -> tuple[Bound, Bound, Bound]:
    x, normalized_shape, w, b, eps = op.args[:5]
    dims, n, r, xhat, mean_abs = _layer_norm_stats(op, x, normalized_shape, float(eps))
    xa = op.memo("xhat_abs", xhat.abs)
    wa = 1.0 if w is None else op.abs(w)
    ex, ew, eb = op.e(x, ch), op.e(w, ch), op.e(b, ch)

    def rounding() -> Tensor:
        # centring: n eps mean|x|; variance and rsqrt: (n + 3) / 2 + 2 relative, plus the centring
        # error seen through the variance; then the affine map and the output.
        inner = xa * ((n + 3) / 2 + 2 + n * mean_abs * r) + r * (n + 1) * mean_abs
        out = inner * wa + 2 * op.abs(op.out[0])
        return out if b is None else out + op.abs(b)

    out = sum_bounds(
        None if ex is None else wa * normalized_bound(ex, xa, r, dims),
        None if ew is None else xa * ew,
        eb,
        op.rnd(ch, "own", rounding),
    )
    return (out, None, None)


# ---- normalisation and softmax --------------------------------------------------------------------


def channel_view(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape((1, -1) + (1,) * (like.dim() - 2))


def _batch_norm_eval(op: Op, ch: int, x: Tensor, w: Tensor | None, b: Tensor | None, mean: Tensor,
                     var: Tensor, eps: float) -> Bound:
    std = op.memo("std", lambda: channel_view(torch.sqrt(var + eps), x))
    wv = None if w is None else channel_view(w, x)
    scale = op.memo("scale", lambda: (1 / std) if wv is None else (wv.abs() / std))
    centred = op.memo("centred", lambda: (x - channel_view(mean, x)).abs())
    ex, ew, eb = op.e(x, ch), op.e(w, ch), op.e(b, ch)
    em, ev = op.e(mean, ch), op.e(var, ch)

    def rounding() -> Tensor:
        r = (op.abs(x) + channel_view(mean, x).abs()) * scale
        return r if b is None else r + channel_view(b, x).abs()

    return sum_bounds(
        None if ex is None else ex * scale,
        None if ew is None else channel_view(ew, x) * centred / std,
        None if eb is None else channel_view(eb, x),
        None if em is None else channel_view(em, x) * scale,
        None if ev is None else channel_view(ev, x) * centred * scale / (2 * std * std),
        op.rnd(ch, "own", rounding, factor=5.0),
    )


@rule_for("native_batch_norm", "cudnn_batch_norm")
def _r_batch_norm(op: Op, ch: int) -> tuple[Bound, ...]:
    x, w, b, mean, var, training, _momentum, eps = op.args[:8]
    if training or mean is None or var is None:
        raise Unsupported("batch norm in training mode")
    out = _batch_norm_eval(op, ch, x, w, b, mean, var, float(eps))
    return (out,) + (None,) * (len(op.out) - 1)


@rule_for("_native_batch_norm_legit_no_training")
def _r_batch_norm_legit(op: Op, ch: int) -> tuple[Bound, ...]:
    x, w, b, mean, var, _momentum, eps = op.args[:7]
    return (_batch_norm_eval(op, ch, x, w, b, mean, var, float(eps)),) + (None,) * (len(op.out) - 1)


@rule_for("_softmax")
def _r_softmax(op: Op, ch: int) -> Bound:
    x, dim = op.args[:2]
    s = op.out
    n = x.shape[dim] if x.dim() else 1
    e = op.e(x, ch)

    def rounding() -> Tensor:
        spread = x - x.amax(dim, keepdim=True)
        return s * (n + 5 + spread.abs()) + s * (s * spread.abs()).sum(dim, keepdim=True)

    return sum_bounds(None if e is None else s * (e + (s * e).sum(dim, keepdim=True)),
                      op.rnd(ch, "own", rounding))


@rule_for("_log_softmax")
def _r_log_softmax(op: Op, ch: int) -> Bound:
    x, dim = op.args[:2]
    n = x.shape[dim] if x.dim() else 1
    e = op.e(x, ch)
    s = op.memo("s", lambda: op.out.exp())
    return sum_bounds(
        None if e is None else e + (s * e).sum(dim, keepdim=True),
        op.rnd(ch, "own", lambda: 2 * (x - x.amax(dim, keepdim=True)).abs() + 2 * op.abs(op.out) + n + 2),
    )

