"""The rule registry of the rounding tracker: bounds, the view of one ATen call, ``rule_for``.

A rule ``rule(op, ch)`` returns the bound of the op's output in channel ``ch`` (a tuple for several
outputs) from the inputs' bounds (``op.e``), magnitudes (``op.abs``) and the op's own rounding
(``op.rnd``). Rules register with ``@rule_for("aten_name", ...)``; the families live in ``rules_*.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from torch import Tensor

__all__ = ["CREATION", "PRODUCT_OPS", "RULES", "Bound", "Op", "Rule", "TrackerView", "Unsupported",
           "floating", "register", "rule_for", "scale_bound", "sum_bounds"]


Bound = Tensor | None
"""A bound on a tensor's rounding error: a float64 tensor of its shape, or None for exactly zero."""


class Unsupported(Exception):
    """Raised by a rule for a call it has no bound for; the tracker then stops propagating."""


def sum_bounds(*terms: Bound) -> Bound:
    """The sum of the bounds, None when all are None."""
    total: Bound = None
    for t in terms:
        if t is not None:
            total = t if total is None else total + t
    return total


def scale_bound(t: Bound, s: float | Tensor) -> Bound:
    """``t * s``, None when ``t`` is None."""
    return None if t is None else t * s


def floating(t: object) -> bool:
    """Whether ``t`` is a floating-point tensor (the only kind that carries a bound)."""
    return isinstance(t, Tensor) and t.is_floating_point()


class _AbsLookup(Protocol):
    def get(self, t: Tensor) -> Tensor | None: ...


class TrackerView(Protocol):
    """What a rule sees of the tracker (``tracker.Tracker`` provides it; the registry imports none of it)."""

    @property
    def eps(self) -> Sequence[float]: ...
    @property
    def abs_cache(self) -> _AbsLookup | None: ...

    def bound(self, t: Tensor, ch: int) -> Bound: ...
    def aux(self, t: Tensor) -> list[Bound] | None: ...
    def kink(self, t: Tensor, ch: int, at: float = 0.0) -> Bound: ...


class Op:
    """One ATen call seen by the tracker: its arguments, output, and shared magnitudes."""

    def __init__(self, tracker: TrackerView, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        self.tracker = tracker
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.out = out
        self.aux: list[Bound] | None = None  # per channel: where a kink is within reach
        self._memo: dict[Any, Any] = {}

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def e(self, t: object, ch: int) -> Bound:
        return self.tracker.bound(t, ch) if isinstance(t, Tensor) else None

    def memo(self, key: Any, fn: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def abs(self, t: Tensor) -> Tensor:
        cache = self.tracker.abs_cache
        if cache is not None:
            cached = cache.get(t)
            if cached is not None:
                return cached
        return self.memo(("abs", id(t)), t.abs)

    def rnd(self, ch: int, key: str, fn: Callable[[], Tensor | None], factor: float = 1.0) -> Bound:
        """``eps * factor * fn()``: the rounding this op adds (none in the parameter channel)."""
        eps = self.tracker.eps[ch]
        if eps == 0:
            return None
        magnitude = self.memo(key, fn)
        return None if magnitude is None else magnitude * (eps * factor)

    def set_aux(self, ch: int, mask: Bound) -> None:
        if self.aux is None:
            self.aux = [None] * len(self.tracker.eps)
        self.aux[ch] = mask


Rule = Callable[[Op, int], Any]
RULES: dict[str, Rule] = {}


def register(table: dict[str, Rule]) -> None:
    """Register a rule per ATen op name; a name registered twice is a bug, caught at import."""
    for name, fn in table.items():
        if name in RULES:
            raise RuntimeError(f"two rounding rules for aten.{name}")
        RULES[name] = fn


def rule_for(*names: str) -> Callable[[Rule], Rule]:
    """Decorator: ``fn`` is the rule of each of the ATen ops ``names``."""
    def decorate(fn: Rule) -> Rule:
        register(dict.fromkeys(names, fn))
        return fn
    return decorate


# Creation ops: their values do not come from rounded data.
CREATION = frozenset({
    "empty", "empty_strided", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full",
    "full_like", "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full", "scalar_tensor",
    "arange", "eye", "linspace",
})


# Ops whose output sums products of their inputs: an input bound that passes through one of them
# has been through a second rounded dot product, and worst-case bounds compound from there on.
PRODUCT_OPS = frozenset({
    "mm", "bmm", "mv", "dot", "vdot", "addmm", "baddbmm", "addmv", "convolution", "_convolution",
    "convolution_backward",
})

