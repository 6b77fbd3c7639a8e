"""Measures of agreement: one quantity's differences over all batches, as an :class:`Agreement`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from fcconv.certify._ratio import ERROR_RATIO_MAX, RatioMeasure, error_ratio, relative_bound
from fcconv.certify.report import FLOAT64_RTOL, Agreement, Location
from fcconv.certify.rounding import Bound
from fcconv.certify.ulp import bits, ulp_distance

__all__ = ["Batch", "Measure", "eps", "make_batch"]

_F64 = torch.float64


@dataclass
class Batch:
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


class Measure:
    """Collects the batches of one quantity and turns them into an :class:`Agreement`."""

    def __init__(self, quantity: str) -> None:
        self.quantity = quantity
        self.batches: list[Batch] = []
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
        identical = sum(int((bits(b.ref) == bits(b.cand)).sum()) for b in batches)
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
        errors = error_ratio([b.ref for b in batches], [b.cand for b in batches], [b.ref64 for b in batches])
        bound_ok = None if bound_ratio is None else bound_ratio <= 1
        return Agreement(
            quantity=self.quantity, dtype=batches[0].ref.dtype, per_sample=per_sample, count=count,
            max_abs=max_abs, max_rel=_relative(max_abs, ref_scale), max_ulp=max_ulp,
            bit_identical_fraction=identical / count if count else 1.0, worst=worst,
            bound_ratio=bound_ratio, bound_ok=bound_ok,
            bound_worst=bound_worst, float64_max_abs=max_abs64, float64_max_rel=rel64,
            float64_bound_ratio=ratio64, bound_single_layer=single,
            float64_worst=None if max_abs64 == 0 else self._location(w64[0], w64[1], w64[2], True),
            float64_ok=ok64, error_ratio=errors.ratio, reference_error=errors.reference_error,
            candidate_error=errors.candidate_error, error_ratio_ok=_ratio_ok(errors, bound_ok),
            bound_looseness=self._looseness(errors.reference_error),
        )

    def _looseness(self, reference_error: float) -> float | None:
        """The largest relative working-precision bound over the reference's real relative error."""
        if reference_error == 0 or any(b.bound is None for b in self.batches):
            return None
        largest = max(float(relative_bound(b.bound, b.ref64).max())  # type: ignore[arg-type]
                      for b in self.batches if b.ref.numel())
        return largest / reference_error

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


def _ratio_ok(errors: RatioMeasure, bound_ok: bool | None) -> bool | None:
    """Within :data:`ERROR_RATIO_MAX`; without a ratio, the candidate exact too, else the bound."""
    if errors.ratio is not None:
        return errors.ratio <= ERROR_RATIO_MAX
    return True if errors.candidate_error == 0 else bound_ok


def _largest_abs(tensors: Iterable[Tensor]) -> float:
    """The largest ``|value|`` over the tensors, NaNs ignored (0 for none)."""
    return max((float(t.to(_F64).abs().nan_to_num(nan=0.0).max()) if t.numel() else 0.0) for t in tensors)




def _ratio_of(diff: Tensor, bound: Tensor) -> Tensor:
    ratio = diff / bound
    return torch.where(diff == 0, torch.zeros_like(ratio), ratio)


def _relative(diff: float, scale: float) -> float:
    if diff == 0:
        return 0.0
    return diff / scale if scale > 0 else math.inf


def eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)



def make_batch(label: str, ref: Tensor, cand: Tensor, ref64: Tensor, cand64: Tensor,
                ref_bounds: list[Bound], cand_bounds: list[Bound], sample_shape: tuple[int, ...],
                unsupported: str | None, single: bool) -> Batch:
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
            bound = bound + eps(ref.dtype) / 2 * cand.to(_F64).abs()
        bound64 = (f64_r + f64_c).to(_F64) + torch.finfo(_F64).tiny
    return Batch(label, ref, cand_conv, ref64, cand64, bound, bound64, sample_shape, single)
