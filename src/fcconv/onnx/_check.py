"""Checking an ONNX file in onnxruntime against a PyTorch module, within the bound ``compare`` derives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fcconv._shapes import format_shape
from fcconv.certify import ERROR_RATIO_MAX, FLOAT64_RTOL, compare, error_ratio
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.models.fcn import FullyConvolutional
from fcconv.onnx._runtime import run

__all__ = ["OnnxReport", "SizeCheck", "check_ratio", "check_sizes_for", "check_size", "ratio_of"]


@dataclass(frozen=True)
class SizeCheck:
    """One input size run in onnxruntime and compared with the PyTorch module.

    Attributes:
        input_shape: the full input shape ``(N, C, *spatial)``.
        output_shape: the output shape onnxruntime gave (equal to PyTorch's).
        max_abs: largest ``|onnxruntime - pytorch|``.
        max_rel: ``max_abs`` over the largest PyTorch output magnitude.
        bound_ratio: ``max |onnxruntime - pytorch|`` over the float32 rounding bound that
            :func:`fcconv.compare` derives for the PyTorch computation, counted twice (both runtimes
            round); None where compare derives none (an op without a rule).
        deep: True when the bound compounds over several layers (valid but loose, see
            :mod:`fcconv.certify`).
        float64_max_rel: the verdict: the float64 graph run by ``onnx.reference`` against the float64
            reference, relative to its largest output (at most :data:`fcconv.certify.FLOAT64_RTOL`);
            None where it was not run (``certify="float32"``, or a size with nothing to compare with).
        error_ratio: the float32 verdict: onnxruntime's largest deviation from the float64 reference
            over the float32 reference's own (see :func:`fcconv.certify.error_ratio`), about 1 for a
            correct file; None where no float64 reference ran or the reference is exact.
        verified_by: what the output at this size was compared with, where it is not the original
            at the same input (a larger size of a convolutionalized file); None otherwise.
        unverified: why the output at this size could not be compared with anything; None when it was.
        output: the graph output compared, where a file has several; None for the first (only) one.
    """

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    bound_ratio: float | None
    deep: bool | None
    float64_max_rel: float | None = None
    error_ratio: float | None = None
    verified_by: str | None = None
    unverified: str | None = None
    output: str | None = None

    def __str__(self) -> str:
        shapes = f"input {format_shape(self.input_shape)} -> {format_shape(self.output_shape)}"
        if self.output is not None:
            shapes = f"output {self.output!r}: {shapes}"
        if self.unverified is not None:
            return f"{shapes}: ran, map NOT verified: {self.unverified}"
        if self.max_abs != self.max_abs:  # NaN: a size with nothing to compare with
            return f"{shapes}: ran"
        if self.verified_by is not None:
            float64 = ("" if self.float64_max_rel is None else
                       f"; float64 rel {self.float64_max_rel:.2g}")
            return f"{shapes}: {self.verified_by}: max abs difference {self.max_abs:.3g}{float64}"
        float64 = "" if self.float64_max_rel is None else f"; float64 rel {self.float64_max_rel:.2g}"
        if self.bound_ratio is None:
            bound = "no rounding bound derived"
        else:
            bound = f"{self.bound_ratio:.2g} of the rounding bound" + (" (deep)" if self.deep else "")
        ratio = "" if self.error_ratio is None else f"; error ratio {self.error_ratio:.2g}"
        return (f"input {format_shape(self.input_shape)} -> {format_shape(self.output_shape)}: max abs "
                f"difference {self.max_abs:.3g} (rel {self.max_rel:.3g}), {bound}{float64}{ratio}")


@dataclass(frozen=True)
class OnnxReport:
    """What an fcconv.onnx function wrote and checked. ``str(report)`` prints it.

    Attributes:
        path: the file written.
        checks: one :class:`SizeCheck` per input size run.
        op_counts: how many nodes of each op type the graph holds.
        dynamic: the symbolic input dims, e.g. ``{0: "batch", 2: "height", 3: "width"}``.
        rewritten: what the pass replaced, e.g. ``{"Gemm -> Conv": 3}``.
        left: the nodes a pass left, named, with the reason, e.g. ``{"MatMul 'mm'": "its weight ..."}``.
    """

    path: str
    checks: tuple[SizeCheck, ...]
    op_counts: dict[str, int]
    dynamic: dict[int, str] = field(default_factory=dict)
    rewritten: dict[str, int] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)

    @property
    def conv_only(self) -> bool:
        """True when the graph holds no Gemm and no MatMul."""
        return not any(op in self.op_counts for op in ("Gemm", "MatMul"))

    @property
    def max_abs(self) -> float:
        """Largest difference over all checked sizes."""
        return max((c.max_abs for c in self.checks), default=0.0)

    def __str__(self) -> str:
        dims = ", ".join(f"{k}: {v}" for k, v in self.dynamic.items()) or "none (static shapes)"
        ops = ", ".join(f"{k} {v}" for k, v in self.op_counts.items())
        lines = [f"wrote {self.path}", f"  symbolic input dims: {dims}", f"  ops: {ops}",
                 f"  conv-only (no Gemm, no MatMul): {'yes' if self.conv_only else 'no'}"]
        if self.rewritten:
            lines.append("  rewritten: " + ", ".join(f"{k} {v}" for k, v in self.rewritten.items()))
        lines += [f"  LEFT {node}: {why}" for node, why in self.left.items()]
        lines.append(f"  checked in onnxruntime at {len(self.checks)} size(s):")
        lines += [f"    {c}" for c in self.checks]
        lines.append(self._float64_line())
        lines.append(self._ratio_line())
        lines += [f"  UNVERIFIED at input {format_shape(c.input_shape)}: {c.unverified}"
                  for c in self.unverified]
        return "\n".join(lines)

    @property
    def unverified(self) -> tuple[SizeCheck, ...]:
        """The sizes run whose output could not be compared with any reference."""
        return tuple(c for c in self.checks if c.unverified is not None)

    @property
    def float64_max_rel(self) -> float | None:
        """The largest float64 relative difference over the checked sizes; None if none was run."""
        values = [c.float64_max_rel for c in self.checks if c.float64_max_rel is not None]
        return max(values) if values else None

    @property
    def error_ratio(self) -> float | None:
        """The largest float32 error ratio over the checked sizes; None if none was measured."""
        values = [c.error_ratio for c in self.checks if c.error_ratio is not None]
        return max(values) if values else None

    def _ratio_line(self) -> str:
        ratio = self.error_ratio
        if ratio is None:
            return "  float32 error ratio: not measured (no float64 reference ran, or it is exact)"
        return (f"  float32 error ratio (onnxruntime vs the reference in float32, against float64): "
                f"{ratio:.2g} <= {ERROR_RATIO_MAX:g}")

    def _float64_line(self) -> str:
        rel = self.float64_max_rel
        if rel is None:
            return ("  float64 verdict: not run (certify='float32'); in deep models the float32 check "
                    "catches only wrong shapes and non-finite values")
        sizes = sum(1 for c in self.checks if c.float64_max_rel is not None)
        return (f"  float64 verdict (onnx.reference, {sizes} size(s)): same function, max rel {rel:.2g} "
                f"<= {FLOAT64_RTOL:g}")


def check_sizes_for(module: nn.Module, input_shape: tuple[int, ...],
                    check_sizes: Sequence[Sequence[int]] | None) -> list[tuple[int, ...]]:
    """The spatial sizes to check: ``check_sizes`` or, by default, those the module accepts.

    A :class:`~fcconv.FullyConvolutional` accepts any size from ``min_size``: the training size,
    the minimum and a non-square odd size; any other module only its training size.
    """
    spatial = tuple(input_shape[1:])
    if check_sizes is not None:
        sizes = [tuple(int(s) for s in size) for size in check_sizes]
        for size in sizes:
            if len(size) != len(spatial) or any(s <= 0 for s in size):
                raise FcconvError(
                    f"check_sizes must hold spatial sizes of {len(spatial)} positive ints like "
                    f"{format_shape(spatial)}; got {format_shape(size)}."
                )
        return list(dict.fromkeys([spatial, *sizes]))
    if isinstance(module, FullyConvolutional):
        odd = tuple(s + (i + 1) * t + 1 for i, (s, t) in enumerate(zip(spatial, module.stride)))
        return list(dict.fromkeys([spatial, tuple(module.min_size), odd]))
    return [spatial]


class _Shifted(nn.Module):
    """``module(x) + delta``: the PyTorch module moved onto onnxruntime's output, for ``compare``.

    ``compare(module, _Shifted(module, ort - torch), inputs=[x])`` measures ``|ort - torch|`` against the
    rounding bound of both runs, with ``delta`` exact (a buffer) in the bound's propagation.
    """

    def __init__(self, module: nn.Module, delta: Tensor) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("delta", delta)

    def forward(self, x: Tensor) -> Any:
        return self.module(x) + self.delta


def check_size(module: nn.Module, sess: Any, x: Tensor, what: str) -> SizeCheck:
    """Run ``x`` in onnxruntime and in ``module``; raise if they differ by more than rounding.

    The bound is the one :func:`fcconv.compare` derives for the float32 computation: both runtimes
    are within it of the exact result, so they may differ by twice it.

    Raises:
        NotEquivalentError: if the outputs differ in shape or by more than the bound.
    """
    with torch.no_grad():
        expected = module(x)
    got = run(sess, x).to(dtype=expected.dtype, device=expected.device)
    shape = tuple(x.shape)
    if got.shape != expected.shape:
        raise NotEquivalentError(
            f"{what} gives an output of shape {format_shape(got.shape)} on an input {format_shape(shape)} "
            f"where PyTorch gives {format_shape(expected.shape)}; a shape was frozen at export."
        )
    diff = (got - expected).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    report = compare(module, _Shifted(module, got - expected), inputs=[x])
    out = report.output_agreement
    check = SizeCheck(shape, tuple(got.shape), max_abs, max_abs / scale if scale else max_abs,
                      out.bound_ratio, None if out.bound_single_layer is None else not out.bound_single_layer,
                      error_ratio=out.error_ratio)
    if not torch.isfinite(got).all() or out.bound_ok is False:
        raise NotEquivalentError(
            f"{what} differs from the PyTorch module at input {format_shape(shape)} by up to {max_abs:.3g} "
            f"({check.max_rel:.3g} of the largest output), more than float32 rounding allows "
            f"({out.bound_ratio} times the derived bound); at {out.worst}. The exported graph does not "
            "compute the same function."
        )
    return check


def check_ratio(ratio: float | None, what: str, reference: str, shape: tuple[int, ...]) -> float | None:
    """``ratio`` when within :data:`~fcconv.certify.ERROR_RATIO_MAX` (or None); raise above it.

    Raises:
        NotEquivalentError: when the file adds float32 error beyond what the reference's own run has.
    """
    if ratio is not None and not ratio <= ERROR_RATIO_MAX:
        raise NotEquivalentError(
            f"In float32 {what} deviates from the float64 reference {ratio:.3g} times as much as "
            f"{reference} does at input {format_shape(shape)} (error ratio above {ERROR_RATIO_MAX:g}): it "
            "adds error beyond float32 rounding (a changed weight, a lower-precision op)."
        )
    return ratio


def ratio_of(expected: Tensor, got: Tensor, expected64: Any) -> float | None:
    """The error ratio of ``got`` (float32) against ``expected`` (float32), with the float64 reference
    ``expected64`` (a tensor or a numpy array of the same size); None when ``expected`` is exact."""
    ref64 = torch.as_tensor(expected64, dtype=torch.float64).reshape(expected.shape)
    return error_ratio([expected], [got.reshape(expected.shape)], [ref64]).ratio
