"""Equivalence certificates: is a candidate module the same function as a reference, with numbers.

:func:`compare` answers two questions separately. **The same function?** Both modules are deep-copied
to float64 and run on the same inputs; the same function agrees to float64 rounding, a wrong one (even
a weight off by 1e-4) by orders of magnitude more: that is the verdict, ``equivalent``. **Only
rounding?** Every working-precision difference is checked against a rounding bound derived op by op
(``bound_ok``; the tracker is in :mod:`fcconv.certify.rounding`). docs/certificates.md explains the
bound, the verdict's threshold :data:`FLOAT64_RTOL` and what the report's numbers mean.

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
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fcconv._shapes import module_dtype_device
from fcconv.certify._inputs import as_float64, check_module, float64_copies, input_batches, output_maps
from fcconv.certify._measure import Measure, eps, make_batch
from fcconv.certify._passes import Pass, Plan, forward_pass, parameter_pass
from fcconv.certify._verdict import reason
from fcconv.certify.report import EquivalenceReport
from fcconv.certify.rounding import AbsCache, Tracker
from fcconv.errors import FcconvError, NotEquivalentError

__all__ = ["assert_equivalent", "compare"]

_EPS64 = torch.finfo(torch.float64).eps

OutputMap = Callable[[Any], Tensor]


def compare(
    reference: nn.Module,
    candidate: nn.Module,
    input_shape: Sequence[int] | int | None = None,
    *,
    inputs: Tensor | Sequence[Tensor] | None = None,
    input_map: Callable[[Tensor], Tensor] | None = None,
    output_map: OutputMap | tuple[OutputMap | None, OutputMap | None] | None = None,
    grad: bool = False,
    seed: int = 0,
    parameter_rounding: bool = False,
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> EquivalenceReport:
    """Measure whether ``candidate`` computes the same function as ``reference``, with a certificate.

    Both modules run as given (their dtype, device and train/eval mode; nothing is changed on them,
    no ``.grad`` is written) and as float64 deep copies. Give ``input_shape`` or ``inputs``.

    Args:
        reference: the module taken as correct, e.g. an ``nn.Linear``.
        candidate: the module to check, e.g. the conv made by :func:`fcconv.linear_to_conv`.
        input_shape: the reference's per-sample input shape, without the batch dimension (a tuple of
            ints, or one int for a flat vector). Four seeded batches of two samples are generated:
            standard normal, normal x1e3 (x10 for float16), all negative, and uniform in [0, 1), in
            the modules' dtype and on their device, rounded so that they are exact in both dtypes.
        inputs: instead of ``input_shape``, your own inputs for the reference: a batch tensor (batch
            dimension first) or a list of them; they keep their dtype and device.
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
        dtype: run copies of both modules converted to this floating dtype (e.g. ``torch.bfloat16``)
            instead of the modules as given: the report's error ratio then tells whether the candidate
            is as accurate in that precision as the reference is. The parameters are rounded to it
            first, and the float64 verdict is of the rounded copies.

    Returns:
        An :class:`EquivalenceReport`; ``str(report)`` is a table, ``report.equivalent`` the verdict,
        ``report.error_ratio`` how much error the candidate adds beyond the working precision's own.

    Raises:
        FcconvError: on wrong argument types, a module in training mode with dropout or batch norm,
            inputs a module cannot run, or outputs that are not floating tensors.
        NotEquivalentError: if the outputs (after ``output_map``) do not have the same size.

    Example:
        >>> lin = nn.Linear(4, 2)
        >>> report = compare(lin, fcconv.linear_to_conv(lin, (1, 2, 2)), (4,),
        ...                  input_map=lambda x: x.reshape(-1, 1, 2, 2))
    """
    ref, cand = _in_dtype(reference, candidate, dtype)
    plan = _plan(ref, cand, input_shape, inputs, input_map, output_map, grad, seed)
    measures = [Measure("outputs")] + ([Measure("input gradients")] if grad else [])
    unsupported = None
    for b, (label, x) in enumerate(tqdm(plan.batches, desc="compare", unit="batch", disable=not progress)):
        unsupported = _compare_batch(plan, measures, b, label, x, unsupported)
    return _report(plan, measures, unsupported, parameter_rounding)


def assert_equivalent(
    reference: nn.Module,
    candidate: nn.Module,
    input_shape: Sequence[int] | int | None = None,
    *,
    inputs: Tensor | Sequence[Tensor] | None = None,
    input_map: Callable[[Tensor], Tensor] | None = None,
    output_map: OutputMap | tuple[OutputMap | None, OutputMap | None] | None = None,
    grad: bool = False,
    seed: int = 0,
    parameter_rounding: bool = False,
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> EquivalenceReport:
    """:func:`compare`, raising when the modules are not the same function.

    Args:
        reference: the module taken as correct.
        candidate: the module to check.
        input_shape: as for :func:`compare`.
        inputs: as for :func:`compare`.
        input_map: as for :func:`compare`.
        output_map: as for :func:`compare`.
        grad: as for :func:`compare`.
        seed: as for :func:`compare`.
        parameter_rounding: as for :func:`compare`.
        progress: as for :func:`compare`.
        dtype: as for :func:`compare`.

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
    report = compare(reference, candidate, input_shape, inputs=inputs, input_map=input_map,
                     output_map=output_map, grad=grad, seed=seed, parameter_rounding=parameter_rounding,
                     progress=progress, dtype=dtype)
    if not report.equivalent:
        raise NotEquivalentError(str(report))
    return report


