"""The error ratio: how much error a candidate adds beyond what its working precision itself does.

Both modules run in the working precision on the same inputs, and the reference also in float64 (the
float64 reference function, ``ref64``). Per sample, each deviation ``|value - ref64|`` is taken
relative to that sample's largest ``|ref64|`` (so that the ``normal x1e3`` batch does not hide the
others), and the ratio is

    max over all samples and elements of |candidate - ref64| / scale
    ----------------------------------------------------------------
    max over all samples and elements of |reference - ref64| / scale

about 1 for a correct conversion, far above for a wrong one. The denominator is at least the working
precision's unit roundoff (``finfo.eps / 2``, relative to the same scale): on a few outputs the
reference can land within a fraction of an ulp of the float64 function by luck, and a candidate a
couple of ulps away is then no worse than float32 itself. The max-norm, not an RMS: an error in one
output (one class, one border cell of a map) is diluted by ``sqrt(n)`` in an RMS over ``n`` outputs,
and both maxima pool every element compared, so the denominator is not one lucky rounding.
docs/certificates.md gives measured values and how :data:`ERROR_RATIO_MAX` was chosen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ERROR_RATIO_MAX", "VACUOUS_FACTOR", "RatioMeasure", "error_ratio", "relative_bound",
           "relative_deviation"]

ERROR_RATIO_MAX = 10.0
"""A correct conversion's error ratio is at most this: twice the largest of 450 seeded correct
single-layer conversions (4.9; few roundings make small layers the noisiest), where whole models
measure 0.7-1.6 and a weight off by 1e-4 in resnet18's head 40 (docs/certificates.md)."""

VACUOUS_FACTOR = 1e6
"""A rounding bound more than this many times the reference's own observed error says nothing."""

_F64 = torch.float64


@dataclass(frozen=True)
class RatioMeasure:
    """The error ratio's parts, over every compared element.

    Attributes:
        reference_error: largest ``|reference - ref64|`` relative to its sample's largest ``|ref64|``.
        candidate_error: largest ``|candidate - ref64|``, relative the same way.
        ratio: ``candidate_error / max(reference_error, unit roundoff)``; None when
            ``reference_error`` is 0 (the reference is exact in the working precision:
            integer-valued toy nets, float64 modules).
    """

    reference_error: float
    candidate_error: float
    ratio: float | None


def relative_deviation(values: Tensor, ref64: Tensor) -> Tensor:
    """``|values - ref64|`` per element of flattened ``(N, m)`` tensors, over each row's largest ``|ref64|``.

    A row whose ``ref64`` is all zero is taken in absolute terms; equal values (infinities, two NaNs)
    deviate by 0, a NaN against a number by infinity.
    """
    v, r = values.to(_F64), ref64.to(_F64)
    d = (v - r).abs()
    d = torch.where((v == r) | (torch.isnan(v) & torch.isnan(r)), torch.zeros_like(d), d)
    d = torch.where(torch.isnan(v) ^ torch.isnan(r), torch.full_like(d, math.inf), d)
    return d / _scale(r)


def relative_bound(bound: Tensor, ref64: Tensor) -> Tensor:
    """An absolute bound on flattened ``(N, m)`` outputs, relative as :func:`relative_deviation`."""
    return bound.to(_F64) / _scale(ref64.to(_F64))


def _scale(r: Tensor) -> Tensor:
    """Each row's largest finite ``|r|``, 1 for a row of zeros."""
    scale = r.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).amax(dim=1, keepdim=True)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def error_ratio(refs: Sequence[Tensor], cands: Sequence[Tensor], refs64: Sequence[Tensor]) -> RatioMeasure:
    """The error ratio over batches of outputs, batch dimension first (see the module docstring).

    Args:
        refs: the reference's outputs in the working precision, one tensor per batch.
        cands: the candidate's, in its working precision, of the same sizes.
        refs64: the float64 reference function's (the reference run in float64).

    Returns:
        A :class:`RatioMeasure`: both relative errors and their ratio.

    Example:
        >>> r64 = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
        >>> error_ratio([r64 + 1e-7], [r64 + 4e-7], [r64]).ratio  # about 4
    """
    def flat(t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)

    def largest(values: Sequence[Tensor]) -> float:
        return max((float(relative_deviation(flat(v), flat(r)).max()) if v.numel() else 0.0
                    for v, r in zip(values, refs64)), default=0.0)

    ref_err, cand_err = largest(refs), largest(cands)
    working = [t.dtype for t in refs if t.is_floating_point()]
    floor = torch.finfo(working[0]).eps / 2 if working else 0.0
    return RatioMeasure(ref_err, cand_err, cand_err / max(ref_err, floor) if ref_err > 0 else None)
