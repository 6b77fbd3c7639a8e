"""The verdict of :func:`fcconv.certify.compare` and the paragraph that explains it."""

from __future__ import annotations

import torch

from fcconv.certify._measure import Measure
from fcconv.certify.report import ERROR_RATIO_MAX, FLOAT64_RTOL, Agreement, dtype_name, format_number

__all__ = ["reason"]


def reason(agreements: list[Agreement], measures: list[Measure], equivalent: bool, params_would_pass: bool,
           parameter_rounding: bool, unsupported: str | None, device: torch.device) -> str:
    """One paragraph: why the modules are (or are not) the same function, and where they differ most."""
    if equivalent:
        dtype = dtype_name(agreements[0].dtype)
        lead = "same function: " + "; ".join(_why_same(a, dtype, device) for a in agreements) + "."
        if parameter_rounding:
            lead += " (Parameters were allowed one rounding each: parameter_rounding=True.)"
        return lead
    parts = [_why_different(a, m) for a, m in zip(agreements, measures) if not a.float64_ok]
    text = "not the same function: " + "; ".join(parts) + "."
    if params_would_pass:
        text += (f" The differences are within one {dtype_name(agreements[0].dtype)} rounding of the "
                 "parameters: if the candidate's weights were computed from the reference's (folded "
                 "padding, fused batch norm), pass parameter_rounding=True to accept that.")
    elif unsupported is not None:
        text += f" (No rounding bound: {unsupported} has no rule.)"
    return text


def _why_same(a: Agreement, dtype: str, device: torch.device) -> str:
    if a.float64_max_rel <= FLOAT64_RTOL:
        how = f"below the {FLOAT64_RTOL:g} threshold"
    else:
        how = (f"above {FLOAT64_RTOL:g} but within the float64 rounding bound of this single "
               f"layer ({format_number(a.float64_bound_ratio or 0.0)} of it): the values cancel")
    text = f"in float64 the {a.quantity} agree to {format_number(a.float64_max_rel)} relative, {how}"
    return text + _why_working(a, dtype, device)


def _why_working(a: Agreement, dtype: str, device: torch.device) -> str:
    """The working-precision half: the error ratio first, then the rounding bound where it says something."""
    text = _why_ratio(a, dtype)
    diffs = f"the {dtype} differences (max {format_number(a.max_abs)}, {a.max_ulp} ULP)"
    if a.bound_ok is None:
        return text + f"; {diffs} have no derived bound"
    if a.bound_ok:
        kind = "bound" if a.bound_single_layer else "worst-case bound compounded over the layers"
        vacuous = (f", a vacuous bound: {a.bound_looseness:.1g} times the reference's own {dtype} error"
                   if a.bound_vacuous and a.bound_looseness is not None else "")
        return text + (f"; {diffs} are within the rounding {kind} "
                       f"({format_number(a.bound_ratio or 0.0)} of it{vacuous})")
    text += (f"; but the {dtype} differences exceed what rounding allows "
             f"({format_number(a.bound_ratio or 0.0)} times the bound) at {a.bound_worst}: one of the "
             "modules computes in lower precision than its dtype")
    if device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32):
        text += (" (TF32 is enabled: set torch.backends.cuda.matmul.allow_tf32 = False and "
                 "torch.backends.cudnn.allow_tf32 = False to compare in full float32)")
    return text


def _why_ratio(a: Agreement, dtype: str) -> str:
    if a.dtype == torch.float64:
        return ""  # the float64 verdict is the working precision's check
    if a.error_ratio is None:
        if a.candidate_error == 0:
            return f"; in {dtype} both give the float64 values exactly (no error ratio: nothing to divide by)"
        return (f"; the reference is exact in {dtype}, so there is no error ratio (the candidate deviates "
                f"by {format_number(a.candidate_error)} relative); the rounding bound decides")
    if a.error_ratio_ok:
        return (f"; in {dtype} the candidate deviates from the float64 function "
                f"{format_number(a.error_ratio)} times as much as the reference does (error ratio, "
                f"<= {ERROR_RATIO_MAX:g})")
    return (f"; but in {dtype} the candidate deviates from the float64 function "
            f"{format_number(a.error_ratio)} times as much as the reference does (error ratio above "
            f"{ERROR_RATIO_MAX:g}): it adds error beyond {dtype} rounding, e.g. it computes in lower "
            "precision or rounds its parameters")


def _why_different(a: Agreement, m: Measure) -> str:
    beyond = (f", {format_number(a.float64_bound_ratio)} times what float64 rounding allows"
              if a.float64_bound_ratio is not None else "")
    text = (f"in float64 the {a.quantity} differ by up to {format_number(a.float64_max_abs)} "
            f"({format_number(a.float64_max_rel)} of the largest reference value, threshold "
            f"{FLOAT64_RTOL:g}{beyond}); largest difference at {a.float64_worst}")
    if m.constant_offset():
        text += ("; the difference is the same for every sample, a constant offset: a missing or "
                 "different bias")
    elif m.permuted():
        text += ("; every sample holds the same values in another order: a layout difference "
                 "(flatten order NCHW vs NHWC, channel order); if intended, relate the layouts "
                 "with output_map")
    return text