def _in_dtype(reference: object, candidate: object, dtype: object) -> tuple[object, object]:
    """Copies of both modules in ``dtype`` (the originals unchanged); the modules themselves for None."""
    if dtype is None:
        return reference, candidate
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise FcconvError(f"dtype must be a floating torch dtype such as torch.bfloat16; "
                          f"got {dtype!r:.80}.")
    reference = check_module(reference, "reference")
    candidate = check_module(candidate, "candidate")
    try:
        return copy.deepcopy(reference).to(dtype), copy.deepcopy(candidate).to(dtype)
    except Exception as err:
        raise FcconvError(f"compare(dtype={dtype}) runs copies of both modules in that dtype, and "
                          f"copying failed: {err}. Convert the modules yourself and leave dtype out."
                          ) from err


def _plan(reference: object, candidate: object, input_shape: object, inputs: object, input_map: object,
          output_map: object, grad: bool, seed: object) -> Plan:
    """Check the arguments, make the input batches and the float64 copies."""
    reference = check_module(reference, "reference")
    candidate = check_module(candidate, "candidate")
    if input_map is not None and not callable(input_map):
        raise FcconvError(f"input_map must be a callable such as lambda x: x.reshape(-1, 1, 2, 2); "
                          f"got {input_map!r:.80}.")
    ref_map, cand_map = output_maps(output_map)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise FcconvError(f"seed must be an int; got {seed!r}.")
    ref_dtype, ref_device = module_dtype_device(reference)
    cand_dtype, cand_device = module_dtype_device(candidate)
    if ref_device is not None and cand_device is not None and ref_device != cand_device:
        raise FcconvError(
            f"The reference is on {ref_device} and the candidate on {cand_device}; compare runs both on "
            "the same inputs. Move them to one device, e.g. candidate.to(reference_device)."
        )
    work = ref_dtype or cand_dtype or torch.get_default_dtype()
    device = ref_device or cand_device or torch.device("cpu")
    dtypes = [d for d in (cand_dtype, ref_dtype) if d is not None] or [work]
    generator = torch.Generator().manual_seed(seed)
    batches = input_batches(input_shape, inputs, dtypes, work, device, generator)
    if grad and any(not x.is_floating_point() for _, x in batches):
        raise FcconvError("grad=True needs floating-point inputs; the inputs include integer "
                          "tensors. Pass grad=False to compare the outputs only.")
    ref64, cand64 = float64_copies(reference, candidate)
    return Plan(reference, candidate, ref64, cand64, input_map, ref_map, cand_map,
                batches, work, cand_dtype, device, generator, grad, AbsCache((ref64, cand64)))


