"""Rules for dot products: ``mm``, ``addmm`` and friends, convolution."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fcconv.certify.rounding.registry import (
    Bound,
    Op,
    rule_for,
    scale_bound,
    sum_bounds,
)

# ---- dot products ----------------------------------------------------------------------------------


def _product_rule(op: Op, ch: int, prod: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor,
                  k: int, c: Tensor | None = None, alpha: float = 1.0, beta: float = 1.0) -> Bound:
    """``beta * c + alpha * prod(a, b)``, a sum of ``k`` products (plus ``c``) per element."""
    alpha, beta = abs(float(alpha)), abs(float(beta))
    if beta == 0:
        c = None
    ea, eb, ec = op.e(a, ch), op.e(b, ch), op.e(c, ch)
    n = k + (c is not None)

    def magnitude() -> Tensor:
        m = prod(op.abs(a), op.abs(b)) * alpha
        return m if c is None else m + op.abs(c) * beta

    return sum_bounds(
        None if eb is None else prod(op.abs(a), eb) * alpha,
        None if ea is None else prod(ea, op.abs(b)) * alpha,
        scale_bound(ec, beta),
        op.rnd(ch, "dot", magnitude, factor=n),
    )


@rule_for("mm", "bmm", "mv", "dot", "vdot")
def _r_mm(op: Op, ch: int) -> Bound:
    a, b = op.args[:2]
    return _product_rule(op, ch, op.func, a, b, a.shape[-1])


_PRODUCTS = {"addmm": torch.ops.aten.mm.default, "baddbmm": torch.ops.aten.bmm.default,
             "addmv": torch.ops.aten.mv.default}


@rule_for("addmm", "baddbmm", "addmv")
def _r_addmm(op: Op, ch: int) -> Bound:
    c, a, b = op.args[:3]
    prod = _PRODUCTS[op.func.overloadpacket.__name__]
    return _product_rule(op, ch, prod, a, b, a.shape[-1], c,
                         alpha=op.kwargs.get("alpha", 1), beta=op.kwargs.get("beta", 1))


def _conv_params(op: Op) -> tuple[Any, ...]:
    return tuple(op.args[3:9])  # stride, padding, dilation, transposed, output_padding, groups


@rule_for("convolution", "_convolution")
def _r_convolution(op: Op, ch: int) -> Bound:
    x, w, b = op.args[:3]
    params = _conv_params(op)
    transposed, groups = params[3], params[5]

    def conv(u: Tensor, v: Tensor) -> Tensor:
        return torch.ops.aten.convolution.default(u, v, None, *params)

    fan_in = (w.shape[0] // groups if transposed else w.shape[1]) * math.prod(w.shape[2:])
    n = fan_in + (b is not None)
    ex, ew, eb = op.e(x, ch), op.e(w, ch), op.e(b, ch)
    per_channel = (1, -1) + (1,) * (x.dim() - 2)

    def magnitude() -> Tensor:
        m = conv(op.abs(x), op.abs(w))
        return m if b is None else m + op.abs(b).reshape(per_channel)

    return sum_bounds(
        None if ex is None else conv(ex, op.abs(w)),
        None if ew is None else conv(op.abs(x), ew),
        None if eb is None else eb.reshape(per_channel),
        op.rnd(ch, "dot", magnitude, factor=n),
    )

