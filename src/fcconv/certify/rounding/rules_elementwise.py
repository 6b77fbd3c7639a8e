"""Rules for elementwise arithmetic and activations."""

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

_F64 = torch.float64


# ---- elementwise ----------------------------------------------------------------------------------


def _alpha(op: Op) -> float:
    return abs(float(op.arg(2, "alpha", 1)))


@rule_for("add", "sub")
def _r_add(op: Op, ch: int) -> Bound:
    a, b = op.args[:2]
    return sum_bounds(op.e(a, ch), scale_bound(op.e(b, ch), _alpha(op)),
                      op.rnd(ch, "out", lambda: op.abs(op.out)))


@rule_for("rsub")
def _r_rsub(op: Op, ch: int) -> Bound:
    a, b = op.args[:2]
    return sum_bounds(scale_bound(op.e(a, ch), _alpha(op)), op.e(b, ch),
                      op.rnd(ch, "out", lambda: op.abs(op.out)))


def _power_of_two(v: Tensor | float) -> Tensor | bool:
    """Where ``v`` is 0 or +-2**k: multiplying or dividing by it is exact (barring under/overflow)."""
    if isinstance(v, Tensor):
        if not v.is_floating_point():  # an integer or bool operand (x / torch.tensor([2, 3]))
            v = v.double()
        return (v == 0) | (torch.frexp(v).mantissa.abs() == 0.5)
    return v == 0 or math.frexp(float(v))[0] in (0.5, -0.5)


def _rounded_out(op: Op, *factors: Tensor | float) -> Tensor | None:
    """``|out|`` where the result is rounded, 0 where a factor is a power of two (None: exact)."""
    exact: Tensor | bool = False
    for f in factors:
        exact = exact | _power_of_two(f)
    if isinstance(exact, Tensor) and bool(exact.all()):
        exact = True
    if exact is True:
        return None
    if exact is False:
        return op.abs(op.out)
    return torch.where(exact, 0.0, op.abs(op.out))


@rule_for("mul")
def _r_mul(op: Op, ch: int) -> Bound:
    a, b = op.args[:2]
    ea, eb = op.e(a, ch), op.e(b, ch)
    return sum_bounds(
        None if ea is None else ea * (op.abs(b) if isinstance(b, Tensor) else abs(b)),
        None if eb is None else eb * op.abs(a),
        op.rnd(ch, "out", lambda: _rounded_out(op, a, b)),
    )


@rule_for("div")
def _r_div(op: Op, ch: int) -> Bound:
    if op.kwargs.get("rounding_mode") is not None or len(op.args) > 2:
        raise Unsupported("div with rounding_mode")
    a, b = op.args[:2]
    ea, eb = op.e(a, ch), op.e(b, ch)
    babs = op.abs(b) if isinstance(b, Tensor) else abs(b)
    return sum_bounds(
        None if ea is None else ea / babs,
        None if eb is None else eb * op.abs(op.out) / babs,
        op.rnd(ch, "out", lambda: _rounded_out(op, b)),
    )


@rule_for("maximum", "minimum", "fmax", "fmin")
def _r_maximum(op: Op, ch: int) -> Bound:
    ea, eb = op.e(op.args[0], ch), op.e(op.args[1], ch)
    if ea is None or eb is None:
        return ea if eb is None else eb
    return torch.maximum(ea, eb)


@rule_for("neg", "abs", "clamp", "clamp_min", "clamp_max", "hardtanh")
def _r_lipschitz1(op: Op, ch: int) -> Bound:
    # Exact 1-Lipschitz maps; tensor bounds of clamp add their own error.
    return sum_bounds(op.e(op.args[0], ch), *(op.e(a, ch) for a in op.args[1:3] if isinstance(a, Tensor)))


@rule_for("relu")
def _r_relu(op: Op, ch: int) -> Bound:
    x = op.args[0]
    e = op.e(x, ch)
    if e is not None:
        op.set_aux(ch, op.abs(x) <= e)
    return e


@rule_for("threshold")
def _r_threshold(op: Op, ch: int) -> Bound:
    x, threshold, value = op.args[:3]
    e = op.e(x, ch)
    if e is None:
        return None
    kink = (x - threshold).abs() <= e
    return e + torch.where(kink, abs(float(threshold) - float(value)), 0.0)


