"""First-order rounding-error propagation over ATen ops: the machinery behind :mod:`fcconv.verify`'s bounds.

Private: nothing here is public API. :func:`fcconv.verify.compare` runs the float64 copies of both
modules under a :class:`Tracker`; the rules it applies are described, op by op, in the
:mod:`fcconv.verify` docstring ("How the bound is derived"). This module holds how they are applied:

* **Bounds.** Next to each floating tensor ``t`` the tracker keeps ``E(t)``, a float64 tensor of
  ``t``'s shape bounding ``|t_computed - t_exact|`` to first order in the unit roundoff, or None
  where it is exactly zero (:data:`Bound`; combined with :func:`sum_bounds` and :func:`scale_bound`).
  Tensors without an entry (inputs, parameters) are exact.
* **Channels.** ``Tracker(eps)`` propagates one bound per entry of ``eps`` through the same ops; they
  differ only in the rounding each op adds (``eps`` times a magnitude). ``compare`` uses the working
  dtype's epsilon and float64's; a channel with ``eps = 0`` adds none and only carries the
  ``initial`` bounds of the parameters (the parameter-rounding allowance).
* **Rules.** ``_RULES`` maps an ATen op name to ``rule(op, ch)``, which returns the bound of the
  op's output in channel ``ch`` (a tuple for several outputs) from the inputs' bounds (``op.e``),
  magnitudes (``op.abs``; ``|W|`` of the parameters computed once per storage by :class:`AbsCache`)
  and the op's own rounding (``op.rnd``). Rules are registered with ``@_rule("name", ...)``. An op
  without a rule (creation ops aside), or a rule that fails, ends the propagation: the tracker then
  names the op in ``Tracker.unsupported`` and its bounds must not be used.
* **Writes.** An in-place op is followed through its out-of-place form; a write into a tensor updates
  the bounds of every tracked tensor that shares its storage (its base, other views).
* **Compounding.** A bound that has been through more than one rounded dot product is marked
  :meth:`Tracker.deep`: from there on the worst case compounds and the bound is valid but loose.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["AbsCache", "Bound", "Tracker", "scale_bound", "sum_bounds"]

_F64 = torch.float64

Bound = Tensor | None
"""A bound on a tensor's rounding error: a float64 tensor of its shape, or None for exactly zero."""


class _Unsupported(Exception):
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


def _floating(t: object) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


