"""One module's pass over one batch: run it, map and flatten its output, take the input gradient."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fcconv.certify._inputs import as_float64, round_through
from fcconv.certify._measure import Measure
from fcconv.certify.report import dtype_name
from fcconv.certify.rounding import AbsCache, Bound, Tracker, scale_bound, sum_bounds
from fcconv.errors import FcconvError, ModuleRunError

__all__ = ["Pass", "Plan", "forward_pass", "parameter_pass"]

_F64 = torch.float64


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
            "input_shape is the reference's per-sample input shape, without the batch dimension, and "
            "inputs are batch tensors it accepts."
        )
        raise ModuleRunError(
            f"Running the {role} ({type(module).__name__}) on an input of shape {tuple(x.shape)} "
            f"({dtype_name(x.dtype)}) failed: {err} {advice}",
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



@dataclass
class Pass:
    """One module's results on one batch: outputs, input gradients, and their bounds per channel."""

    out: Tensor
    grad: Tensor | None
    out_bounds: list[Bound]
    grad_bounds: list[Bound]
    unsupported: str | None
    sample_shape: tuple[int, ...]
    out_deep: bool = False
    grad_deep: bool = False


def forward_pass(module: nn.Module, x: Tensor, in_map: Callable[[Tensor], Tensor] | None,
                  out_map: Callable[[Any], Any], role: str, cotangent: Callable[[Tensor], Tensor] | None,
                  tracker: Tracker | None = None) -> Pass:
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
        return Pass(flat.detach(), None if gx is None else gx.detach(), [], [], None, sample_shape)
    return Pass(flat.detach(), None if gx is None else gx.detach(), tracker.bounds(flat),
                 [] if gx is None else tracker.bounds(gx), tracker.unsupported, sample_shape,
                 tracker.deep(flat), gx is not None and tracker.deep(gx))


@dataclass
class Plan:
    """What :func:`fcconv.certify.compare` runs: both modules as given and as float64 copies, the maps,
    the input batches, and the cotangents drawn for ``grad=True`` (one per batch, on first use)."""

    reference: nn.Module
    candidate: nn.Module
    ref64: nn.Module
    cand64: nn.Module
    input_map: Callable[[Tensor], Tensor] | None
    ref_map: Callable[[Any], Any]
    cand_map: Callable[[Any], Any]
    batches: list[tuple[str, Tensor]]
    work: torch.dtype  # the working dtype: the reference's, else the candidate's
    cand_dtype: torch.dtype | None
    device: torch.device
    generator: torch.Generator
    grad: bool
    abs_cache: AbsCache
    cotangents: dict[int, Tensor] = field(default_factory=dict)

    def cotangent(self, b: int, dtypes: Sequence[torch.dtype]) -> Callable[[Tensor], Tensor]:
        """The cotangent of batch ``b``, drawn on first use and exact in every dtype of ``dtypes``."""
        def make(flat: Tensor) -> Tensor:
            if b not in self.cotangents:
                g = torch.randn(tuple(flat.shape), generator=self.generator, dtype=_F64)
                self.cotangents[b] = round_through(g, dtypes, _F64)
            return self.cotangents[b].to(device=flat.device, dtype=flat.dtype)
        return make


def parameter_pass(plan: Plan, measures: list[Measure], u_ref: float, u_cand: float) -> None:
    """Add, per batch, how far one rounding (``u``) of every parameter could move each value."""
    def magnitude(t: Tensor) -> Tensor:
        cached = plan.abs_cache.get(t)
        return t.detach().abs() if cached is None else cached

    def initial(module: nn.Module) -> dict[int, tuple[Tensor, list[Bound]]]:
        return {id(t): (t, [magnitude(t)]) for t in list(module.parameters()) + list(module.buffers())
                if t.is_floating_point()}

    cotangents = plan.cotangents
    sides = ((plan.ref64, None, plan.ref_map, u_ref, "reference"),
             (plan.cand64, plan.input_map, plan.cand_map, u_cand, "candidate"))
    for b, (_, x) in enumerate(plan.batches):
        x64 = as_float64(x)
        cot = ((lambda flat, b=b: cotangents[b].to(device=flat.device, dtype=flat.dtype))
               if plan.grad else None)
        results = []
        for module, in_map, out_map, u, role in sides:
            tracker = Tracker((0.0,), initial(module), plan.abs_cache)
            p = forward_pass(module, x64, in_map, out_map, role, cot, tracker)
            if p.unsupported is not None:
                for m in measures:
                    m.params = [None] * len(plan.batches)
                return
            results.append((p, u))
        for m, attr in zip(measures, ("out_bounds", "grad_bounds")):
            total = None
            for p, u in results:
                bound = getattr(p, attr)[0]
                total = sum_bounds(total, scale_bound(bound, u))
            m.params.append(None if total is None else total.reshape(total.shape[0], -1))