@rule_for("leaky_relu")
def _r_leaky_relu(op: Op, ch: int) -> Bound:
    slope = abs(float(op.arg(1, "negative_slope", 0.01)))
    return sum_bounds(scale_bound(op.e(op.args[0], ch), max(1.0, slope)),
                      op.rnd(ch, "out", lambda: op.abs(op.out)))


@rule_for("_prelu_kernel")
def _r_prelu(op: Op, ch: int) -> Bound:
    x, w = op.args[:2]
    ex, ew = op.e(x, ch), op.e(w, ch)
    positive = x > 0
    return sum_bounds(
        None if ex is None else torch.where(positive, ex, ex * op.abs(w)),
        None if ew is None else torch.where(positive, 0.0, ew * op.abs(x)),
        op.rnd(ch, "out", lambda: op.abs(op.out)),
    )


def _unary(deriv: Callable[[Op], Tensor | float], rounding: Callable[[Op], Tensor]) -> Rule:
    """``|f'(x)| E(x)`` plus the op's own rounding, ``eps * rounding``."""
    def rule(op: Op, ch: int) -> Bound:
        e = op.e(op.args[0], ch)
        prop = None if e is None else e * op.memo("deriv", lambda: deriv(op))
        return sum_bounds(prop, op.rnd(ch, "own", lambda: rounding(op)))
    return rule


def _out(op: Op) -> Tensor:
    return op.abs(op.out)


def _x(op: Op) -> Tensor:
    return op.abs(op.args[0])


def _pow_guard(rule: Rule) -> Rule:
    def guarded(op: Op, ch: int) -> Bound:
        if not isinstance(op.args[0], Tensor) or isinstance(op.args[1], Tensor):
            raise Unsupported("pow with a tensor exponent")
        return rule(op, ch)
    return guarded


# Derivative magnitudes (exact, from the float64 values, or a global Lipschitz constant) and the
# op's own rounding in units of eps: a few units of |f(x)| for correctly-rounded-ish libm functions,
# plus |x| where the formula cancels (gelu, elu, hardswish for large negative x).
register({
    "sigmoid": _unary(lambda op: op.out * (1 - op.out), lambda op: 4 * _out(op)),
    "tanh": _unary(lambda op: 1 - op.out * op.out, lambda op: 4 * _out(op)),
    "exp": _unary(_out, lambda op: 4 * _out(op)),
    "log": _unary(lambda op: 1 / _x(op), lambda op: 4 * _out(op)),
    "sqrt": _unary(lambda op: 0.5 / _out(op), lambda op: 2 * _out(op)),
    "rsqrt": _unary(lambda op: 0.5 * _out(op) ** 3, lambda op: 4 * _out(op)),
    "reciprocal": _unary(lambda op: op.out * op.out, lambda op: 2 * _out(op)),
    "sin": _unary(lambda op: 1.0, lambda op: 4 * _out(op) + 4 * torch.finfo(_F64).tiny),
    "cos": _unary(lambda op: 1.0, lambda op: 4 * _out(op) + 4 * torch.finfo(_F64).tiny),
    "erf": _unary(lambda op: 1.13, lambda op: 4 * _out(op)),
    "gelu": _unary(lambda op: 1.13, lambda op: 4 * (_out(op) + _x(op))),
    "silu": _unary(lambda op: 1.1, lambda op: 6 * _out(op)),
    "mish": _unary(lambda op: 1.2, lambda op: 8 * (_out(op) + _x(op))),
    "softplus": _unary(lambda op: 1.0, lambda op: 6 * _out(op)),
    "hardsigmoid": _unary(lambda op: 1 / 6, lambda op: 4 * (_out(op) + _x(op))),
    "hardswish": _unary(lambda op: 1.5, lambda op: 4 * (_out(op) + _x(op))),
    "elu": _unary(
        lambda op: torch.where(op.args[0] > 0,
                               abs(float(op.arg(2, "scale", 1.0)) * float(op.arg(3, "input_scale", 1.0))),
                               (op.out + abs(float(op.arg(1, "alpha", 1.0)) * float(op.arg(2, "scale", 1.0))))
                               .abs() * abs(float(op.arg(3, "input_scale", 1.0)))),
        lambda op: 4 * (_out(op) + abs(float(op.arg(1, "alpha", 1.0)) * float(op.arg(2, "scale", 1.0))))),
    "pow": _pow_guard(_unary(
        lambda op: abs(float(op.args[1])) * _x(op) ** (float(op.args[1]) - 1),
        lambda op: 4 * _out(op))),
})