class _Op:
    """One ATen call seen by the tracker: its arguments, output, and shared magnitudes."""

    def __init__(self, tracker: Tracker, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
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


_Rule = Callable[[_Op, int], Any]
_RULES: dict[str, _Rule] = {}


def _rule(*names: str) -> Callable[[_Rule], _Rule]:
    def register(fn: _Rule) -> _Rule:
        for name in names:
            _RULES[name] = fn
        return fn
    return register


# Creation ops: their values do not come from rounded data.
_CREATION = frozenset({
    "empty", "empty_strided", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full",
    "full_like", "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full", "scalar_tensor",
    "arange", "eye", "linspace",
})


# Ops whose output sums products of their inputs: an input bound that passes through one of them
# has been through a second rounded dot product, and worst-case bounds compound from there on.
_PRODUCT_OPS = frozenset({
    "mm", "bmm", "mv", "dot", "vdot", "addmm", "baddbmm", "addmv", "convolution", "_convolution",
    "convolution_backward",
})


class _Entry:
    """A tracked tensor: its bound per channel, where a kink is in reach, and whether the bound has
    been through more than one rounded dot product."""

    __slots__ = ("t", "bounds", "aux", "deep")

    def __init__(self, t: Tensor, bounds: list[Bound], aux: list[Bound] | None, deep: bool) -> None:
        self.t, self.bounds, self.aux, self.deep = t, bounds, aux, deep


def _tensors(args: Sequence[Any], kwargs: dict) -> list[Tensor]:
    found = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(t for t in a if isinstance(t, Tensor))
    return found


def _storage_key(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class AbsCache:
    """``|t|`` for views of the float64 copies' parameters, computed once per storage for all passes
    (the parameters are never written during a comparison)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.owners = {_storage_key(t): t for m in modules for t in list(m.parameters()) + list(m.buffers())
                       if t.is_floating_point() and t.numel()}
        self.cache: dict[tuple[str, int], Tensor] = {}

    def get(self, t: Tensor) -> Tensor | None:
        if not t.is_floating_point() or not t.numel():
            return None
        key = _storage_key(t)
        owner = self.owners.get(key)
        if owner is None or owner.dtype != t.dtype:
            return None
        if key not in self.cache:
            flat = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())
            self.cache[key] = flat.abs()
        return self.cache[key].as_strided(t.shape, t.stride(), t.storage_offset())


class Tracker(TorchDispatchMode):
    """Carries a first-order bound on the rounding error next to every tensor of one pass.

    ``eps`` has one entry per channel: channels share the op-by-op propagation and differ in the
    rounding they add (working dtype, float64, or none for the parameter channel, whose sources are
    the ``initial`` bounds of the parameters). Tensors without an entry are exact.
    """

    def __init__(self, eps: Sequence[float], initial: dict[int, tuple[Tensor, list[Bound]]] | None = None,
                 abs_cache: AbsCache | None = None):
        super().__init__()
        self.eps = tuple(eps)
        self.abs_cache = abs_cache
        self.entries: dict[int, _Entry] = {
            k: _Entry(t, b, None, False) for k, (t, b) in (initial or {}).items()
        }
        self.unsupported: str | None = None

    # -- lookups -------------------------------------------------------------------------------------
    def _entry(self, t: Tensor) -> _Entry | None:
        entry = self.entries.get(id(t))
        return entry if entry is not None and entry.t is t else None

    def bound(self, t: Tensor, ch: int) -> Bound:
        entry = self._entry(t)
        return None if entry is None else entry.bounds[ch]

    def bounds(self, t: Tensor) -> list[Bound]:
        entry = self._entry(t)
        return [None] * len(self.eps) if entry is None else list(entry.bounds)

    def deep(self, t: Tensor) -> bool:
        entry = self._entry(t)
        return entry is not None and entry.deep

    def aux(self, t: Tensor) -> list[Bound] | None:
        entry = self._entry(t)
        return None if entry is None else entry.aux

    def kink(self, t: Tensor, ch: int, at: float = 0.0) -> Bound:
        """Where a rounding could move ``t`` across ``at`` (a ReLU input's sign), per channel."""
        aux = self.aux(t)
        if aux is not None and at == 0.0:
            return aux[ch]
        e = self.bound(t, ch)
        return None if e is None else (t - at).abs() <= e

    def _store(self, t: Any, bounds: list[Any], aux: list[Bound] | None, deep: bool) -> None:
        if isinstance(t, (tuple, list)):
            for i, item in enumerate(t):
                self._store(item, [None if b is None else b[i] for b in bounds], None, deep)
            return
        if not _floating(t):
            return
        if all(b is None for b in bounds) and aux is None:
            self.entries.pop(id(t), None)
            return
        shaped = [None if b is None else (b if b.shape == t.shape else b.expand(t.shape)) for b in bounds]
        self.entries[id(t)] = _Entry(t, shaped, aux, deep)

    def _mutated(self, target: Tensor, bounds: list[Bound], aux: list[Bound] | None, deep: bool) -> None:
        """Record new values written into ``target``: every tensor sharing its storage (its base, other
        views, detached aliases) sees them too, so their bounds are re-read from the storage."""
        key = _storage_key(target)
        sharing = [e for e in self.entries.values() if e.t is not target and e.t.numel()
                   and _storage_key(e.t) == key]
        base = target._base
        if base is not None and _floating(base) and self._entry(base) is None:
            sharing.append(_Entry(base, [None] * len(self.eps), None, False))
        if not sharing:
            self._store(target, bounds, aux, deep)
            return
        numel = target.untyped_storage().nbytes() // target.element_size()
        laid_out = []
        for ch in range(len(self.eps)):
            laid = torch.zeros(numel, dtype=_F64, device=target.device)
            for e in sharing:
                known = e.bounds[ch]
                if known is not None:
                    laid.as_strided(e.t.shape, e.t.stride(), e.t.storage_offset()).copy_(known)
            new = bounds[ch]
            view = laid.as_strided(target.shape, target.stride(), target.storage_offset())
            view.copy_(new.expand(target.shape) if new is not None else torch.zeros((), dtype=_F64))
            laid_out.append(laid)
        deep = deep or any(e.deep for e in sharing)
        for e in [*sharing, _Entry(target, [], aux, deep)]:
            read: list[Bound] = [laid.as_strided(e.t.shape, e.t.stride(), e.t.storage_offset())
                                  for laid in laid_out]
            self.entries[id(e.t)] = _Entry(e.t, read, aux if e.t is target else None, deep or e.deep)

    # -- dispatch ------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.unsupported is not None:
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if "out" in kwargs:
            self.unsupported = f"aten.{name} (out=)"
            return func(*args, **kwargs)
        if name in ("copy_", "fill_", "zero_"):
            return self._mutate_special(func, name, args, kwargs)
        if name.endswith("_") and not name.startswith("_") and func._schema.is_mutable:
            return self._inplace(func, name, args, kwargs)
        out = func(*args, **kwargs)
        try:
            bounds, aux, deep = self._apply(func, name, args, kwargs, out)
            self._store(out, bounds, aux, deep)
        except Exception as err:  # a rule that cannot handle this call: stop, never break the run
            self._stop(name, err)
        return out

    def _stop(self, name: str, err: Exception) -> None:
        """End the propagation at ``aten.<name>``: its bounds from here on are unknown."""
        self.unsupported = (f"aten.{name}" if isinstance(err, _Unsupported)
                            else f"aten.{name} ({type(err).__name__}: {err})")

    def _apply(self, func: Any, name: str, args: tuple, kwargs: dict,
               out: Any) -> tuple[list[Any], list[Bound] | None, bool]:
        leaves = out if isinstance(out, (tuple, list)) else (out,)
        if not any(_floating(t) for t in leaves):
            return [None] * len(self.eps), None, False
        rule = _RULES.get(name)
        if rule is None:
            if name in _CREATION:
                return [None] * len(self.eps), None, False
            raise _Unsupported(name)
        inputs = [self._entry(t) for t in _tensors(args, kwargs)]
        deep = any(e is not None and e.deep for e in inputs) or (
            name in _PRODUCT_OPS and any(e is not None and any(b is not None for b in e.bounds)
                                         for e in inputs))
        op = _Op(self, func, args, kwargs, out)
        return [rule(op, ch) for ch in range(len(self.eps))], op.aux, deep

    def _inplace(self, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        target = args[0]
        base = getattr(torch.ops.aten, name[:-1], None)
        oop = getattr(base, func._overloadname, None) if base is not None else None
        if oop is None or not _floating(target):
            self.unsupported = f"aten.{name} (in place)"
            return func(*args, **kwargs)
        try:
            bounds, aux, deep = self._apply(oop, name[:-1], args, kwargs, oop(*args, **kwargs))
        except Exception as err:
            self._stop(name, err)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        try:
            self._mutated(target, bounds, aux, deep)
        except Exception as err:
            self._stop(name, err)
        return out

    def _mutate_special(self, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        target = args[0]
        deep = False
        if name == "copy_" and isinstance(args[1], Tensor):
            bounds = [None if b is None else b.expand(target.shape) for b in self.bounds(args[1])]
            deep = self.deep(args[1])
        else:
            bounds = [None] * len(self.eps)
        out = func(*args, **kwargs)
        if _floating(target):
            try:
                self._mutated(target, bounds, None, deep)
            except Exception as err:
                self._stop(name, err)
        return out


# ---- structural ops: the bound moves with the values --------------------------------------------


@_rule("view", "_unsafe_view", "reshape")
def _r_view(op: _Op, ch: int) -> Bound:
    e = op.e(op.args[0], ch)
    return None if e is None else e.reshape(op.out.shape)


@_rule("detach", "alias", "lift_fresh", "clone")
def _r_alias(op: _Op, ch: int) -> Bound:
    aux = op.tracker.aux(op.args[0])
    if aux is not None:
        op.set_aux(ch, aux[ch])
    return op.e(op.args[0], ch)


@_rule("expand", "permute", "transpose", "t", "slice", "select", "unsqueeze", "squeeze", "unfold",
       "flip", "roll", "repeat", "index_select", "gather", "index", "_unsafe_index", "split",
       "split_with_sizes", "unbind", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
       "native_channel_shuffle", "im2col", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
       "replication_pad1d", "replication_pad2d", "replication_pad3d", "upsample_nearest1d",
       "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
       "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "diagonal", "slice_backward",
       "select_backward", "expand_copy", "permute_copy", "view_copy", "movedim", "embedding")
def _r_structural(op: _Op, ch: int) -> Any:
    e = op.e(op.args[0], ch)
    if e is None:
        return None
    return op.func(e, *op.args[1:], **op.kwargs)


@_rule("as_strided")
def _r_as_strided(op: _Op, ch: int) -> Bound:
    # Lay the bound out in storage like the tensor, then take the same strided view of it; exact as
    # long as the view reads only storage positions that the tensor itself covers.
    x = op.args[0]
    e = op.e(x, ch)
    if e is None:
        return None
    numel = x.untyped_storage().nbytes() // x.element_size()
    where = torch.arange(numel, device=x.device)
    covered = torch.zeros(numel, dtype=torch.bool, device=x.device)
    covered[where.as_strided(x.shape, x.stride(), x.storage_offset()).reshape(-1)] = True
    read = where.as_strided(*op.args[1:], **op.kwargs).reshape(-1)
    if not bool(covered[read].all()):
        raise _Unsupported("as_strided beyond its input")
    laid = torch.zeros(numel, dtype=e.dtype, device=x.device)
    laid.as_strided(x.shape, x.stride(), x.storage_offset()).copy_(e)
    return laid.as_strided(*op.args[1:], **op.kwargs)


@_rule("cat", "stack")
def _r_cat(op: _Op, ch: int) -> Bound:
    tensors = op.args[0]
    es = [op.e(t, ch) for t in tensors]
    if all(e is None for e in es):
        return None
    filled = [torch.zeros_like(t, dtype=_F64) if e is None else e for t, e in zip(tensors, es)]
    return op.func(filled, *op.args[1:], **op.kwargs)


@_rule("constant_pad_nd", "masked_fill")
def _r_fill_value(op: _Op, ch: int) -> Bound:
    # Padding or filling writes an exact constant (its bound is 0); a tensor fill value has its own.
    e = op.e(op.args[0], ch)
    if e is None:
        return None
    args = list(op.args)
    args[0] = e
    if len(args) > 2:
        args[2] = 0.0 if not isinstance(args[2], Tensor) else torch.zeros_like(args[2], dtype=e.dtype)
    return op.func(*args, **op.kwargs)


@_rule("where")
def _r_where(op: _Op, ch: int) -> Bound:
    cond, a, b = op.args[:3]
    ea, eb = op.e(a, ch), op.e(b, ch)
    if ea is None and eb is None:
        return None
    zero = torch.zeros((), dtype=_F64, device=op.out.device)
    return torch.where(cond, zero if ea is None else ea, zero if eb is None else eb)


@_rule("_to_copy")
def _r_to_copy(op: _Op, ch: int) -> Bound:
    e = op.e(op.args[0], ch)
    src, dst = op.args[0].dtype, op.out.dtype
    if not src.is_floating_point or torch.finfo(dst).eps <= torch.finfo(src).eps:
        return e
    # A cast to a coarser dtype inside the model rounds, in the float64 run too.
    eps = op.tracker.eps[ch]
    if eps == 0:
        return e
    return sum_bounds(e, op.abs(op.out).to(_F64) * max(eps, torch.finfo(dst).eps))


# ---- dot products ----------------------------------------------------------------------------------


def _product_rule(op: _Op, ch: int, prod: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor,
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


@_rule("mm", "bmm", "mv", "dot", "vdot")
def _r_mm(op: _Op, ch: int) -> Bound:
    a, b = op.args[:2]
    return _product_rule(op, ch, op.func, a, b, a.shape[-1])


_PRODUCTS = {"addmm": torch.ops.aten.mm.default, "baddbmm": torch.ops.aten.bmm.default,
             "addmv": torch.ops.aten.mv.default}


@_rule("addmm", "baddbmm", "addmv")
def _r_addmm(op: _Op, ch: int) -> Bound:
    c, a, b = op.args[:3]
    prod = _PRODUCTS[op.func.overloadpacket.__name__]
    return _product_rule(op, ch, prod, a, b, a.shape[-1], c,
                         alpha=op.kwargs.get("alpha", 1), beta=op.kwargs.get("beta", 1))


def _conv_params(op: _Op) -> tuple[Any, ...]:
    return tuple(op.args[3:9])  # stride, padding, dilation, transposed, output_padding, groups


@_rule("convolution", "_convolution")
def _r_convolution(op: _Op, ch: int) -> Bound:
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


@_rule("convolution_backward")
def _r_convolution_backward(op: _Op, ch: int) -> tuple[Bound, Bound, Bound]:
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


# ---- elementwise ----------------------------------------------------------------------------------


def _alpha(op: _Op) -> float:
    return abs(float(op.arg(2, "alpha", 1)))


@_rule("add", "sub")
def _r_add(op: _Op, ch: int) -> Bound:
    a, b = op.args[:2]
    return sum_bounds(op.e(a, ch), scale_bound(op.e(b, ch), _alpha(op)),
                      op.rnd(ch, "out", lambda: op.abs(op.out)))


@_rule("rsub")
def _r_rsub(op: _Op, ch: int) -> Bound:
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


def _rounded_out(op: _Op, *factors: Tensor | float) -> Tensor | None:
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


@_rule("mul")
def _r_mul(op: _Op, ch: int) -> Bound:
    a, b = op.args[:2]
    ea, eb = op.e(a, ch), op.e(b, ch)
    return sum_bounds(
        None if ea is None else ea * (op.abs(b) if isinstance(b, Tensor) else abs(b)),
        None if eb is None else eb * op.abs(a),
        op.rnd(ch, "out", lambda: _rounded_out(op, a, b)),
    )


@_rule("div")
def _r_div(op: _Op, ch: int) -> Bound:
    if op.kwargs.get("rounding_mode") is not None or len(op.args) > 2:
        raise _Unsupported("div with rounding_mode")
    a, b = op.args[:2]
    ea, eb = op.e(a, ch), op.e(b, ch)
    babs = op.abs(b) if isinstance(b, Tensor) else abs(b)
    return sum_bounds(
        None if ea is None else ea / babs,
        None if eb is None else eb * op.abs(op.out) / babs,
        op.rnd(ch, "out", lambda: _rounded_out(op, b)),
    )


@_rule("maximum", "minimum", "fmax", "fmin")
def _r_maximum(op: _Op, ch: int) -> Bound:
    ea, eb = op.e(op.args[0], ch), op.e(op.args[1], ch)
    if ea is None or eb is None:
        return ea if eb is None else eb
    return torch.maximum(ea, eb)


@_rule("neg", "abs", "clamp", "clamp_min", "clamp_max", "hardtanh")
def _r_lipschitz1(op: _Op, ch: int) -> Bound:
    # Exact 1-Lipschitz maps; tensor bounds of clamp add their own error.
    return sum_bounds(op.e(op.args[0], ch), *(op.e(a, ch) for a in op.args[1:3] if isinstance(a, Tensor)))


@_rule("relu")
def _r_relu(op: _Op, ch: int) -> Bound:
    x = op.args[0]
    e = op.e(x, ch)
    if e is not None:
        op.set_aux(ch, op.abs(x) <= e)
    return e


@_rule("threshold")
def _r_threshold(op: _Op, ch: int) -> Bound:
    x, threshold, value = op.args[:3]
    e = op.e(x, ch)
    if e is None:
        return None
    kink = (x - threshold).abs() <= e
    return e + torch.where(kink, abs(float(threshold) - float(value)), 0.0)


@_rule("leaky_relu")
def _r_leaky_relu(op: _Op, ch: int) -> Bound:
    slope = abs(float(op.arg(1, "negative_slope", 0.01)))
    return sum_bounds(scale_bound(op.e(op.args[0], ch), max(1.0, slope)),
                      op.rnd(ch, "out", lambda: op.abs(op.out)))


@_rule("_prelu_kernel")
def _r_prelu(op: _Op, ch: int) -> Bound:
    x, w = op.args[:2]
    ex, ew = op.e(x, ch), op.e(w, ch)
    positive = x > 0
    return sum_bounds(
        None if ex is None else torch.where(positive, ex, ex * op.abs(w)),
        None if ew is None else torch.where(positive, 0.0, ew * op.abs(x)),
        op.rnd(ch, "out", lambda: op.abs(op.out)),
    )


def _unary(deriv: Callable[[_Op], Tensor | float], rounding: Callable[[_Op], Tensor]) -> _Rule:
    """``|f'(x)| E(x)`` plus the op's own rounding, ``eps * rounding``."""
    def rule(op: _Op, ch: int) -> Bound:
        e = op.e(op.args[0], ch)
        prop = None if e is None else e * op.memo("deriv", lambda: deriv(op))
        return sum_bounds(prop, op.rnd(ch, "own", lambda: rounding(op)))
    return rule


def _out(op: _Op) -> Tensor:
    return op.abs(op.out)


def _x(op: _Op) -> Tensor:
    return op.abs(op.args[0])


# Derivative magnitudes (exact, from the float64 values, or a global Lipschitz constant) and the
# op's own rounding in units of eps: a few units of |f(x)| for correctly-rounded-ish libm functions,
# plus |x| where the formula cancels (gelu, elu, hardswish for large negative x).
_RULES.update({
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
    "pow": _unary(
        lambda op: abs(float(op.args[1])) * _x(op) ** (float(op.args[1]) - 1),
        lambda op: 4 * _out(op)),
})


def _pow_guard(rule: _Rule) -> _Rule:
    def guarded(op: _Op, ch: int) -> Bound:
        if not isinstance(op.args[0], Tensor) or isinstance(op.args[1], Tensor):
            raise _Unsupported("pow with a tensor exponent")
        return rule(op, ch)
    return guarded


_RULES["pow"] = _pow_guard(_RULES["pow"])


# ---- gradients of elementwise ops -----------------------------------------------------------------


@_rule("threshold_backward")
def _r_threshold_backward(op: _Op, ch: int) -> Bound:
    g, s, threshold = op.args[:3]
    eg = op.e(g, ch)
    kink = op.tracker.kink(s, ch, float(threshold))
    passed = None if eg is None else torch.where(s > threshold, eg, 0.0)
    if kink is None:
        return passed
    # Where a rounding could move the input across the threshold the gradient may pass or not.
    switched = op.abs(g) if eg is None else op.abs(g) + eg
    return torch.where(kink, switched, 0.0 if passed is None else passed)


@_rule("hardtanh_backward")
def _r_hardtanh_backward(op: _Op, ch: int) -> Bound:
    g, x, lo, hi = op.args[:4]
    eg, ex = op.e(g, ch), op.e(x, ch)
    passed = None if eg is None else torch.where((x > lo) & (x < hi), eg, 0.0)
    if ex is None:
        return passed
    kink = ((x - lo).abs() <= ex) | ((x - hi).abs() <= ex)
    switched = op.abs(g) if eg is None else op.abs(g) + eg
    return torch.where(kink, switched, 0.0 if passed is None else passed)


@_rule("leaky_relu_backward")
def _r_leaky_relu_backward(op: _Op, ch: int) -> Bound:
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


def _smooth_backward(first: float, second: Callable[[_Op], Tensor | float],
                     rounding: Callable[[_Op], Tensor], uses_output: bool = False) -> _Rule:
    """``g * f'(x)``: ``|f'| E(g) + |g| |f''| E(x)`` plus rounding."""
    def rule(op: _Op, ch: int) -> Bound:
        g, x = op.args[:2]
        eg, ex = op.e(g, ch), op.e(x, ch)
        return sum_bounds(
            scale_bound(eg, first),
            None if ex is None else op.abs(g) * ex * op.memo("second", lambda: second(op)),
            op.rnd(ch, "own", lambda: rounding(op)),
        )
    return rule


_RULES.update({
    "gelu_backward": _smooth_backward(1.13, lambda op: 0.8, lambda op: 8 * op.abs(op.args[0])),
    "silu_backward": _smooth_backward(
        1.1, lambda op: 0.5, lambda op: 8 * op.abs(op.args[0]) * (1 + op.abs(op.args[1]))),
    # For these the saved tensor is the output s: f' = s(1-s) or 1-s^2, d f'/ds = 1-2s or -2s.
    "sigmoid_backward": _smooth_backward(
        0.25, lambda op: (1 - 2 * op.args[1]).abs(), lambda op: 4 * op.abs(op.args[0])),
    "tanh_backward": _smooth_backward(
        1.0, lambda op: 2 * op.abs(op.args[1]), lambda op: 8 * op.abs(op.args[0])),
})


@_rule("hardswish_backward")
def _r_hardswish_backward(op: _Op, ch: int) -> Bound:
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


@_rule("hardsigmoid_backward")
def _r_hardsigmoid_backward(op: _Op, ch: int) -> Bound:
    g, x = op.args[:2]
    eg, ex = op.e(g, ch), op.e(x, ch)
    middle = (x > -3) & (x < 3)
    return sum_bounds(
        None if eg is None else torch.where(middle, eg / 6, 0.0),
        None if ex is None else torch.where(((x + 3).abs() <= ex) | ((x - 3).abs() <= ex),
                                            op.abs(g) / 6, 0.0),
        op.rnd(ch, "own", lambda: op.abs(g) / 3),
    )


@_rule("softplus_backward")
def _r_softplus_backward(op: _Op, ch: int) -> Bound:
    g, x, beta = op.args[:3]
    eg, ex = op.e(g, ch), op.e(x, ch)
    return sum_bounds(eg, None if ex is None else op.abs(g) * ex * abs(float(beta)) / 4,
                      op.rnd(ch, "own", lambda: 4 * op.abs(g)))


def _layer_norm_stats(op: _Op, x: Tensor, normalized_shape: Sequence[int], eps: float) -> tuple[Any, ...]:
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    n = math.prod(normalized_shape)

    def stats() -> tuple[Any, ...]:
        mu = x.mean(dims, keepdim=True)
        r = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
        return dims, n, r, (x - mu) * r, x.abs().mean(dims, keepdim=True)

    return op.memo("stats", stats)


def _normalized_bound(e: Tensor, xhat_abs: Tensor, r: Tensor, dims: tuple[int, ...]) -> Tensor:
    """A bound on the change of ``(x - mean) * rstd`` when ``x`` moves by at most ``e``."""
    return r * (e + e.mean(dims, keepdim=True) + xhat_abs * (xhat_abs * e).mean(dims, keepdim=True))


@_rule("native_layer_norm")
def _r_layer_norm(op: _Op, ch: int) -> tuple[Bound, Bound, Bound]:
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
        None if ex is None else wa * _normalized_bound(ex, xa, r, dims),
        None if ew is None else xa * ew,
        eb,
        op.rnd(ch, "own", rounding),
    )
    return (out, None, None)


@_rule("native_layer_norm_backward")
def _r_layer_norm_backward(op: _Op, ch: int) -> tuple[Bound, Bound, Bound]:
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
        d = _normalized_bound(ex, xa, r, dims)
        terms.append((xa * d).mean(dims, keepdim=True) * gi.abs()
                     + r * (d * (ghat * xhat).mean(dims, keepdim=True).abs()
                            + xa * (ga * d).mean(dims, keepdim=True)))
    mean_abs = op.memo("mean_abs", lambda: x.abs().mean(dims, keepdim=True))
    terms.append(op.rnd(ch, "own", lambda: (1 + mean_abs * r) * (
        r * (ga + ga.mean(dims, keepdim=True) + xa * (ga * xa).mean(dims, keepdim=True)) + gi.abs()),
        factor=n + 4))
    return (sum_bounds(*terms), None, None)


# ---- reductions, pooling, resampling --------------------------------------------------------------


def _linear_sum(count: Callable[[_Op], float], extra: float = 1.0) -> _Rule:
    """A linear op with nonnegative weights that sums at most ``count`` terms per element (pools,
    sums, means, interpolation, the backward of a gather): apply it to the bound, and add
    ``(count + extra) * eps * op(|x|)``."""
    def rule(op: _Op, ch: int) -> Bound:
        x = op.args[0]
        e = op.e(x, ch)
        return sum_bounds(
            None if e is None else op.func(e.to(x.dtype), *op.args[1:], **op.kwargs),
            op.rnd(ch, "own", lambda: op.func(op.abs(x), *op.args[1:], **op.kwargs),
                   factor=count(op) + extra),
        )
    return rule


def _reduced(op: _Op) -> float:
    return op.args[0].numel() / max(op.out.numel(), 1)


def _window(op: _Op) -> float:
    return float(math.prod(op.args[1]))


def _adaptive_window(op: _Op) -> float:
    x = op.args[0]
    out_size = op.args[1]
    spatial = x.shape[-len(out_size):]
    return float(math.prod(math.ceil(i / max(o, 1)) + 1 for i, o in zip(spatial, out_size)))


def _backward_window(op: _Op) -> float:
    return float(math.prod(op.args[2]))


def _spatial_ops(op: _Op) -> float:
    return float(2 ** max(op.args[0].dim() - 2, 1))


_RULES.update({
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


# |amax(x + d) - amax(x)| <= amax |d|: the op applied to the bound, as for the structural ops.
_rule("amax", "amin")(_r_structural)


@_rule("max", "min")
def _r_max(op: _Op, ch: int) -> Any:
    # |max(x + d) - max(x)| <= max |d|; the indices of max.dim are not floating.
    e = op.e(op.args[0], ch)
    if isinstance(op.out, tuple):
        dim = op.args[1]
        keepdim = bool(op.arg(2, "keepdim", False))
        return (None if e is None else e.amax(dim, keepdim=keepdim), None)
    if len(op.args) > 1:
        raise _Unsupported("binary max/min")
    return None if e is None else e.max()


@_rule("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
       "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool1d_with_indices")
def _r_max_pool(op: _Op, ch: int) -> Any:
    e = op.e(op.args[0], ch)
    tupled = isinstance(op.out, tuple)
    if e is None:
        return (None, None) if tupled else None
    r = op.func(e, *op.args[1:], **op.kwargs)
    r0 = r[0] if isinstance(r, tuple) else r
    return (r0, None) if tupled else r0


_AVG_BACKWARD = {"max_pool2d_with_indices_backward": torch.ops.aten.avg_pool2d_backward.default,
                 "max_pool3d_with_indices_backward": torch.ops.aten.avg_pool3d_backward.default}
_MAX_POOL = {"max_pool2d_with_indices_backward": torch.ops.aten.max_pool2d_with_indices.default,
             "max_pool3d_with_indices_backward": torch.ops.aten.max_pool3d_with_indices.default}


@_rule("max_pool2d_with_indices_backward", "max_pool3d_with_indices_backward")
def _r_max_pool_backward(op: _Op, ch: int) -> Bound:
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
        raise _Unsupported("dilated max-pool gradient")
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


# ---- normalisation and softmax --------------------------------------------------------------------


def _channel_view(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape((1, -1) + (1,) * (like.dim() - 2))


def _batch_norm_eval(op: _Op, ch: int, x: Tensor, w: Tensor | None, b: Tensor | None, mean: Tensor,
                     var: Tensor, eps: float) -> Bound:
    std = op.memo("std", lambda: _channel_view(torch.sqrt(var + eps), x))
    wv = None if w is None else _channel_view(w, x)
    scale = op.memo("scale", lambda: (1 / std) if wv is None else (wv.abs() / std))
    centred = op.memo("centred", lambda: (x - _channel_view(mean, x)).abs())
    ex, ew, eb = op.e(x, ch), op.e(w, ch), op.e(b, ch)
    em, ev = op.e(mean, ch), op.e(var, ch)

    def rounding() -> Tensor:
        r = (op.abs(x) + _channel_view(mean, x).abs()) * scale
        return r if b is None else r + _channel_view(b, x).abs()

    return sum_bounds(
        None if ex is None else ex * scale,
        None if ew is None else _channel_view(ew, x) * centred / std,
        None if eb is None else _channel_view(eb, x),
        None if em is None else _channel_view(em, x) * scale,
        None if ev is None else _channel_view(ev, x) * centred * scale / (2 * std * std),
        op.rnd(ch, "own", rounding, factor=5.0),
    )


@_rule("native_batch_norm", "cudnn_batch_norm")
def _r_batch_norm(op: _Op, ch: int) -> tuple[Bound, ...]:
    x, w, b, mean, var, training, _momentum, eps = op.args[:8]
    if training or mean is None or var is None:
        raise _Unsupported("batch norm in training mode")
    out = _batch_norm_eval(op, ch, x, w, b, mean, var, float(eps))
    return (out,) + (None,) * (len(op.out) - 1)


@_rule("_native_batch_norm_legit_no_training")
def _r_batch_norm_legit(op: _Op, ch: int) -> tuple[Bound, ...]:
    x, w, b, mean, var, _momentum, eps = op.args[:7]
    return (_batch_norm_eval(op, ch, x, w, b, mean, var, float(eps)),) + (None,) * (len(op.out) - 1)


@_rule("native_batch_norm_backward")
def _r_batch_norm_backward(op: _Op, ch: int) -> tuple[Bound, Bound, Bound]:
    g, x, w, mean, var, _sm, _si, train, eps = op.args[:9]
    if train or var is None:
        raise _Unsupported("batch norm gradient in training mode")
    std = _channel_view(torch.sqrt(var + float(eps)), x)
    scale = (1 / std) if w is None else _channel_view(w, x).abs() / std
    eg, ew, ev = op.e(g, ch), op.e(w, ch), op.e(var, ch)
    gi = sum_bounds(
        None if eg is None else eg * scale,
        None if ew is None else op.abs(g) * _channel_view(ew, x) / std,
        None if ev is None else op.abs(g) * scale * _channel_view(ev, x) / (2 * std * std),
        op.rnd(ch, "own", lambda: op.abs(g) * scale, factor=4.0),
    )
    return (gi, None, None)


@_rule("_softmax")
def _r_softmax(op: _Op, ch: int) -> Bound:
    x, dim = op.args[:2]
    s = op.out
    n = x.shape[dim] if x.dim() else 1
    e = op.e(x, ch)

    def rounding() -> Tensor:
        spread = x - x.amax(dim, keepdim=True)
        return s * (n + 5 + spread.abs()) + s * (s * spread.abs()).sum(dim, keepdim=True)

    return sum_bounds(None if e is None else s * (e + (s * e).sum(dim, keepdim=True)),
                      op.rnd(ch, "own", rounding))


@_rule("_log_softmax")
def _r_log_softmax(op: _Op, ch: int) -> Bound:
    x, dim = op.args[:2]
    n = x.shape[dim] if x.dim() else 1
    e = op.e(x, ch)
    s = op.memo("s", lambda: op.out.exp())
    return sum_bounds(
        None if e is None else e + (s * e).sum(dim, keepdim=True),
        op.rnd(ch, "own", lambda: 2 * (x - x.amax(dim, keepdim=True)).abs() + 2 * op.abs(op.out) + n + 2),
    )


@_rule("_softmax_backward_data")
def _r_softmax_backward(op: _Op, ch: int) -> Bound:
    g, s, dim = op.args[:3]
    n = s.shape[dim] if s.dim() else 1
    eg, es = op.e(g, ch), op.e(s, ch)
    gs = op.memo("gs", lambda: (g * s).sum(dim, keepdim=True))
    return sum_bounds(
        None if eg is None else s * eg + s * (s * eg).sum(dim, keepdim=True),
        None if es is None else (g - gs).abs() * es + s * (op.abs(g) * es).sum(dim, keepdim=True),
        op.rnd(ch, "own", lambda: s * (op.abs(g) + (op.abs(g) * s).sum(dim, keepdim=True)), factor=n + 3),
    )


@_rule("_log_softmax_backward_data")
def _r_log_softmax_backward(op: _Op, ch: int) -> Bound:
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
