"""The rounding tracker: a dispatch mode that carries a bound next to every tensor of one pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from fcconv.certify.rounding.registry import CREATION, PRODUCT_OPS, RULES, Bound, Op, Unsupported, floating

__all__ = ["AbsCache", "BoundTable", "Tracker"]

_F64 = torch.float64

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


class BoundTable:
    """The bounds of one pass: per tracked tensor, its bound in each channel, where a kink is within
    reach, and whether the bound is deep. Writes into shared storage update every alias."""

    def __init__(self, eps: Sequence[float], initial: dict[int, tuple[Tensor, list[Bound]]] | None = None):
        self.eps = tuple(eps)
        self.entries: dict[int, _Entry] = {
            k: _Entry(t, b, None, False) for k, (t, b) in (initial or {}).items()
        }

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
        if not floating(t):
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
        if base is not None and floating(base) and self._entry(base) is None:
            sharing.append(_Entry(base, [None] * len(self.eps), None, False))
        if not sharing:
            self._store(target, bounds, aux, deep)
            return
        numel = target.untyped_storage().nbytes() // target.element_size()
        laid_out: list[Tensor | None] = []
        for ch in range(len(self.eps)):
            laid = torch.zeros(numel, dtype=_F64, device=target.device)
            for e in sharing:
                known = e.bounds[ch]
                if known is not None:
                    laid.as_strided(e.t.shape, e.t.stride(), e.t.storage_offset()).copy_(known)
            new = bounds[ch]
            view = laid.as_strided(target.shape, target.stride(), target.storage_offset())
            view.copy_(new.expand(target.shape) if new is not None else torch.zeros((), dtype=_F64))
            # Exact values written into exact storage (padding built by writes) stay exact: None,
            # so that a dot product reading them does not count as a second rounded one.
            laid_out.append(laid if bool(laid.any()) else None)
        deep = deep or any(e.deep for e in sharing)
        for e in [*sharing, _Entry(target, [], aux, deep)]:
            read: list[Bound] = [None if laid is None else
                                 laid.as_strided(e.t.shape, e.t.stride(), e.t.storage_offset())
                                 for laid in laid_out]
            self.entries[id(e.t)] = _Entry(e.t, read, aux if e.t is target else None, deep or e.deep)


class Tracker(BoundTable, TorchDispatchMode):
    """Carries a first-order bound on the rounding error next to every tensor of one pass.

    ``eps`` has one entry per channel: channels share the op-by-op propagation and differ in the
    rounding they add (working dtype, float64, or none for the parameter channel, whose sources are
    the ``initial`` bounds of the parameters). Tensors without an entry are exact.
    """

    def __init__(self, eps: Sequence[float], initial: dict[int, tuple[Tensor, list[Bound]]] | None = None,
                 abs_cache: AbsCache | None = None):
        TorchDispatchMode.__init__(self)
        BoundTable.__init__(self, eps, initial)
        self.abs_cache = abs_cache
        self.unsupported: str | None = None

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
        self.unsupported = (f"aten.{name}" if isinstance(err, Unsupported)
                            else f"aten.{name} ({type(err).__name__}: {err})")

    def _apply(self, func: Any, name: str, args: tuple, kwargs: dict,
               out: Any) -> tuple[list[Any], list[Bound] | None, bool]:
        leaves = out if isinstance(out, (tuple, list)) else (out,)
        if not any(floating(t) for t in leaves):
            return [None] * len(self.eps), None, False
        rule = RULES.get(name)
        if rule is None:
            if name in CREATION:
                return [None] * len(self.eps), None, False
            raise Unsupported(name)
        inputs = [self._entry(t) for t in _tensors(args, kwargs)]
        deep = any(e is not None and e.deep for e in inputs) or (
            name in PRODUCT_OPS and any(e is not None and any(b is not None for b in e.bounds)
                                         for e in inputs))
        op = Op(self, func, args, kwargs, out)
        return [rule(op, ch) for ch in range(len(self.eps))], op.aux, deep

    def _inplace(self, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        target = args[0]
        base = getattr(torch.ops.aten, name[:-1], None)
        oop = getattr(base, func._overloadname, None) if base is not None else None
        if oop is None or not floating(target):
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
        if floating(target):
            try:
                self._mutated(target, bounds, None, deep)
            except Exception as err:
                self._stop(name, err)
        return out

