"""Equivalence certificates: is a candidate module the same function as a reference, with numbers.

The textbook checks ``out1 == out2``, which holds for four numbers and fails for real layers: a
``Linear(25088, 4096)`` and the ``Conv2d(512, 4096, 7)`` made from it sum the same products in another
order, and agree bit for bit on a few percent of the outputs only. :func:`compare` answers two
questions separately and puts numbers on both:

* **Is it the same function?** Both modules are deep-copied to float64 and run on the same inputs. The
  same function agrees to float64 rounding (about 1e-16 .. 1e-12 relative); a wrong one, even a weight
  off by 1e-4, differs by many orders of magnitude more. This is the verdict, ``equivalent``.
* **Are the working-precision differences only rounding?** Every difference in the working dtype
  (float32, bfloat16, ...) is checked against a bound derived from the computation: for one ``Linear``
  or conv it is the dot-product bound ``2 * n * eps * sum|w * x|`` per output; for deeper models the
  same bound is propagated op by op (``bound_ok``).

How the bound is derived
    While each float64 copy runs, a dispatch mode follows every ATen op and carries, next to each
    tensor ``t``, a bound ``E(t)`` on ``|t_computed - t_exact|`` (first order in the unit roundoff):

    * inputs and parameters are exact (``E = 0``): the float64 copy of a working-precision value is
      that value;
    * a dot product of ``n`` terms (``mm``, ``addmm``, ``convolution``, its backward; ``n`` counts the
      bias) adds ``n * eps * (|W| |x| + |b|)``, the classic bound ``gamma_n = n u / (1 - n u)`` with
      ``eps = 2 u`` covering the denominator, and propagates the input errors through ``|W|``;
    * elementwise ops propagate ``|f'(x)| E(x)`` and add a few ``eps |f(x)|`` (nothing where a factor is
      a power of two); max-pooling and ReLU are 1-Lipschitz; in gradients, where a rounding can move
      an input across a kink (ReLU's 0, the winner of a max-pool window) the whole gradient that could
      switch is added;
    * sums, means and average pools add ``n * eps * sum|x|``; batch norm (eval), layer norm, softmax
      and log-softmax have their own first-order rules; writes into views are followed through the
      shared storage.

    The bound on a difference between the two modules is ``E_ref + E_cand``, with ``eps`` the machine
    epsilon of each module's dtype; the same propagation with float64's ``eps`` bounds the float64
    disagreement. For a single ``Linear`` or conv this is exactly ``2 * n * eps * sum|w * x|``. Through
    several layers the worst case compounds (``|W|`` grows faster than ``W``), so for deep models the
    bound stays valid but is loose by orders of magnitude: the report marks it ``(deep)``. An op
    without a rule (attention kernels, random ops, ...) ends the propagation: ``bound_ok`` is then
    None and ``report.unsupported`` names the op.

Verdict
    ``equivalent`` is True when, for the outputs (and the input gradients with ``grad=True``), the
    float64 copies agree to :data:`FLOAT64_RTOL` = 1e-10 relative to the largest reference value. The
    threshold sits four orders of magnitude above float64 noise (``eps64 = 2.2e-16``; a sum of ``n``
    random terms rounds by about ``sqrt(n) * eps64``, 3.5e-14 for fc6's 25088 inputs; measured: 0
    to 5e-15 on torchvision models) and more than two below the effect of a single weight changed by
    1e-4 on fc6's outputs (6e-8 to 1.4e-7 measured). For a single layer, where the derived bound is
    tight, values that cancel (a zero-sum kernel on a flat input) may exceed the threshold while
    staying within float64 rounding: they pass too. Rejection therefore means: the difference is not
    negligible, and (for a single layer) larger than any rounding could make it.

    Conversions that *compute* weights (folded padding taps, fused batch norm) round them in the working
    dtype, so their float64 copies are not exactly the same function. For a single layer,
    ``parameter_rounding=True`` widens the float64 bound by one working-precision rounding of every
    parameter of both modules; the reason suggests it when that would change the verdict.

Example:
    >>> lin = nn.Linear(4, 2)
    >>> conv = nn.Conv2d(1, 2, 2)
    >>> with torch.no_grad():
    ...     _ = conv.weight.copy_(lin.weight.view(2, 1, 2, 2)), conv.bias.copy_(lin.bias)
    >>> compare(lin, conv, (4,), input_map=lambda x: x.reshape(-1, 1, 2, 2)).equivalent
    True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

from fcconv.errors import FcconvError, NotEquivalentError

__all__ = [
    "FLOAT64_RTOL",
    "Agreement",
    "EquivalenceReport",
    "Location",
    "assert_equivalent",
    "compare",
    "ulp_distance",
]

FLOAT64_RTOL = 1e-10
"""Float64 differences up to this fraction of the largest reference value count as the same function."""

# Per-sample shapes become these batches, in this order, of ``_BATCH_SIZE`` samples each.
_BATCH_SIZE = 2
_GENERATED = ("normal", "normal x1e3", "negative", "uniform [0, 1)")
_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.RReLU)
_F64 = torch.float64
_EPS64 = torch.finfo(_F64).eps

OutputMap = Callable[[Any], Tensor]


# --------------------------------------------------------------------------------------------------
# ULP distance
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """Where a difference is: which batch, which sample in it, which element, and both values.

    Attributes:
        batch: index of the batch among the example inputs.
        label: a short description of that batch, e.g. ``"normal x1e3"`` for generated inputs.
        sample: index of the sample within the batch.
        index: the element's index in the per-sample shape (output, or input for gradients).
        reference: the reference's value there.
        candidate: the candidate's value there.
    """

    batch: int
    label: str
    sample: int
    index: tuple[int, ...]
    reference: float
    candidate: float

    def __str__(self) -> str:
        where = "(" + ", ".join(map(str, self.index)) + ("," if len(self.index) == 1 else "") + ")"
        return (
            f"batch {self.batch} ({self.label}), sample {self.sample}, element {where}: "
            f"reference {self.reference:.9g}, candidate {self.candidate:.9g}"
        )


@dataclass(frozen=True)
class Agreement:
    """How closely two modules agree on one quantity (outputs or input gradients).

    Attributes:
        quantity: ``"outputs"`` or ``"input gradients"``.
        dtype: the dtype the working-precision values are compared in (the reference's).
        per_sample: elements compared per sample.
        count: elements compared in all.
        max_abs: largest absolute difference in the working dtype.
        max_rel: ``max_abs`` over the largest reference magnitude, so that near-zero values do not
            blow it up.
        max_ulp: largest distance in units in the last place of ``dtype`` (see :func:`ulp_distance`).
        bit_identical_fraction: fraction of elements whose bits are equal.
        worst: where ``max_abs`` is (None when every element is bit-identical).
        bound_ratio: largest working-precision difference over its derived rounding bound; None when
            the bound could not be derived.
        bound_ok: ``bound_ratio <= 1``; None when no bound was derived.
        bound_worst: where ``bound_ratio`` is.
        float64_max_abs: largest difference between the float64 copies.
        float64_max_rel: that over the largest float64 reference magnitude: the verdict's number.
        float64_bound_ratio: largest float64 difference over its float64 rounding bound (None when
            not derived).
        bound_single_layer: True when no value went through more than one rounded dot product (a
            single Linear or conv, with any maps and elementwise ops): then the bounds are within a
            small factor of real rounding and the verdict may rest on the float64 one. For deeper
            compositions the worst-case bound compounds with every layer (through ``|W|``), stays
            valid but loose, and is reported only. None when no bound was derived.
        float64_worst: where ``float64_max_abs`` is.
        float64_ok: whether this quantity passes the verdict (see the module docstring).
    """

    quantity: str
    dtype: torch.dtype
    per_sample: int
    count: int
    max_abs: float
    max_rel: float
    max_ulp: int
    bit_identical_fraction: float
    worst: Location | None
    bound_ratio: float | None
    bound_ok: bool | None
    bound_worst: Location | None
    float64_max_abs: float
    float64_max_rel: float
    float64_bound_ratio: float | None
    bound_single_layer: bool | None
    float64_worst: Location | None
    float64_ok: bool


@dataclass(frozen=True)
class EquivalenceReport:
    """The certificate :func:`compare` returns. ``str(report)`` is a table for a terminal.

    Attributes:
        reference: the reference's class name.
        candidate: the candidate's class name.
        dtype: the working dtype compared (the reference output's dtype).
        batches: number of input batches.
        samples: number of samples in all batches.
        outputs: agreement of the outputs.
        gradients: agreement of the gradients with respect to the inputs (``grad=True``), else None.
        parameter_rounding: whether the float64 bound allowed one rounding of every parameter.
        unsupported: the first op the rounding analysis has no rule for, or None.
        equivalent: the verdict: the two modules compute the same function.
        reason: one paragraph that explains the verdict and points at the largest difference.
    """

    reference: str
    candidate: str
    dtype: torch.dtype
    batches: int
    samples: int
    outputs: Agreement
    gradients: Agreement | None
    parameter_rounding: bool
    unsupported: str | None
    equivalent: bool
    reason: str

    @property
    def max_abs(self) -> float:
        """Largest absolute output difference in the working dtype."""
        return self.outputs.max_abs

    @property
    def max_rel(self) -> float:
        """Largest output difference over the largest reference output magnitude."""
        return self.outputs.max_rel

    @property
    def max_ulp(self) -> int:
        """Largest output difference in units in the last place of the working dtype."""
        return self.outputs.max_ulp

    @property
    def bit_identical_fraction(self) -> float:
        """Fraction of outputs that are bit-identical."""
        return self.outputs.bit_identical_fraction

    @property
    def float64_max_rel(self) -> float:
        """Largest float64 output difference over the largest float64 reference output."""
        return self.outputs.float64_max_rel

    @property
    def num_outputs(self) -> int:
        """Number of output elements compared, all samples together."""
        return self.outputs.count

    @property
    def bound_ok(self) -> bool | None:
        """Whether every working-precision difference (outputs and gradients) is within its bound."""
        parts = [self.outputs] + ([self.gradients] if self.gradients is not None else [])
        if any(p.bound_ok is None for p in parts):
            return None
        return all(bool(p.bound_ok) for p in parts)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain Python values (dtypes as strings), e.g. for ``json.dumps``."""
        def plain(value: Any) -> Any:
            if isinstance(value, torch.dtype):
                return str(value).replace("torch.", "")
            if isinstance(value, (Agreement, Location)):
                return {k: plain(v) for k, v in value.__dict__.items()}
            if isinstance(value, tuple):
                return list(value)
            return value
        return {k: plain(v) for k, v in self.__dict__.items()}

    def __str__(self) -> str:
        parts = [self.outputs] + ([self.gradients] if self.gradients is not None else [])
        dtype = _dtype_name(self.dtype)
        rows: list[tuple[str, list[str]]] = [
            ("compared elements", [f"{p.count} ({p.per_sample} per sample)" for p in parts]),
            ("max abs difference", [_num(p.max_abs) for p in parts]),
            ("max rel difference", [_num(p.max_rel) for p in parts]),
            (f"max ULP ({dtype})", [str(p.max_ulp) for p in parts]),
            ("bit-identical", [f"{100 * p.bit_identical_fraction:.2f}%" for p in parts]),
            ("diff / rounding bound", [_ratio(p.bound_ratio, p.bound_ok, p.bound_single_layer)
                                       for p in parts]),
            ("float64 copies: max rel", [_num(p.float64_max_rel) for p in parts]),
            ("float64 copies: / bound", [_ratio(p.float64_bound_ratio, None, p.bound_single_layer)
                                         for p in parts]),
            ("same function", ["yes" if p.float64_ok else "NO" for p in parts]),
        ]
        width = max(len(name) for name, _ in rows) + 2
        col = max(24, *(len(v) + 2 for _, values in rows for v in values))
        header = " " * width + "".join(p.quantity.ljust(col) for p in parts)
        lines = [
            f"{self.reference} (reference) vs {self.candidate} (candidate): {self.samples} samples "
            f"in {self.batches} batches, {dtype}",
            header.rstrip(),
        ]
        lines += [(name.ljust(width) + "".join(v.ljust(col) for v in values)).rstrip()
                  for name, values in rows]
        for p in parts:
            if p.worst is not None:
                lines.append(f"largest {dtype} difference in {p.quantity}: {p.worst}")
        if self.unsupported is not None:
            lines.append(f"no rounding bound: {self.unsupported} has no rule; the verdict uses float64 "
                         f"max rel <= {FLOAT64_RTOL:g} alone")
        lines.append(("EQUIVALENT: " if self.equivalent else "NOT EQUIVALENT: ") + self.reason)
        return "\n".join(lines)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _num(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def _ratio(ratio: float | None, ok: bool | None, single: bool | None) -> str:
    if ratio is None:
        return "n/a"
    text = _num(ratio) + ("" if ok is None else (" ok" if ok else " EXCEEDED"))
    return text + ("" if single else " (deep)")


# --------------------------------------------------------------------------------------------------
# First-order rounding-error propagation over ATen ops
# --------------------------------------------------------------------------------------------------

_Bound = Tensor | None  # None: exactly zero


class _Unsupported(Exception):
    pass


def _sum(*terms: _Bound) -> _Bound:
    total: _Bound = None
    for t in terms:
        if t is not None:
            total = t if total is None else total + t
    return total


def _scale(t: _Bound, s: float | Tensor) -> _Bound:
    return None if t is None else t * s


def _floating(t: object) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


class _Op:
    """One ATen call seen by the tracker: its arguments, output, and shared magnitudes."""

    def __init__(self, tracker: _Tracker, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        self.tracker = tracker
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.out = out
        self.aux: list[_Bound] | None = None  # per channel: where a kink is within reach
        self._memo: dict[Any, Any] = {}

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def e(self, t: object, ch: int) -> _Bound:
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

    def rnd(self, ch: int, key: str, fn: Callable[[], Tensor | None], factor: float = 1.0) -> _Bound:
        """``eps * factor * fn()``: the rounding this op adds (none in the parameter channel)."""
        eps = self.tracker.eps[ch]
        if eps == 0:
            return None
        magnitude = self.memo(key, fn)
        return None if magnitude is None else magnitude * (eps * factor)

    def set_aux(self, ch: int, mask: _Bound) -> None:
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

    def __init__(self, t: Tensor, bounds: list[_Bound], aux: list[_Bound] | None, deep: bool) -> None:
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


class _AbsCache:
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


class _Tracker(TorchDispatchMode):
    """Carries a first-order bound on the rounding error next to every tensor of one pass.

    ``eps`` has one entry per channel: channels share the op-by-op propagation and differ in the
    rounding they add (working dtype, float64, or none for the parameter channel, whose sources are
    the ``initial`` bounds of the parameters). Tensors without an entry are exact.
    """

    def __init__(self, eps: Sequence[float], initial: dict[int, tuple[Tensor, list[_Bound]]] | None = None,
                 abs_cache: _AbsCache | None = None):
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

    def bound(self, t: Tensor, ch: int) -> _Bound:
        entry = self._entry(t)
        return None if entry is None else entry.bounds[ch]

    def bounds(self, t: Tensor) -> list[_Bound]:
        entry = self._entry(t)
        return [None] * len(self.eps) if entry is None else list(entry.bounds)

    def deep(self, t: Tensor) -> bool:
        entry = self._entry(t)
        return entry is not None and entry.deep

    def aux(self, t: Tensor) -> list[_Bound] | None:
        entry = self._entry(t)
        return None if entry is None else entry.aux

    def kink(self, t: Tensor, ch: int, at: float = 0.0) -> _Bound:
        """Where a rounding could move ``t`` across ``at`` (a ReLU input's sign), per channel."""
        aux = self.aux(t)
        if aux is not None and at == 0.0:
            return aux[ch]
        e = self.bound(t, ch)
        return None if e is None else (t - at).abs() <= e

    def _store(self, t: Any, bounds: list[Any], aux: list[_Bound] | None, deep: bool) -> None:
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

    def _mutated(self, target: Tensor, bounds: list[_Bound], aux: list[_Bound] | None, deep: bool) -> None:
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
            read: list[_Bound] = [laid.as_strided(e.t.shape, e.t.stride(), e.t.storage_offset())
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
        except _Unsupported:
            self.unsupported = f"aten.{name}"
        except Exception as err:  # a rule that cannot handle this call: stop, never break the run
            self.unsupported = f"aten.{name} ({type(err).__name__}: {err})"
        return out

    def _apply(self, func: Any, name: str, args: tuple, kwargs: dict,
               out: Any) -> tuple[list[Any], list[_Bound] | None, bool]:
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
        except _Unsupported:
            self.unsupported = f"aten.{name}"
            return func(*args, **kwargs)
        except Exception as err:
            self.unsupported = f"aten.{name} ({type(err).__name__}: {err})"
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        try:
            self._mutated(target, bounds, aux, deep)
        except Exception as err:
            self.unsupported = f"aten.{name} ({type(err).__name__}: {err})"
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
                self.unsupported = f"aten.{name} ({type(err).__name__}: {err})"
        return out


# ---- structural ops: the bound moves with the values --------------------------------------------


@_rule("view", "_unsafe_view", "reshape")
def _r_view(op: _Op, ch: int) -> _Bound:
    e = op.e(op.args[0], ch)
    return None if e is None else e.reshape(op.out.shape)


@_rule("detach", "alias", "lift_fresh", "clone")
def _r_alias(op: _Op, ch: int) -> _Bound:
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
       "select_backward", "expand_copy", "permute_copy", "view_copy", "movedim")
def _r_structural(op: _Op, ch: int) -> Any:
    e = op.e(op.args[0], ch)
    if e is None:
        return None
    return op.func(e, *op.args[1:], **op.kwargs)


@_rule("as_strided")
def _r_as_strided(op: _Op, ch: int) -> _Bound:
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


@_rule("embedding")
def _r_embedding(op: _Op, ch: int) -> _Bound:
    e = op.e(op.args[0], ch)
    return None if e is None else op.func(e, *op.args[1:], **op.kwargs)


@_rule("cat", "stack")
def _r_cat(op: _Op, ch: int) -> _Bound:
    tensors = op.args[0]
    es = [op.e(t, ch) for t in tensors]
    if all(e is None for e in es):
        return None
    filled = [torch.zeros_like(t, dtype=_F64) if e is None else e for t, e in zip(tensors, es)]
    return op.func(filled, *op.args[1:], **op.kwargs)


@_rule("constant_pad_nd", "masked_fill")
def _r_fill_value(op: _Op, ch: int) -> _Bound:
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
def _r_where(op: _Op, ch: int) -> _Bound:
    cond, a, b = op.args[:3]
    ea, eb = op.e(a, ch), op.e(b, ch)
    if ea is None and eb is None:
        return None
    zero = torch.zeros((), dtype=_F64, device=op.out.device)
    return torch.where(cond, zero if ea is None else ea, zero if eb is None else eb)


@_rule("_to_copy")
def _r_to_copy(op: _Op, ch: int) -> _Bound:
    e = op.e(op.args[0], ch)
    src, dst = op.args[0].dtype, op.out.dtype
    if not src.is_floating_point or torch.finfo(dst).eps <= torch.finfo(src).eps:
        return e
    # A cast to a coarser dtype inside the model rounds, in the float64 run too.
    eps = op.tracker.eps[ch]
    if eps == 0:
        return e
    return _sum(e, op.abs(op.out).to(_F64) * max(eps, torch.finfo(dst).eps))


# ---- dot products ----------------------------------------------------------------------------------


def _product_rule(op: _Op, ch: int, prod: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor,
                  k: int, c: Tensor | None = None, alpha: float = 1.0, beta: float = 1.0) -> _Bound:
    """``beta * c + alpha * prod(a, b)``, a sum of ``k`` products (plus ``c``) per element."""
    alpha, beta = abs(float(alpha)), abs(float(beta))
    if beta == 0:
        c = None
    ea, eb, ec = op.e(a, ch), op.e(b, ch), op.e(c, ch)
    n = k + (c is not None)

    def magnitude() -> Tensor:
        m = prod(op.abs(a), op.abs(b)) * alpha
        return m if c is None else m + op.abs(c) * beta

    return _sum(
        None if eb is None else prod(op.abs(a), eb) * alpha,
        None if ea is None else prod(ea, op.abs(b)) * alpha,
        _scale(ec, beta),
        op.rnd(ch, "dot", magnitude, factor=n),
    )


@_rule("mm", "bmm", "mv", "dot", "vdot")
def _r_mm(op: _Op, ch: int) -> _Bound:
    a, b = op.args[:2]
    return _product_rule(op, ch, op.func, a, b, a.shape[-1])


_PRODUCTS = {"addmm": torch.ops.aten.mm.default, "baddbmm": torch.ops.aten.bmm.default,
             "addmv": torch.ops.aten.mv.default}


@_rule("addmm", "baddbmm", "addmv")
def _r_addmm(op: _Op, ch: int) -> _Bound:
    c, a, b = op.args[:3]
    prod = _PRODUCTS[op.func.overloadpacket.__name__]
    return _product_rule(op, ch, prod, a, b, a.shape[-1], c,
                         alpha=op.kwargs.get("alpha", 1), beta=op.kwargs.get("beta", 1))


def _conv_params(op: _Op) -> tuple[Any, ...]:
    return tuple(op.args[3:9])  # stride, padding, dilation, transposed, output_padding, groups


@_rule("convolution", "_convolution")
def _r_convolution(op: _Op, ch: int) -> _Bound:
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

    return _sum(
        None if ex is None else conv(ex, op.abs(w)),
        None if ew is None else conv(op.abs(x), ew),
        None if eb is None else eb.reshape(per_channel),
        op.rnd(ch, "dot", magnitude, factor=n),
    )


@_rule("convolution_backward")
def _r_convolution_backward(op: _Op, ch: int) -> tuple[_Bound, _Bound, _Bound]:
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
    gi = _sum(
        None if eg is None else back(eg, op.abs(w)),
        None if ew is None else back(op.abs(g), ew),
        op.rnd(ch, "dot", lambda: back(op.abs(g), op.abs(w)), factor=fan_out),
    )
    return (gi, None, None)


# ---- elementwise ----------------------------------------------------------------------------------


@_rule("add", "sub")
def _r_add(op: _Op, ch: int) -> _Bound:
    a, b = op.args[:2]
    alpha = abs(float(op.kwargs.get("alpha", op.args[2] if len(op.args) > 2 else 1)))
    return _sum(op.e(a, ch), _scale(op.e(b, ch), alpha), op.rnd(ch, "out", lambda: op.abs(op.out)))


@_rule("rsub")
def _r_rsub(op: _Op, ch: int) -> _Bound:
    a, b = op.args[:2]
    alpha = abs(float(op.kwargs.get("alpha", op.args[2] if len(op.args) > 2 else 1)))
    return _sum(_scale(op.e(a, ch), alpha), op.e(b, ch), op.rnd(ch, "out", lambda: op.abs(op.out)))


def _power_of_two(v: Tensor | float) -> Tensor | bool:
    """Where ``v`` is 0 or +-2**k: multiplying or dividing by it is exact (barring under/overflow)."""
    if isinstance(v, Tensor):
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
def _r_mul(op: _Op, ch: int) -> _Bound:
    a, b = op.args[:2]
    ea, eb = op.e(a, ch), op.e(b, ch)
    return _sum(
        None if ea is None else ea * (op.abs(b) if isinstance(b, Tensor) else abs(b)),
        None if eb is None else eb * op.abs(a),
        op.rnd(ch, "out", lambda: _rounded_out(op, a, b)),
    )


@_rule("div")
def _r_div(op: _Op, ch: int) -> _Bound:
    if op.kwargs.get("rounding_mode") is not None or len(op.args) > 2:
        raise _Unsupported("div with rounding_mode")
    a, b = op.args[:2]
    ea, eb = op.e(a, ch), op.e(b, ch)
    babs = op.abs(b) if isinstance(b, Tensor) else abs(b)
    return _sum(
        None if ea is None else ea / babs,
        None if eb is None else eb * op.abs(op.out) / babs,
        op.rnd(ch, "out", lambda: _rounded_out(op, b)),
    )


@_rule("maximum", "minimum", "fmax", "fmin")
def _r_maximum(op: _Op, ch: int) -> _Bound:
    ea, eb = op.e(op.args[0], ch), op.e(op.args[1], ch)
    if ea is None or eb is None:
        return ea if eb is None else eb
    return torch.maximum(ea, eb)


@_rule("neg", "abs", "clamp", "clamp_min", "clamp_max", "hardtanh")
def _r_lipschitz1(op: _Op, ch: int) -> _Bound:
    # Exact 1-Lipschitz maps; tensor bounds of clamp add their own error.
    return _sum(op.e(op.args[0], ch), *(op.e(a, ch) for a in op.args[1:3] if isinstance(a, Tensor)))


@_rule("relu")
def _r_relu(op: _Op, ch: int) -> _Bound:
    x = op.args[0]
    e = op.e(x, ch)
    if e is not None:
        op.set_aux(ch, op.abs(x) <= e)
    return e


@_rule("threshold")
def _r_threshold(op: _Op, ch: int) -> _Bound:
    x, threshold, value = op.args[:3]
    e = op.e(x, ch)
    if e is None:
        return None
    kink = (x - threshold).abs() <= e
    return e + torch.where(kink, abs(float(threshold) - float(value)), 0.0)


@_rule("leaky_relu")
def _r_leaky_relu(op: _Op, ch: int) -> _Bound:
    slope = abs(float(op.arg(1, "negative_slope", 0.01)))
    return _sum(_scale(op.e(op.args[0], ch), max(1.0, slope)), op.rnd(ch, "out", lambda: op.abs(op.out)))


@_rule("_prelu_kernel")
def _r_prelu(op: _Op, ch: int) -> _Bound:
    x, w = op.args[:2]
    ex, ew = op.e(x, ch), op.e(w, ch)
    positive = x > 0
    return _sum(
        None if ex is None else torch.where(positive, ex, ex * op.abs(w)),
        None if ew is None else torch.where(positive, 0.0, ew * op.abs(x)),
        op.rnd(ch, "out", lambda: op.abs(op.out)),
    )


def _unary(deriv: Callable[[_Op], Tensor | float], rounding: Callable[[_Op], Tensor]) -> _Rule:
    """``|f'(x)| E(x)`` plus the op's own rounding, ``eps * rounding``."""
    def rule(op: _Op, ch: int) -> _Bound:
        e = op.e(op.args[0], ch)
        prop = None if e is None else e * op.memo("deriv", lambda: deriv(op))
        return _sum(prop, op.rnd(ch, "own", lambda: rounding(op)))
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
    def guarded(op: _Op, ch: int) -> _Bound:
        if not isinstance(op.args[0], Tensor) or isinstance(op.args[1], Tensor):
            raise _Unsupported("pow with a tensor exponent")
        return rule(op, ch)
    return guarded


_RULES["pow"] = _pow_guard(_RULES["pow"])


# ---- gradients of elementwise ops -----------------------------------------------------------------


@_rule("threshold_backward")
def _r_threshold_backward(op: _Op, ch: int) -> _Bound:
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
def _r_hardtanh_backward(op: _Op, ch: int) -> _Bound:
    g, x, lo, hi = op.args[:4]
    eg, ex = op.e(g, ch), op.e(x, ch)
    passed = None if eg is None else torch.where((x > lo) & (x < hi), eg, 0.0)
    if ex is None:
        return passed
    kink = ((x - lo).abs() <= ex) | ((x - hi).abs() <= ex)
    switched = op.abs(g) if eg is None else op.abs(g) + eg
    return torch.where(kink, switched, 0.0 if passed is None else passed)


@_rule("leaky_relu_backward")
def _r_leaky_relu_backward(op: _Op, ch: int) -> _Bound:
    g, x, slope = op.args[:3]
    slope = float(slope)
    eg = op.e(g, ch)
    factor = torch.where(x > 0, 1.0, abs(slope))
    kink = op.tracker.kink(x, ch)
    return _sum(
        None if eg is None else eg * factor,
        None if kink is None else torch.where(kink, op.abs(g) * abs(1 - slope), 0.0),
        op.rnd(ch, "own", lambda: op.abs(op.out)),
    )


def _smooth_backward(first: float, second: Callable[[_Op], Tensor | float],
                     rounding: Callable[[_Op], Tensor], uses_output: bool = False) -> _Rule:
    """``g * f'(x)``: ``|f'| E(g) + |g| |f''| E(x)`` plus rounding."""
    def rule(op: _Op, ch: int) -> _Bound:
        g, x = op.args[:2]
        eg, ex = op.e(g, ch), op.e(x, ch)
        return _sum(
            _scale(eg, first),
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
def _r_hardswish_backward(op: _Op, ch: int) -> _Bound:
    # f' = 0 below -3, (2x + 3) / 6 between, 1 above; f' jumps by 1/2 at both ends.
    g, x = op.args[:2]
    eg, ex = op.e(g, ch), op.e(x, ch)
    middle = (x >= -3) & (x <= 3)
    slope = op.memo("slope", lambda: torch.where(middle, ((2 * x + 3) / 6).abs(), (x > 3).to(x.dtype)))
    return _sum(
        None if eg is None else eg * slope,
        None if ex is None else op.abs(g) * ex * torch.where(middle, 1 / 3, 0.0)
        + torch.where(((x + 3).abs() <= ex) | ((x - 3).abs() <= ex), 0.5 * op.abs(g), 0.0),
        op.rnd(ch, "own", lambda: 4 * op.abs(g) * (slope + op.abs(x) / 3)),
    )


@_rule("hardsigmoid_backward")
def _r_hardsigmoid_backward(op: _Op, ch: int) -> _Bound:
    g, x = op.args[:2]
    eg, ex = op.e(g, ch), op.e(x, ch)
    middle = (x > -3) & (x < 3)
    return _sum(
        None if eg is None else torch.where(middle, eg / 6, 0.0),
        None if ex is None else torch.where(((x + 3).abs() <= ex) | ((x - 3).abs() <= ex),
                                            op.abs(g) / 6, 0.0),
        op.rnd(ch, "own", lambda: op.abs(g) / 3),
    )


@_rule("softplus_backward")
def _r_softplus_backward(op: _Op, ch: int) -> _Bound:
    g, x, beta = op.args[:3]
    eg, ex = op.e(g, ch), op.e(x, ch)
    return _sum(eg, None if ex is None else op.abs(g) * ex * abs(float(beta)) / 4,
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
def _r_layer_norm(op: _Op, ch: int) -> tuple[_Bound, _Bound, _Bound]:
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

    out = _sum(
        None if ex is None else wa * _normalized_bound(ex, xa, r, dims),
        None if ew is None else xa * ew,
        eb,
        op.rnd(ch, "own", rounding),
    )
    return (out, None, None)


@_rule("native_layer_norm_backward")
def _r_layer_norm_backward(op: _Op, ch: int) -> tuple[_Bound, _Bound, _Bound]:
    g, x, normalized_shape, _mean, _rstd, w, _b, mask = op.args[:8]
    if not mask[0]:
        return (None, None, None)
    eps = 0.0  # the saved rstd already holds it; recompute it from the saved statistics
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    n = math.prod(normalized_shape)
    r = _rstd.reshape(_rstd.shape + (1,) * (x.dim() - _rstd.dim())) if _rstd.dim() < x.dim() else _rstd
    xhat = op.memo("xhat", lambda: (x - _mean.reshape(r.shape)) * r)
    xa = op.memo("xhat_abs", xhat.abs)
    wa = 1.0 if w is None else op.abs(w)
    ghat = op.memo("ghat", lambda: g * w if w is not None else g)
    ga = op.memo("ghat_abs", ghat.abs)
    gi = op.out[0]
    eg, ew, ex = op.e(g, ch), op.e(w, ch), op.e(x, ch)
    terms: list[_Bound] = []
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
        factor=n + 4 + eps))
    return (_sum(*terms), None, None)


# ---- reductions, pooling, resampling --------------------------------------------------------------


def _linear_sum(count: Callable[[_Op], float], extra: float = 1.0) -> _Rule:
    """A linear op with nonnegative weights that sums at most ``count`` terms per element (pools,
    sums, means, interpolation, the backward of a gather): apply it to the bound, and add
    ``(count + extra) * eps * op(|x|)``."""
    def rule(op: _Op, ch: int) -> _Bound:
        x = op.args[0]
        e = op.e(x, ch)
        return _sum(
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


@_rule("amax", "amin")
def _r_amax(op: _Op, ch: int) -> _Bound:
    e = op.e(op.args[0], ch)
    return None if e is None else op.func(e, *op.args[1:], **op.kwargs)


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
def _r_max_pool_backward(op: _Op, ch: int) -> _Bound:
    g, x, kernel, stride, padding, dilation, ceil_mode, indices = op.args[:8]
    name = op.func.overloadpacket.__name__
    eg, ex = op.e(g, ch), op.e(x, ch)
    k = float(math.prod(kernel))
    prop = _sum(
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
    return _sum(prop, spread)


# ---- normalisation and softmax --------------------------------------------------------------------


def _channel_view(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape((1, -1) + (1,) * (like.dim() - 2))


def _batch_norm_eval(op: _Op, ch: int, x: Tensor, w: Tensor | None, b: Tensor | None, mean: Tensor,
                     var: Tensor, eps: float) -> _Bound:
    std = op.memo("std", lambda: _channel_view(torch.sqrt(var + eps), x))
    wv = None if w is None else _channel_view(w, x)
    scale = op.memo("scale", lambda: (1 / std) if wv is None else (wv.abs() / std))
    centred = op.memo("centred", lambda: (x - _channel_view(mean, x)).abs())
    ex, ew, eb = op.e(x, ch), op.e(w, ch), op.e(b, ch)
    em, ev = op.e(mean, ch), op.e(var, ch)

    def rounding() -> Tensor:
        r = (op.abs(x) + _channel_view(mean, x).abs()) * scale
        return r if b is None else r + _channel_view(b, x).abs()

    return _sum(
        None if ex is None else ex * scale,
        None if ew is None else _channel_view(ew, x) * centred / std,
        None if eb is None else _channel_view(eb, x),
        None if em is None else _channel_view(em, x) * scale,
        None if ev is None else _channel_view(ev, x) * centred * scale / (2 * std * std),
        op.rnd(ch, "own", rounding, factor=5.0),
    )


@_rule("native_batch_norm", "cudnn_batch_norm")
def _r_batch_norm(op: _Op, ch: int) -> tuple[_Bound, ...]:
    x, w, b, mean, var, training, _momentum, eps = op.args[:8]
    if training or mean is None or var is None:
        raise _Unsupported("batch norm in training mode")
    out = _batch_norm_eval(op, ch, x, w, b, mean, var, float(eps))
    return (out,) + (None,) * (len(op.out) - 1)


@_rule("_native_batch_norm_legit_no_training")
def _r_batch_norm_legit(op: _Op, ch: int) -> tuple[_Bound, ...]:
    x, w, b, mean, var, _momentum, eps = op.args[:7]
    return (_batch_norm_eval(op, ch, x, w, b, mean, var, float(eps)),) + (None,) * (len(op.out) - 1)


@_rule("native_batch_norm_backward")
def _r_batch_norm_backward(op: _Op, ch: int) -> tuple[_Bound, _Bound, _Bound]:
    g, x, w, mean, var, _sm, _si, train, eps = op.args[:9]
    if train or var is None:
        raise _Unsupported("batch norm gradient in training mode")
    std = _channel_view(torch.sqrt(var + float(eps)), x)
    scale = (1 / std) if w is None else _channel_view(w, x).abs() / std
    eg, ew, ev = op.e(g, ch), op.e(w, ch), op.e(var, ch)
    gi = _sum(
        None if eg is None else eg * scale,
        None if ew is None else op.abs(g) * _channel_view(ew, x) / std,
        None if ev is None else op.abs(g) * scale * _channel_view(ev, x) / (2 * std * std),
        op.rnd(ch, "own", lambda: op.abs(g) * scale, factor=4.0),
    )
    return (gi, None, None)


@_rule("_softmax")
def _r_softmax(op: _Op, ch: int) -> _Bound:
    x, dim = op.args[:2]
    s = op.out
    n = x.shape[dim] if x.dim() else 1
    e = op.e(x, ch)

    def rounding() -> Tensor:
        spread = x - x.amax(dim, keepdim=True)
        return s * (n + 5 + spread.abs()) + s * (s * spread.abs()).sum(dim, keepdim=True)

    return _sum(None if e is None else s * (e + (s * e).sum(dim, keepdim=True)),
                op.rnd(ch, "own", rounding))


@_rule("_log_softmax")
def _r_log_softmax(op: _Op, ch: int) -> _Bound:
    x, dim = op.args[:2]
    n = x.shape[dim] if x.dim() else 1
    e = op.e(x, ch)
    s = op.memo("s", lambda: op.out.exp())
    return _sum(
        None if e is None else e + (s * e).sum(dim, keepdim=True),
        op.rnd(ch, "own", lambda: 2 * (x - x.amax(dim, keepdim=True)).abs() + 2 * op.abs(op.out) + n + 2),
    )


@_rule("_softmax_backward_data")
def _r_softmax_backward(op: _Op, ch: int) -> _Bound:
    g, s, dim = op.args[:3]
    n = s.shape[dim] if s.dim() else 1
    eg, es = op.e(g, ch), op.e(s, ch)
    gs = op.memo("gs", lambda: (g * s).sum(dim, keepdim=True))
    return _sum(
        None if eg is None else s * eg + s * (s * eg).sum(dim, keepdim=True),
        None if es is None else (g - gs).abs() * es + s * (op.abs(g) * es).sum(dim, keepdim=True),
        op.rnd(ch, "own", lambda: s * (op.abs(g) + (op.abs(g) * s).sum(dim, keepdim=True)), factor=n + 3),
    )


@_rule("_log_softmax_backward_data")
def _r_log_softmax_backward(op: _Op, ch: int) -> _Bound:
    g, out, dim = op.args[:3]
    n = out.shape[dim] if out.dim() else 1
    eg, eo = op.e(g, ch), op.e(out, ch)
    s = op.memo("s", lambda: out.exp())
    gsum = op.memo("gsum", lambda: g.sum(dim, keepdim=True))
    return _sum(
        None if eg is None else eg + s * eg.sum(dim, keepdim=True),
        None if eo is None else gsum.abs() * s * eo,
        op.rnd(ch, "own", lambda: op.abs(op.out) + s * op.abs(g).sum(dim, keepdim=True), factor=n + 3),
    )


# --------------------------------------------------------------------------------------------------
# Inputs, modules, maps
# --------------------------------------------------------------------------------------------------


def _check_module(module: object, role: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise FcconvError(
            f"compare expects the {role} to be a torch.nn.Module; got {type(module).__name__}. "
            "Pass the module itself (e.g. nn.Linear(4, 2)), not its output or a state_dict."
        )
    for name, sub in module.named_modules():
        if sub.training and isinstance(sub, _STOCHASTIC):
            where = f" at '{name}'" if name else ""
            raise FcconvError(
                f"The {role} is in training mode and contains {type(sub).__name__}{where}: its outputs "
                "are random (dropout) or depend on the batch and update running statistics (batch "
                "norm), so no two runs can be compared. compare does not change modes for you: call "
                f"{role}.eval() first."
            )
    return module


def _first_floating(module: nn.Module) -> Tensor | None:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t
    return None


def _module_dtype_device(module: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    t = _first_floating(module)
    return (None, None) if t is None else (t.dtype, t.device)


def _is_shape(value: object) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    return (isinstance(value, (tuple, list, torch.Size)) and len(value) > 0
            and all(isinstance(s, int) and not isinstance(s, bool) for s in value))


def _round_through(x: Tensor, dtypes: Sequence[torch.dtype], final: torch.dtype) -> Tensor:
    """Round ``x`` through every dtype so that the result is exact in each of them."""
    for dtype in dtypes:
        x = x.to(dtype)
    return x.to(final)


def _example_batches(example_inputs: object, dtypes: Sequence[torch.dtype], work: torch.dtype,
                     device: torch.device, generator: torch.Generator) -> list[tuple[str, Tensor]]:
    if isinstance(example_inputs, Tensor):
        tensors = [example_inputs]
    elif _is_shape(example_inputs):
        shape = (example_inputs,) if isinstance(example_inputs, int) else tuple(example_inputs)  # type: ignore[arg-type]
        if any(s <= 0 for s in shape):
            raise FcconvError(
                f"example_inputs as a shape must hold positive sizes; got {shape}. Pass the per-sample "
                "shape without the batch dimension, e.g. (3, 32, 32)."
            )
        big = 1e3 if all(torch.finfo(d).max > 1e30 for d in dtypes) else 10.0
        batches = []
        full = (_BATCH_SIZE, *shape)
        for label in _GENERATED:
            if label == "normal":
                x = torch.randn(full, generator=generator, dtype=_F64)
            elif label == "normal x1e3":
                x = torch.randn(full, generator=generator, dtype=_F64) * big
                label = f"normal x{big:g}"
            elif label == "negative":
                x = -torch.randn(full, generator=generator, dtype=_F64).abs()
            else:
                x = torch.rand(full, generator=generator, dtype=_F64)
            batches.append((label, _round_through(x, dtypes, work).to(device)))
        return batches
    elif isinstance(example_inputs, (list, tuple)) and example_inputs and all(
            isinstance(t, Tensor) for t in example_inputs):
        tensors = list(example_inputs)
    else:
        raise FcconvError(
            "example_inputs must be a batch tensor, a list of batch tensors, or the per-sample input "
            f"shape of the reference (e.g. (3, 32, 32), or 4 for 4 features); got {example_inputs!r:.80}."
        )
    out = []
    for i, t in enumerate(tensors):
        if t.dim() == 0 or t.shape[0] == 0:
            raise FcconvError(
                f"Example input {i} has shape {tuple(t.shape)}; a batch tensor needs a batch dimension "
                "of at least one sample first. Pass x.unsqueeze(0) for a single sample, or a per-sample "
                "shape to get generated inputs."
            )
        out.append((f"batch {i}", t.detach()))
    return out


def _output_maps(output_map: object) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    def identity(y: Any) -> Any:
        return y

    if output_map is None:
        return identity, identity
    if callable(output_map):
        return identity, output_map
    if isinstance(output_map, (tuple, list)) and len(output_map) == 2 and all(
            m is None or callable(m) for m in output_map):
        return (output_map[0] or identity), (output_map[1] or identity)
    raise FcconvError(
        "output_map must be a callable applied to the candidate's output, or a pair (reference_map, "
        f"candidate_map) of callables or None; got {output_map!r:.80}."
    )


def _flat(y: Any, role: str, raw: Any) -> Tensor:
    if not isinstance(y, Tensor):
        raise FcconvError(
            f"The {role} returned {type(raw).__name__}, and after output_map {type(y).__name__}; compare "
            "needs one tensor. Pass output_map=(pick_reference, pick_candidate), e.g. "
            "output_map=(lambda y: y[0], lambda y: y[0]), to select the tensor to compare."
        )
    if not y.is_floating_point():
        raise FcconvError(
            f"The {role}'s output has dtype {y.dtype}; compare measures floating-point differences. "
            "Compare the logits, not argmax or class indices."
        )
    if y.dim() == 0:
        raise FcconvError(
            f"The {role}'s output is a scalar; compare needs the batch dimension first. Compare the "
            "per-sample outputs (before any loss or reduction)."
        )
    return y.reshape(y.shape[0], -1)


def _run(module: nn.Module, x: Tensor, role: str) -> Any:
    try:
        return module(x)
    except FcconvError:
        raise
    except Exception as err:
        advice = (
            "If it expects another layout than the reference, pass input_map, e.g. "
            "input_map=lambda x: x.reshape(-1, 1, 2, 2)." if role == "candidate" else
            "example_inputs are the reference's inputs: per-sample shapes without the batch dimension, "
            "or batch tensors it accepts."
        )
        raise FcconvError(
            f"Running the {role} ({type(module).__name__}) on an input of shape {tuple(x.shape)} "
            f"({_dtype_name(x.dtype)}) failed: {err} {advice}"
        ) from err


def _apply_map(fn: Callable[[Any], Any], value: Any, what: str) -> Any:
    try:
        return fn(value)
    except FcconvError:
        raise
    except Exception as err:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise FcconvError(f"{what} failed on {shape}: {err}") from err


def _float64_copies(reference: nn.Module, candidate: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Deep copies with float64 parameters and buffers; the originals are never touched.

    Parameters are converted straight into the copy (no working-dtype duplicate), and tensors that
    share storage in the originals (``share_weights=True`` conversions) share it in the copies.
    """
    memo: dict[int, Any] = {}
    converted: dict[tuple[int, int, int, torch.dtype], Tensor] = {}  # storage, offset, numel, dtype
    for module in (reference, candidate):
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) in memo or not t.is_floating_point():
                continue
            key = (t.untyped_storage().data_ptr(), int(t.storage_offset()), t.numel(), t.dtype)
            if t.is_contiguous() and key in converted:
                data = converted[key].view(t.shape)
            else:
                data = t.detach().to(_F64, copy=True)
                if t.is_contiguous():
                    converted[key] = data
            memo[id(t)] = nn.Parameter(data, requires_grad=False) if isinstance(t, nn.Parameter) else data
    try:
        copies = copy.deepcopy(reference, memo), copy.deepcopy(candidate, memo)
    except Exception as err:
        raise FcconvError(
            f"compare needs deep copies of both modules for its float64 run, and copying failed: {err}. "
            "Modules that hold non-leaf tensors as attributes cannot be deep-copied; register them as "
            "buffers, or compute them in forward."
        ) from err
    return copies[0].double(), copies[1].double()


# --------------------------------------------------------------------------------------------------
# Running and measuring
# --------------------------------------------------------------------------------------------------


@dataclass
class _Pass:
    """One module's results on one batch: outputs, input gradients, and their bounds per channel."""

    out: Tensor
    grad: Tensor | None
    out_bounds: list[_Bound]
    grad_bounds: list[_Bound]
    unsupported: str | None
    sample_shape: tuple[int, ...]
    out_deep: bool = False
    grad_deep: bool = False


def _forward_pass(module: nn.Module, x: Tensor, in_map: Callable[[Tensor], Tensor] | None,
                  out_map: Callable[[Any], Any], role: str, cotangent: Callable[[Tensor], Tensor] | None,
                  tracker: _Tracker | None = None) -> _Pass:
    """Run ``module`` on ``x`` (through ``in_map``), flatten its output, and with a cotangent return
    the gradient of ``<cotangent, output>`` with respect to ``x``."""
    grad = cotangent is not None
    x = x.detach().requires_grad_(True) if grad else x
    with torch.enable_grad() if grad else torch.no_grad():
        if tracker is not None:
            tracker.__enter__()
        try:
            xin = x if in_map is None else _apply_map(in_map, x, "input_map")
            raw = _run(module, xin, role)
            mapped = _apply_map(out_map, raw, "output_map")
            flat = _flat(mapped, role, raw)
            gx = None
            if cotangent is not None:
                gx = torch.autograd.grad((flat * cotangent(flat)).sum(), x, allow_unused=True)[0]
                if gx is None:
                    gx = torch.zeros_like(x)
        finally:
            if tracker is not None:
                tracker.__exit__(None, None, None)
    sample_shape = tuple(mapped.shape[1:]) if isinstance(mapped, Tensor) else ()
    if tracker is None:
        return _Pass(flat.detach(), None if gx is None else gx.detach(), [], [], None, sample_shape)
    return _Pass(flat.detach(), None if gx is None else gx.detach(), tracker.bounds(flat),
                 [] if gx is None else tracker.bounds(gx), tracker.unsupported, sample_shape,
                 tracker.deep(flat), gx is not None and tracker.deep(gx))


@dataclass
class _Batch:
    label: str
    ref: Tensor  # working precision, flattened (N, m)
    cand: Tensor  # converted to ref's dtype
    ref64: Tensor
    cand64: Tensor
    bound: Tensor | None  # working-precision bound on |ref - cand|
    bound64: Tensor | None  # float64 rounding bound on |ref64 - cand64|
    sample_shape: tuple[int, ...]
    single: bool  # no bound went through more than one rounded dot product


def _diff(a: Tensor, b: Tensor) -> Tensor:
    """``|a - b|`` in float64, with equal infinities and two NaNs 0 apart, one NaN infinitely far."""
    a64, b64 = a.to(_F64), b.to(_F64)
    d = (a64 - b64).abs()
    d = torch.where(a64 == b64, torch.zeros_like(d), d)
    na, nb = torch.isnan(a64), torch.isnan(b64)
    d = torch.where(na & nb, torch.zeros_like(d), d)
    return torch.where(na ^ nb, torch.full_like(d, math.inf), d)


def _unravel(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    if not shape:
        return (flat_index,)
    out = []
    for size in reversed(shape):
        out.append(flat_index % size)
        flat_index //= size
    return tuple(reversed(out))


class _Measure:
    """Collects the batches of one quantity and turns them into an :class:`Agreement`."""

    def __init__(self, quantity: str) -> None:
        self.quantity = quantity
        self.batches: list[_Batch] = []
        self.params: list[Tensor | None] = []  # parameter-rounding allowance per batch

    def _argmax(self, values: list[Tensor]) -> tuple[float, int, int, int]:
        best, where = -math.inf, (0, 0, 0)
        for b, v in enumerate(values):
            if v.numel() == 0:
                continue
            vmax = v.max()
            m = float(vmax)
            if m > best or (math.isnan(m) and not math.isnan(best)):
                idx = int(torch.argmax(torch.nan_to_num(v, nan=math.inf)))
                best, where = m, (b, idx // v.shape[1], idx % v.shape[1])
        return (0.0 if best == -math.inf else best), *where

    def _location(self, b: int, i: int, j: int, float64: bool) -> Location:
        batch = self.batches[b]
        ref, cand = (batch.ref64, batch.cand64) if float64 else (batch.ref, batch.cand)
        return Location(b, batch.label, i, _unravel(j, batch.sample_shape),
                        float(ref[i, j]), float(cand[i, j]))

    def float64_ratio(self, with_params: bool) -> tuple[float | None, tuple[int, int, int]]:
        if any(b.bound64 is None for b in self.batches):
            return None, (0, 0, 0)
        ratios = []
        for k, b in enumerate(self.batches):
            bound = b.bound64
            assert bound is not None
            extra = self.params[k] if with_params and len(self.params) == len(self.batches) else None
            if extra is not None:
                bound = bound + extra
            ratios.append(_ratio_of(_diff(b.ref64, b.cand64), bound))
        best, *where = self._argmax(ratios)
        return best, (where[0], where[1], where[2])

    def agreement(self, with_params: bool) -> Agreement:
        batches = self.batches
        diffs = [_diff(b.ref, b.cand) for b in batches]
        count = sum(d.numel() for d in diffs)
        per_sample = batches[0].ref.shape[1]
        max_abs, *w = self._argmax(diffs)
        ref_scale = max((float(b.ref.to(_F64).abs().nan_to_num(nan=0.0).max()) if b.ref.numel() else 0.0)
                        for b in batches)
        max_ulp = max((int(ulp_distance(b.ref, b.cand).max()) if b.ref.numel() else 0) for b in batches)
        identical = sum(int((_bits(b.ref) == _bits(b.cand)).sum()) for b in batches)
        worst = None if max_abs == 0 else self._location(w[0], w[1], w[2], False)

        bound_ratio: float | None = None
        bound_worst = None
        if all(b.bound is not None for b in batches):
            ratios = [_ratio_of(d, b.bound) for d, b in zip(diffs, batches)]  # type: ignore[arg-type]
            bound_ratio, *bw = self._argmax(ratios)
            bound_worst = None if bound_ratio == 0 else self._location(bw[0], bw[1], bw[2], False)

        diffs64 = [_diff(b.ref64, b.cand64) for b in batches]
        max_abs64, *w64 = self._argmax(diffs64)
        scale64 = max((float(b.ref64.abs().nan_to_num(nan=0.0).max()) if b.ref64.numel() else 0.0)
                      for b in batches)
        rel64 = _relative(max_abs64, scale64)
        ratio64, _ = self.float64_ratio(with_params)
        single = None if ratio64 is None else all(b.single for b in batches)
        ok64 = rel64 <= FLOAT64_RTOL or (ratio64 is not None and ratio64 <= 1 and bool(single))
        return Agreement(
            quantity=self.quantity, dtype=batches[0].ref.dtype, per_sample=per_sample, count=count,
            max_abs=max_abs, max_rel=_relative(max_abs, ref_scale), max_ulp=max_ulp,
            bit_identical_fraction=identical / count if count else 1.0, worst=worst,
            bound_ratio=bound_ratio, bound_ok=None if bound_ratio is None else bound_ratio <= 1,
            bound_worst=bound_worst, float64_max_abs=max_abs64, float64_max_rel=rel64,
            float64_bound_ratio=ratio64, bound_single_layer=single,
            float64_worst=None if max_abs64 == 0 else self._location(w64[0], w64[1], w64[2], True),
            float64_ok=ok64,
        )

    def constant_offset(self) -> bool:
        """Whether the float64 difference is the same for every sample (a bias, a constant)."""
        signed = torch.cat([(b.ref64 - b.cand64) for b in self.batches])
        if signed.shape[0] < 2:
            return False
        spread = float((signed.amax(0) - signed.amin(0)).max())
        return float(signed.abs().max()) > 0 and spread <= 1e-9 * float(signed.abs().max())

    def permuted(self) -> bool:
        """Whether each sample holds the same values in another order (a layout difference)."""
        for b in self.batches:
            r, c = b.ref64.sort(1).values, b.cand64.sort(1).values
            scale = float(r.abs().max()) if r.numel() else 0.0
            if float((r - c).abs().max()) > FLOAT64_RTOL * max(scale, 1e-300):
                return False
        return True


def _bits(t: Tensor) -> Tensor:
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()])


def _ratio_of(diff: Tensor, bound: Tensor) -> Tensor:
    ratio = diff / bound
    return torch.where(diff == 0, torch.zeros_like(ratio), ratio)


def _relative(diff: float, scale: float) -> float:
    if diff == 0:
        return 0.0
    return diff / scale if scale > 0 else math.inf


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


# --------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------


def compare(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Tensor | Sequence[Tensor] | Sequence[int] | int,
    *,
    input_map: Callable[[Tensor], Tensor] | None = None,
    output_map: OutputMap | tuple[OutputMap | None, OutputMap | None] | None = None,
    grad: bool = False,
    seed: int = 0,
    parameter_rounding: bool = False,
    progress: bool = False,
) -> EquivalenceReport:
    """Measure whether ``candidate`` computes the same function as ``reference``, with a certificate.

    Both modules run as given (their dtype, device and train/eval mode; nothing is changed on them,
    no ``.grad`` is written) and as float64 deep copies. See the module docstring for the bound and
    the verdict.

    Args:
        reference: the module taken as correct, e.g. an ``nn.Linear``.
        candidate: the module to check, e.g. the conv made by :func:`fcconv.linear_to_conv`.
        example_inputs: the reference's inputs. A tensor is one batch (batch dimension first), a list
            of tensors several batches; tensors keep their dtype and device. A tuple of ints (or one
            int) is a per-sample shape without the batch dimension: then four seeded batches of two
            samples are generated, standard normal, normal x1e3 (x10 for float16), all negative, and
            uniform in [0, 1), in the modules' dtype and on their device, rounded so that they are
            exact in both modules' dtypes.
        input_map: maps a reference input batch to the candidate's layout, e.g.
            ``lambda x: x.reshape(-1, 1, 2, 2)`` to feed a conv what a ``Linear(4, 2)`` gets flat.
            Gradients are taken with respect to the reference's input, through this map.
        output_map: relates the output layouts. Both outputs are flattened from dim 1 and compared
            element by element; a callable is first applied to the candidate's output, a pair
            ``(reference_map, candidate_map)`` to each (None for no map), e.g.
            ``lambda y: y.permute(0, 2, 3, 1)`` for a candidate that gives NCHW where the reference
            gives NHWC.
        grad: also compare the gradients with respect to the input of ``<g, output>`` for a seeded
            random cotangent ``g``.
        seed: seed of the generated inputs and cotangents.
        parameter_rounding: allow the parameters of the two modules to differ by one rounding of the
            working dtype in the float64 verdict: for conversions that compute weights (folded
            padding taps, fused batch norm). It weakens the verdict: leave it off unless the reason
            suggests it.
        progress: show a progress bar over the batches (tqdm), for large models.

    Returns:
        An :class:`EquivalenceReport`; ``str(report)`` is a table, ``report.equivalent`` the verdict.

    Raises:
        FcconvError: on wrong argument types, a module in training mode with dropout or batch norm,
            inputs a module cannot run, or outputs that are not floating tensors.
        NotEquivalentError: if the outputs (after ``output_map``) do not have the same size.

    Example:
        >>> lin = nn.Linear(4, 2)
        >>> report = compare(lin, fcconv.linear_to_conv(lin, (1, 2, 2)), (4,),
        ...                  input_map=lambda x: x.reshape(-1, 1, 2, 2))
    """
    _check_module(reference, "reference")
    _check_module(candidate, "candidate")
    if input_map is not None and not callable(input_map):
        raise FcconvError(f"input_map must be a callable such as lambda x: x.reshape(-1, 1, 2, 2); "
                          f"got {input_map!r:.80}.")
    ref_map, cand_map = _output_maps(output_map)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise FcconvError(f"seed must be an int; got {seed!r}.")
    ref_dtype, ref_device = _module_dtype_device(reference)
    cand_dtype, cand_device = _module_dtype_device(candidate)
    if ref_device is not None and cand_device is not None and ref_device != cand_device:
        raise FcconvError(
            f"The reference is on {ref_device} and the candidate on {cand_device}; compare runs both on "
            "the same inputs. Move them to one device, e.g. candidate.to(reference_device)."
        )
    work = ref_dtype or cand_dtype or torch.get_default_dtype()
    device = ref_device or cand_device or torch.device("cpu")
    dtypes = [d for d in (cand_dtype, ref_dtype) if d is not None] or [work]
    generator = torch.Generator().manual_seed(seed)
    batches = _example_batches(example_inputs, dtypes, work, device, generator)
    if grad and any(not x.is_floating_point() for _, x in batches):
        raise FcconvError("grad=True needs floating-point inputs; the example inputs include integer "
                          "tensors. Pass grad=False to compare the outputs only.")

    ref64, cand64 = _float64_copies(reference, candidate)
    abs_cache = _AbsCache((ref64, cand64))
    outputs, gradients = _Measure("outputs"), _Measure("input gradients") if grad else None
    unsupported: str | None = None
    cotangents: dict[int, Tensor] = {}

    def cotangent_for(b: int, dtypes_: Sequence[torch.dtype]) -> Callable[[Tensor], Tensor]:
        def make(flat: Tensor) -> Tensor:
            if b not in cotangents:
                g = torch.randn(tuple(flat.shape), generator=generator, dtype=_F64)
                cotangents[b] = _round_through(g, dtypes_, _F64)
            return cotangents[b].to(device=flat.device, dtype=flat.dtype)
        return make

    for b, (label, x) in enumerate(tqdm(batches, desc="compare", unit="batch", disable=not progress)):
        x64 = x.to(_F64) if x.is_floating_point() else x
        # Working precision, on the user's modules.
        ref_w = _forward_pass(reference, x, None, ref_map, "reference", None)
        cand_w = _forward_pass(candidate, x, input_map, cand_map, "candidate", None)
        _check_sizes(ref_w, cand_w)
        out_dtypes = [cand_w.out.dtype, ref_w.out.dtype]
        cot = cotangent_for(b, out_dtypes) if grad else None
        if grad:
            ref_w = _forward_pass(reference, x, None, ref_map, "reference", cot)
            cand_w = _forward_pass(candidate, x, input_map, cand_map, "candidate", cot)
        eps_ref = max(_eps(ref_w.out.dtype), _eps(x.dtype) if x.is_floating_point() else 0.0)
        eps_cand = max(_eps(cand_w.out.dtype), _eps(x.dtype) if x.is_floating_point() else 0.0)
        # Float64 copies, with the rounding bound propagated for the working dtype and for float64.
        ref_hi = _forward_pass(ref64, x64, None, ref_map, "reference", cot,
                               _Tracker((eps_ref, _EPS64), abs_cache=abs_cache))
        cand_hi = _forward_pass(cand64, x64, input_map, cand_map, "candidate", cot,
                                _Tracker((eps_cand, _EPS64), abs_cache=abs_cache))
        unsupported = unsupported or ref_hi.unsupported or cand_hi.unsupported
        outputs.batches.append(_make_batch(label, ref_w.out, cand_w.out, ref_hi.out, cand_hi.out,
                                           ref_hi.out_bounds, cand_hi.out_bounds, ref_w.sample_shape,
                                           unsupported, not (ref_hi.out_deep or cand_hi.out_deep)))
        if gradients is not None:
            assert ref_w.grad is not None and cand_w.grad is not None
            assert ref_hi.grad is not None and cand_hi.grad is not None
            gradients.batches.append(_make_batch(label, ref_w.grad, cand_w.grad, ref_hi.grad,
                                                 cand_hi.grad, ref_hi.grad_bounds, cand_hi.grad_bounds,
                                                 tuple(x.shape[1:]), unsupported,
                                                 not (ref_hi.grad_deep or cand_hi.grad_deep)))

    measures = [outputs] + ([gradients] if gradients is not None else [])
    first = [m.agreement(with_params=False) for m in measures]
    # The parameter channel: one working-precision rounding of every parameter of both modules.
    single = all(b.single for m in measures for b in m.batches)
    need_params = unsupported is None and single and (
        parameter_rounding or not all(a.float64_ok for a in first))
    if need_params:
        _parameter_pass(ref64, cand64, batches, input_map, ref_map, cand_map, measures, cotangents,
                        _eps(work) / 2, _eps(cand_dtype or work) / 2, grad, abs_cache)
    final = [m.agreement(with_params=parameter_rounding and need_params) for m in measures]
    params_would_pass = need_params and not parameter_rounding and all(
        a.float64_ok or m.agreement(with_params=True).float64_ok for m, a in zip(measures, final))
    equivalent = all(a.float64_ok for a in final)
    reason = _reason(final, measures, equivalent, params_would_pass, parameter_rounding, unsupported, device)
    return EquivalenceReport(
        reference=type(reference).__name__, candidate=type(candidate).__name__,
        dtype=outputs.batches[0].ref.dtype, batches=len(batches),
        samples=sum(int(x.shape[0]) for _, x in batches), outputs=final[0],
        gradients=final[1] if len(final) > 1 else None, parameter_rounding=parameter_rounding,
        unsupported=unsupported, equivalent=equivalent, reason=reason,
    )


def _check_sizes(ref: _Pass, cand: _Pass) -> None:
    if ref.out.shape != cand.out.shape:
        raise NotEquivalentError(
            f"The outputs cannot be compared element by element: the reference gives "
            f"{(ref.out.shape[0], *ref.sample_shape)} ({ref.out.shape[1]} values per sample) and the "
            f"candidate {(cand.out.shape[0], *cand.sample_shape)} ({cand.out.shape[1]} per sample) "
            "after output_map, flattened from dim 1. If both hold the same values in other layouts, "
            "pass output_map to relate them, e.g. output_map=lambda y: y.permute(0, 2, 3, 1) or "
            "output_map=(None, lambda y: y[:, :10])."
        )


def _make_batch(label: str, ref: Tensor, cand: Tensor, ref64: Tensor, cand64: Tensor,
                ref_bounds: list[_Bound], cand_bounds: list[_Bound], sample_shape: tuple[int, ...],
                unsupported: str | None, single: bool) -> _Batch:
    n = ref.shape[0]
    ref, cand, ref64, cand64 = (t.reshape(n, -1) for t in (ref, cand, ref64, cand64))
    ref_bounds = [None if b is None else b.reshape(n, -1) for b in ref_bounds]
    cand_bounds = [None if b is None else b.reshape(n, -1) for b in cand_bounds]
    cand_conv = cand.to(ref.dtype)
    bound = bound64 = None
    if unsupported is None:
        zero = torch.zeros_like(ref64)
        work_r, f64_r = (b if b is not None else zero for b in ref_bounds)
        work_c, f64_c = (b if b is not None else zero for b in cand_bounds)
        tiny = torch.finfo(ref.dtype).tiny
        bound = (work_r + work_c).to(_F64) + tiny
        if cand.dtype != ref.dtype:  # converting the candidate's output rounds it once more
            bound = bound + _eps(ref.dtype) / 2 * cand.to(_F64).abs()
        bound64 = (f64_r + f64_c).to(_F64) + torch.finfo(_F64).tiny
    return _Batch(label, ref, cand_conv, ref64, cand64, bound, bound64, sample_shape, single)


def _parameter_pass(ref64: nn.Module, cand64: nn.Module, batches: list[tuple[str, Tensor]],
                    input_map: Callable[[Tensor], Tensor] | None, ref_map: Callable[[Any], Any],
                    cand_map: Callable[[Any], Any], measures: list[_Measure], cotangents: dict[int, Tensor],
                    u_ref: float, u_cand: float, grad: bool, abs_cache: _AbsCache) -> None:
    """Add, per batch, how far one rounding (``u``) of every parameter could move each value."""
    def initial(module: nn.Module) -> dict[int, tuple[Tensor, list[_Bound]]]:
        return {id(t): (t, [abs_cache.get(t) if abs_cache.get(t) is not None else t.detach().abs()])
                for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()}

    for b, (_, x) in enumerate(batches):
        x64 = x.to(_F64) if x.is_floating_point() else x
        cot = (lambda flat, b=b: cotangents[b].to(device=flat.device, dtype=flat.dtype)) if grad else None
        results = []
        for module, in_map, out_map, u, role in ((ref64, None, ref_map, u_ref, "reference"),
                                                 (cand64, input_map, cand_map, u_cand, "candidate")):
            tracker = _Tracker((0.0,), initial(module), abs_cache)
            p = _forward_pass(module, x64, in_map, out_map, role, cot, tracker)
            if p.unsupported is not None:
                for m in measures:
                    m.params = [None] * len(batches)
                return
            results.append((p, u))
        for m, attr in zip(measures, ("out_bounds", "grad_bounds")):
            total = None
            for p, u in results:
                bound = getattr(p, attr)[0]
                total = _sum(total, _scale(bound, u))
            m.params.append(None if total is None else total.reshape(total.shape[0], -1))


def _reason(agreements: list[Agreement], measures: list[_Measure], equivalent: bool,
            params_would_pass: bool, parameter_rounding: bool, unsupported: str | None,
            device: torch.device) -> str:
    dtype = _dtype_name(agreements[0].dtype)
    if equivalent:
        parts = []
        for a in agreements:
            if a.float64_max_rel <= FLOAT64_RTOL:
                how = f"below the {FLOAT64_RTOL:g} threshold"
            else:
                how = (f"above {FLOAT64_RTOL:g} but within the float64 rounding bound of this single "
                       f"layer ({_num(a.float64_bound_ratio or 0.0)} of it): the values cancel")
            text = f"in float64 the {a.quantity} agree to {_num(a.float64_max_rel)} relative, {how}"
            if a.bound_ok is None:
                text += (f"; the {dtype} differences (max {_num(a.max_abs)}, {a.max_ulp} ULP) have no "
                         "derived bound")
            elif a.bound_ok:
                kind = "bound" if a.bound_single_layer else "worst-case bound compounded over the layers"
                text += (f"; the {dtype} differences (max {_num(a.max_abs)}, {a.max_ulp} ULP) are within "
                         f"the rounding {kind} ({_num(a.bound_ratio or 0.0)} of it)")
            else:
                text += (f"; but the {dtype} differences exceed what rounding allows "
                         f"({_num(a.bound_ratio or 0.0)} times the bound) at {a.bound_worst}: one of the "
                         "modules computes in lower precision than its dtype")
                if device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                              or torch.backends.cudnn.allow_tf32):
                    text += (" (TF32 is enabled: set torch.backends.cuda.matmul.allow_tf32 = False and "
                             "torch.backends.cudnn.allow_tf32 = False to compare in full float32)")
            parts.append(text)
        lead = "same function: " + "; ".join(parts) + "."
        if parameter_rounding:
            lead += " (Parameters were allowed one rounding each: parameter_rounding=True.)"
        return lead
    parts = []
    for a, m in zip(agreements, measures):
        if a.float64_ok:
            continue
        beyond = (f", {_num(a.float64_bound_ratio)} times what float64 rounding allows"
                  if a.float64_bound_ratio is not None else "")
        text = (f"in float64 the {a.quantity} differ by up to {_num(a.float64_max_abs)} "
                f"({_num(a.float64_max_rel)} of the largest reference value, threshold {FLOAT64_RTOL:g}"
                f"{beyond}); largest difference at {a.float64_worst}")
        if m.constant_offset():
            text += ("; the difference is the same for every sample, a constant offset: a missing or "
                     "different bias")
        elif m.permuted():
            text += ("; every sample holds the same values in another order: a layout difference "
                     "(flatten order NCHW vs NHWC, channel order); if intended, relate the layouts "
                     "with output_map")
        parts.append(text)
    text = "not the same function: " + "; ".join(parts) + "."
    if params_would_pass:
        text += (f" The differences are within one {dtype} rounding of the parameters: if the candidate's "
                 "weights were computed from the reference's (folded padding, fused batch norm), pass "
                 "parameter_rounding=True to accept that.")
    elif unsupported is not None:
        text += f" (No rounding bound: {unsupported} has no rule.)"
    return text


def assert_equivalent(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Tensor | Sequence[Tensor] | Sequence[int] | int,
    *,
    input_map: Callable[[Tensor], Tensor] | None = None,
    output_map: OutputMap | tuple[OutputMap | None, OutputMap | None] | None = None,
    grad: bool = False,
    seed: int = 0,
    parameter_rounding: bool = False,
    progress: bool = False,
) -> EquivalenceReport:
    """:func:`compare`, raising when the modules are not the same function.

    Args:
        reference: the module taken as correct.
        candidate: the module to check.
        example_inputs: as for :func:`compare`.
        input_map: as for :func:`compare`.
        output_map: as for :func:`compare`.
        grad: as for :func:`compare`.
        seed: as for :func:`compare`.
        parameter_rounding: as for :func:`compare`.
        progress: as for :func:`compare`.

    Returns:
        The :class:`EquivalenceReport` when ``report.equivalent``.

    Raises:
        NotEquivalentError: otherwise; its message is ``str(report)``.
        FcconvError: on bad arguments, as :func:`compare`.

    Example:
        >>> lin = nn.Linear(4, 2)  # over the last dim of (N, 3, 4); the conv wants (N, 4, 3)
        >>> report = assert_equivalent(lin, fcconv.linear_to_pointwise(lin, ndim=1), (3, 4),
        ...     input_map=lambda x: x.transpose(1, 2), output_map=lambda y: y.transpose(1, 2))
    """
    report = compare(reference, candidate, example_inputs, input_map=input_map, output_map=output_map,
                     grad=grad, seed=seed, parameter_rounding=parameter_rounding, progress=progress)
    if not report.equivalent:
        raise NotEquivalentError(str(report))
    return report
