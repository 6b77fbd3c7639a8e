"""The certificate `compare` returns: :class:`EquivalenceReport`, its parts, its table."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fcconv.certify._ratio import ERROR_RATIO_MAX, VACUOUS_FACTOR

__all__ = ["ERROR_RATIO_MAX", "FLOAT64_RTOL", "VACUOUS_FACTOR", "Agreement", "EquivalenceReport", "Location",
           "dtype_name", "format_number"]

FLOAT64_RTOL = 1e-10
"""Float64 differences up to this fraction of the largest reference value count as the same function."""


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
        float64_ok: whether this quantity passes the verdict (see :func:`fcconv.certify.compare`).
        error_ratio: the candidate's largest deviation from the float64 reference function (the
            reference copied to float64) over the reference's own, both in the working precision
            and relative to each sample's largest output: about 1 when the conversion adds no error
            beyond what the working precision itself does. None when the reference is exact in the
            working precision (then ``error_ratio_ok`` falls back to exact equality or the bound).
        reference_error: the reference's largest relative deviation from the float64 function.
        candidate_error: the candidate's largest relative deviation from the float64 function.
        error_ratio_ok: ``error_ratio <= ERROR_RATIO_MAX``; without a ratio: the candidate is exact
            too, else ``bound_ok``; None when neither can say.
        bound_looseness: the largest rounding bound (relative, as ``reference_error``) over
            ``reference_error``: how many times the real error the bound allows. Above
            :data:`VACUOUS_FACTOR` the bound is vacuous. None without a bound or a reference error.
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
    error_ratio: float | None = None
    reference_error: float = 0.0
    candidate_error: float = 0.0
    error_ratio_ok: bool | None = None
    bound_looseness: float | None = None

    @property
    def bound_vacuous(self) -> bool:
        """Whether the rounding bound is more than :data:`VACUOUS_FACTOR` times the real error."""
        return self.bound_looseness is not None and self.bound_looseness > VACUOUS_FACTOR


@dataclass(frozen=True)
class EquivalenceReport:
    """The certificate :func:`compare` returns. ``str(report)`` is a table for a terminal.

    Attributes:
        reference: the reference's class name.
        candidate: the candidate's class name.
        dtype: the working dtype compared (the reference output's dtype).
        batches: number of input batches.
        samples: number of samples in all batches.
        output_agreement: how closely the outputs agree.
        gradient_agreement: how closely the gradients with respect to the inputs agree
            (``grad=True``), else None.
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
    output_agreement: Agreement
    gradient_agreement: Agreement | None
    parameter_rounding: bool
    unsupported: str | None
    equivalent: bool
    reason: str

    @property
    def max_abs(self) -> float:
        """Largest absolute output difference in the working dtype."""
        return self.output_agreement.max_abs

    @property
    def max_rel(self) -> float:
        """Largest output difference over the largest reference output magnitude."""
        return self.output_agreement.max_rel

    @property
    def max_ulp(self) -> int:
        """Largest output difference in units in the last place of the working dtype."""
        return self.output_agreement.max_ulp

    @property
    def bit_identical_fraction(self) -> float:
        """Fraction of outputs that are bit-identical."""
        return self.output_agreement.bit_identical_fraction

    @property
    def float64_max_rel(self) -> float:
        """Largest float64 output difference over the largest float64 reference output."""
        return self.output_agreement.float64_max_rel

    @property
    def num_compared(self) -> int:
        """Number of output elements compared, all samples together."""
        return self.output_agreement.count

    @property
    def agreements(self) -> list[Agreement]:
        """The agreements compared: outputs, then input gradients with ``grad=True``."""
        grads = self.gradient_agreement
        return [self.output_agreement] + ([grads] if grads is not None else [])

    @property
    def bound_ok(self) -> bool | None:
        """Whether every working-precision difference (outputs and gradients) is within its bound."""
        parts = self.agreements
        if any(p.bound_ok is None for p in parts):
            return None
        return all(bool(p.bound_ok) for p in parts)

    @property
    def error_ratio(self) -> float | None:
        """The outputs' error ratio (see :attr:`Agreement.error_ratio`): about 1 when the candidate
        adds no error beyond what the working precision does; None when the reference is exact in it."""
        return self.output_agreement.error_ratio

    @property
    def error_ratio_ok(self) -> bool | None:
        """Whether every quantity's error ratio is within :data:`ERROR_RATIO_MAX` (or its fallback)."""
        parts = self.agreements
        if any(p.error_ratio_ok is None for p in parts):
            return None
        return all(bool(p.error_ratio_ok) for p in parts)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain Python values (dtypes as strings), e.g. for ``json.dumps``."""
        def plain(value: Any) -> Any:
            if isinstance(value, torch.dtype):
                return str(value).replace("torch.", "")
            if isinstance(value, Agreement):
                fields = {k: plain(v) for k, v in value.__dict__.items()}
                return {**fields, "bound_vacuous": value.bound_vacuous}
            if isinstance(value, Location):
                return {k: plain(v) for k, v in value.__dict__.items()}
            if isinstance(value, tuple):
                return list(value)
            return value
        out = {k: plain(v) for k, v in self.__dict__.items()}
        out.update(error_ratio=self.error_ratio, error_ratio_ok=self.error_ratio_ok)
        return out

    def __str__(self) -> str:
        parts = self.agreements
        dtype = dtype_name(self.dtype)
        rows: list[tuple[str, list[str]]] = [
            ("compared elements", [f"{p.count} ({p.per_sample} per sample)" for p in parts]),
            ("max abs difference", [format_number(p.max_abs) for p in parts]),
            ("max rel difference", [format_number(p.max_rel) for p in parts]),
            (f"max ULP ({dtype})", [str(p.max_ulp) for p in parts]),
            ("bit-identical", [f"{100 * p.bit_identical_fraction:.2f}%" for p in parts]),
            ("diff / rounding bound", [_format_bound(p) for p in parts]),
            (f"error ratio ({dtype})", [format_error_ratio(p) for p in parts]),
            ("float64 copies: max rel", [format_number(p.float64_max_rel) for p in parts]),
            ("float64 copies: / bound", [_format_ratio(p.float64_bound_ratio, None, p.bound_single_layer)
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


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``."""
    return str(dtype).replace("torch.", "")


def format_number(x: float) -> str:
    """Three significant digits, the way the report prints numbers."""
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def format_error_ratio(a: Agreement) -> str:
    """``1.02 ok`` / ``340 ABOVE 8``, or why the ratio is undefined and what decided instead."""
    if a.error_ratio is not None:
        ok = "ok" if a.error_ratio_ok else f"ABOVE {ERROR_RATIO_MAX:g}"
        return f"{format_number(a.error_ratio)} {ok}"
    if a.candidate_error == 0:
        return "undefined (both exact)"
    fallback = {True: "bound ok", False: "bound EXCEEDED", None: "no bound"}[a.error_ratio_ok]
    return f"undefined (reference exact); {fallback}"


def _format_bound(a: Agreement) -> str:
    text = _format_ratio(a.bound_ratio, a.bound_ok, a.bound_single_layer)
    if a.bound_vacuous and a.bound_looseness is not None:
        text += f", vacuous (x{a.bound_looseness:.1g})"
    return text


def _format_ratio(ratio: float | None, ok: bool | None, single: bool | None) -> str:
    if ratio is None:
        return "n/a"
    text = format_number(ratio) + ("" if ok is None else (" ok" if ok else " EXCEEDED"))
    return text + ("" if single else " (deep)")