def _compare_batch(plan: Plan, measures: list[Measure], b: int, label: str, x: Tensor,
                   unsupported: str | None) -> str | None:
    """Run both modules on batch ``b`` in their dtype and as tracked float64 copies; record the results.

    Returns the first op without a rounding rule seen so far (None: every op had one).
    """
    in_map, ref_map, cand_map = plan.input_map, plan.ref_map, plan.cand_map
    # Working precision, on the user's modules.
    ref_w = forward_pass(plan.reference, x, None, ref_map, "reference", None)
    cand_w = forward_pass(plan.candidate, x, in_map, cand_map, "candidate", None)
    _check_sizes(ref_w, cand_w)
    cot = plan.cotangent(b, [cand_w.out.dtype, ref_w.out.dtype]) if plan.grad else None
    if plan.grad:
        ref_w = forward_pass(plan.reference, x, None, ref_map, "reference", cot)
        cand_w = forward_pass(plan.candidate, x, in_map, cand_map, "candidate", cot)
    eps_in = eps(x.dtype) if x.is_floating_point() else 0.0
    eps_ref, eps_cand = max(eps(ref_w.out.dtype), eps_in), max(eps(cand_w.out.dtype), eps_in)
    # Float64 copies, with the rounding bound propagated for the working dtype and for float64.
    x64 = as_float64(x)
    ref_hi = forward_pass(plan.ref64, x64, None, ref_map, "reference", cot,
                          Tracker((eps_ref, _EPS64), abs_cache=plan.abs_cache))
    cand_hi = forward_pass(plan.cand64, x64, in_map, cand_map, "candidate", cot,
                           Tracker((eps_cand, _EPS64), abs_cache=plan.abs_cache))
    unsupported = unsupported or ref_hi.unsupported or cand_hi.unsupported
    measures[0].batches.append(make_batch(label, ref_w.out, cand_w.out, ref_hi.out, cand_hi.out,
                                          ref_hi.out_bounds, cand_hi.out_bounds, ref_w.sample_shape,
                                          unsupported, not (ref_hi.out_deep or cand_hi.out_deep)))
    if plan.grad:
        assert ref_w.grad is not None and cand_w.grad is not None
        assert ref_hi.grad is not None and cand_hi.grad is not None
        measures[1].batches.append(make_batch(label, ref_w.grad, cand_w.grad, ref_hi.grad, cand_hi.grad,
                                              ref_hi.grad_bounds, cand_hi.grad_bounds, tuple(x.shape[1:]),
                                              unsupported, not (ref_hi.grad_deep or cand_hi.grad_deep)))
    return unsupported


def _report(plan: Plan, measures: list[Measure], unsupported: str | None,
            parameter_rounding: bool) -> EquivalenceReport:
    """The verdict, with the parameter-rounding allowance measured where it could matter."""
    first = [m.agreement(with_params=False) for m in measures]
    # The parameter channel: one working-precision rounding of every parameter of both modules.
    single = all(b.single for m in measures for b in m.batches)
    need_params = unsupported is None and single and (
        parameter_rounding or not all(a.float64_ok for a in first))
    if need_params:
        parameter_pass(plan, measures, eps(plan.work) / 2, eps(plan.cand_dtype or plan.work) / 2)
    final = [m.agreement(with_params=parameter_rounding and need_params) for m in measures]
    params_would_pass = need_params and not parameter_rounding and all(
        a.float64_ok or m.agreement(with_params=True).float64_ok for m, a in zip(measures, final))
    equivalent = all(a.float64_ok for a in final)
    why = reason(final, measures, equivalent, params_would_pass, parameter_rounding, unsupported,
                 plan.device)
    return EquivalenceReport(
        reference=type(plan.reference).__name__, candidate=type(plan.candidate).__name__,
        dtype=measures[0].batches[0].ref.dtype, batches=len(plan.batches),
        samples=sum(int(x.shape[0]) for _, x in plan.batches), output_agreement=final[0],
        gradient_agreement=final[1] if len(final) > 1 else None, parameter_rounding=parameter_rounding,
        unsupported=unsupported, equivalent=equivalent, reason=why,
    )


def _check_sizes(ref: Pass, cand: Pass) -> None:
    if ref.out.shape != cand.out.shape:
        raise NotEquivalentError(
            f"The outputs cannot be compared element by element: the reference gives "
            f"{(ref.out.shape[0], *ref.sample_shape)} ({ref.out.shape[1]} values per sample) and the "
            f"candidate {(cand.out.shape[0], *cand.sample_shape)} ({cand.out.shape[1]} per sample) "
            "after output_map, flattened from dim 1. If both hold the same values in other layouts, "
            "pass output_map to relate them, e.g. output_map=lambda y: y.permute(0, 2, 3, 1) or "
            "output_map=(None, lambda y: y[:, :10])."
        )
