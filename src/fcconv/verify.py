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

    The propagation (the dispatch mode, the per-op rules, the ``|W|`` cache) lives in the private
    module ``fcconv._rounding``; this module holds the public API (:func:`compare`,
    :func:`assert_equivalent`, :class:`EquivalenceReport`, :class:`Agreement`, :class:`Location`,
    :func:`ulp_distance`, :data:`FLOAT64_RTOL`) and runs the passes, measures and verdict on top of it.

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fcconv._rounding import AbsCache, Bound, Tracker, scale_bound, sum_bounds
from fcconv.errors import FcconvError, ModuleRunError, NotEquivalentError

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


def _module_dtype_device(module: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    """The dtype and device of the module's first floating parameter or buffer (None, None: none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return None, None


def _is_shape(value: object) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    return (isinstance(value, (tuple, list, torch.Size)) and len(value) > 0
            and all(isinstance(s, int) and not isinstance(s, bool) for s in value))


def _float64(x: Tensor) -> Tensor:
    """A floating input in float64 (exact: every dtype converts exactly); integer inputs as they are."""
    return x.to(_F64) if x.is_floating_point() else x


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
        raise ModuleRunError(
            f"Running the {role} ({type(module).__name__}) on an input of shape {tuple(x.shape)} "
            f"({_dtype_name(x.dtype)}) failed: {err} {advice}",
            role=role, input_shape=tuple(x.shape), cause=str(err),
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
    out_bounds: list[Bound]
    grad_bounds: list[Bound]
    unsupported: str | None
    sample_shape: tuple[int, ...]
    out_deep: bool = False
    grad_deep: bool = False


def _forward_pass(module: nn.Module, x: Tensor, in_map: Callable[[Tensor], Tensor] | None,
                  out_map: Callable[[Any], Any], role: str, cotangent: Callable[[Tensor], Tensor] | None,
                  tracker: Tracker | None = None) -> _Pass:
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

    def float64_ratio(self, with_params: bool) -> float | None:
        """The largest float64 difference over its rounding bound (None: no bound)."""
        if any(b.bound64 is None for b in self.batches):
            return None
        ratios = []
        for k, b in enumerate(self.batches):
            bound = b.bound64
            assert bound is not None
            extra = self.params[k] if with_params and len(self.params) == len(self.batches) else None
            if extra is not None:
                bound = bound + extra
            ratios.append(_ratio_of(_diff(b.ref64, b.cand64), bound))
        return self._argmax(ratios)[0]

    def agreement(self, with_params: bool) -> Agreement:
        batches = self.batches
        diffs = [_diff(b.ref, b.cand) for b in batches]
        count = sum(d.numel() for d in diffs)
        per_sample = batches[0].ref.shape[1]
        max_abs, *w = self._argmax(diffs)
        ref_scale = _largest_abs(b.ref for b in batches)
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
        scale64 = _largest_abs(b.ref64 for b in batches)
        rel64 = _relative(max_abs64, scale64)
        ratio64 = self.float64_ratio(with_params)
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


def _largest_abs(tensors: Iterable[Tensor]) -> float:
    """The largest ``|value|`` over the tensors, NaNs ignored (0 for none)."""
    return max((float(t.to(_F64).abs().nan_to_num(nan=0.0).max()) if t.numel() else 0.0) for t in tensors)


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
    abs_cache = AbsCache((ref64, cand64))
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
        x64 = _float64(x)
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
                               Tracker((eps_ref, _EPS64), abs_cache=abs_cache))
        cand_hi = _forward_pass(cand64, x64, input_map, cand_map, "candidate", cot,
                                Tracker((eps_cand, _EPS64), abs_cache=abs_cache))
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
                ref_bounds: list[Bound], cand_bounds: list[Bound], sample_shape: tuple[int, ...],
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
                    u_ref: float, u_cand: float, grad: bool, abs_cache: AbsCache) -> None:
    """Add, per batch, how far one rounding (``u``) of every parameter could move each value."""
    def magnitude(t: Tensor) -> Tensor:
        cached = abs_cache.get(t)
        return t.detach().abs() if cached is None else cached

    def initial(module: nn.Module) -> dict[int, tuple[Tensor, list[Bound]]]:
        return {id(t): (t, [magnitude(t)]) for t in list(module.parameters()) + list(module.buffers())
                if t.is_floating_point()}

    for b, (_, x) in enumerate(batches):
        x64 = _float64(x)
        cot = (lambda flat, b=b: cotangents[b].to(device=flat.device, dtype=flat.dtype)) if grad else None
        results = []
        for module, in_map, out_map, u, role in ((ref64, None, ref_map, u_ref, "reference"),
                                                 (cand64, input_map, cand_map, u_cand, "candidate")):
            tracker = Tracker((0.0,), initial(module), abs_cache)
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
                total = sum_bounds(total, scale_bound(bound, u))
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
