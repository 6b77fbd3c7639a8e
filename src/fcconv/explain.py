"""Which equivalence holds for a layer on an input shape, and what its stride and padding do to it.

The textbook asks two questions after its two scenarios: what happens to the equivalence with a stride,
and with padding? :func:`explain` answers them for one concrete layer and input shape, with numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from fcconv._shapes import check_input_shape, format_shape
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.layers import conv_module_geometry, conv_output_shape
from fcconv.matrix import ConvGeometry, conv_geometry, conv_matrix_nnz

__all__ = ["Explanation", "Relation", "explain"]

Relation = Literal["kernel_covers_input", "pointwise", "structured_matrix"]

_TITLES: dict[str, str] = {
    "kernel_covers_input": "the kernel covers the input (scenario 1)",
    "pointwise": "pointwise, kernel size 1 (scenario 2)",
    "structured_matrix": "a Linear with a structured (sparse) matrix",
}


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain` found. ``str()`` gives the readable answer.

    Attributes:
        layer: the layer's ``repr``.
        input_shape: the per-sample input shape ``(C, *spatial)``.
        output_shape: the per-sample output shape.
        relation: the equivalence that holds: ``"kernel_covers_input"``, ``"pointwise"`` or
            ``"structured_matrix"``.
        holds: every relation that holds (a Linear on ``(C, 1, 1)`` is both scenario 1 and 2).
        equivalent_layer: the equivalent layer, as code.
        built_by: the fcconv call that builds the equivalent layer.
        params: parameters of the layer.
        equivalent_params: parameters of the equivalent layer.
        matrix_shape: ``(out_numel, in_numel)`` of the layer's matrix on this input.
        matrix_nnz: nonzero entries of that matrix.
        stride_effect: what the stride does to the equivalence, for this layer.
        padding_effect: what padding does to the equivalence, for this layer.
    """

    layer: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    relation: Relation
    holds: tuple[Relation, ...]
    equivalent_layer: str
    built_by: str
    params: int
    equivalent_params: int
    matrix_shape: tuple[int, int]
    matrix_nnz: int
    stride_effect: str
    padding_effect: str

    @property
    def density(self) -> float:
        """Fraction of the matrix's entries that are nonzero."""
        return self.matrix_nnz / math.prod(self.matrix_shape)

    def __str__(self) -> str:
        rows, cols = self.matrix_shape
        also = [_TITLES[r] for r in self.holds if r != self.relation]
        lines = [
            f"{self.layer} on input {format_shape(self.input_shape)} -> output "
            f"{format_shape(self.output_shape)}",
            f"Equivalence: {_TITLES[self.relation]}"
            + (f"; also {', '.join(also)}" if also else ""),
            f"  equivalent layer: {self.equivalent_layer}",
            f"  built by:         {self.built_by}",
            f"  parameters:       {self.params:,} here, {self.equivalent_params:,} in the equivalent",
            f"  matrix:           {rows:,} x {cols:,}, {self.matrix_nnz:,} nonzeros "
            f"({100 * self.density:.3g}% dense)",
            f"Stride:  {self.stride_effect}",
            f"Padding: {self.padding_effect}",
        ]
        return "\n".join(lines)


def _x(sizes: Sequence[int]) -> str:
    return "x".join(str(s) for s in sizes)


def _conv_name(ndim: int) -> str:
    return f"Conv{ndim}d"


def _kernel_arg(kernel: Sequence[int]) -> str:
    return str(kernel[0]) if len(set(kernel)) == 1 else format_shape(kernel)


def _explain_linear(linear: nn.Linear, shape: tuple[int, ...]) -> Explanation:
    c, spatial = shape[0], shape[1:]
    n, numel, out = len(spatial), math.prod(shape), linear.out_features
    bias = linear.bias is not None
    params = sum(p.numel() for p in linear.parameters())
    holds: list[Relation] = []
    if linear.in_features == numel:
        holds.append("kernel_covers_input")
    if linear.in_features == c:
        holds.append("pointwise")
    if not holds:
        raise NotEquivalentError(
            f"Cannot relate Linear(in_features={linear.in_features}) to input_shape {format_shape(shape)}: "
            f"expected in_features = {'*'.join(map(str, shape))} = {numel} (the Linear on the flattened "
            f"input) or in_features = C = {c} (the Linear over channels at every position). Pass the shape "
            "of the tensor that enters this Linear, before it is flattened."
        )
    conv = _conv_name(n)
    bias_arg = "" if bias else ", bias=False"
    if holds[0] == "kernel_covers_input":
        grow = _x([3] * n)
        bigger = format_shape((c, *(s + 1 for s in spatial)))
        return Explanation(
            layer=repr(linear), input_shape=shape, output_shape=(out, *([1] * n)),
            relation="kernel_covers_input", holds=tuple(holds),
            equivalent_layer=f"{conv}({c}, {out}, kernel_size={_kernel_arg(spatial)}{bias_arg})",
            built_by=f"fcconv.linear_to_conv(linear, {format_shape(shape)})",
            params=params, equivalent_params=params, matrix_shape=(out, numel), matrix_nnz=out * numel,
            stride_effect=(
                f"none here. The {_x(spatial)} kernel covers the whole {_x(spatial)} input, so it fits "
                "exactly once and every stride gives the same single output. On a larger input the stride "
                f"is how far the window moves: on {bigger} a stride of 1 gives {_x([2] * n)} outputs, each "
                "the Linear applied to one window (a dense score map, see fcconv.convolutionalize)."
            ),
            padding_effect=(
                f"breaks it. Zero padding of 1 turns the 1-position output into {grow} positions; only the "
                "centre one still equals the Linear, the others see zeros where the Linear saw the border "
                "of the input. Keep padding=0 (the default) for the equivalence."
            ),
        )
    positions = math.prod(spatial)
    return Explanation(
        layer=repr(linear), input_shape=shape, output_shape=(out, *spatial),
        relation="pointwise", holds=tuple(holds),
        equivalent_layer=f"{conv}({c}, {out}, kernel_size=1{bias_arg})",
        built_by=f"fcconv.linear_to_pointwise(linear, ndim={n})",
        params=params, equivalent_params=params,
        matrix_shape=(out * positions, numel), matrix_nnz=out * c * positions,
        stride_effect=(
            f"a stride s > 1 keeps every s-th position: the conv then equals the Linear applied to "
            f"x[..., ::s] only (stride 2 turns {_x(spatial)} into "
            f"{_x([(s + 1) // 2 for s in spatial])} positions). Use stride 1 to apply it everywhere."
        ),
        padding_effect=(
            "adds positions without changing the others. Zero padding p adds a border of p positions "
            f"where the input is zero, so the output there is the bias alone; the {positions} original "
            f"positions still equal the Linear (padding 1: {_x(spatial)} -> {_x([s + 2 for s in spatial])})."
        ),
    )


def _padding_text(conv: _ConvNd, geom: ConvGeometry, shape: tuple[int, ...], relation: Relation) -> str:
    if not geom.pads:
        if relation == "kernel_covers_input":
            return (
                "none: nothing is padded. Zero padding of 1 would turn the single output into "
                f"{_x([3] * geom.ndim)} positions; only the centre one would still equal the Linear."
            )
        if relation == "pointwise":
            return (
                "none: nothing is padded. Zero padding p would add a border of p positions where the "
                "input is zero, whose output is the bias alone; the original positions would still equal "
                "the Linear."
            )
        padded = conv_geometry(shape[1:], geom.kernel, stride=geom.stride, padding=1,
                               dilation=geom.dilation).out_spatial
        if padded == geom.out_spatial:
            return "none: nothing is padded, every tap reads a real input."
        return (
            f"none: nothing is padded, every tap reads a real input. Zero padding of 1 would add windows "
            f"that hang over the border ({_x(geom.out_spatial)} -> {_x(padded)} positions) whose taps on "
            "the padding read zeros and drop out of the matrix: still exactly a Linear."
        )
    pad = f"padding {geom.pad_left}" + ("" if geom.pad_left == geom.pad_right else f"/{geom.pad_right}")
    if conv.padding_mode != "zeros":
        return (
            f"{pad} with padding_mode='{conv.padding_mode}' reads real inputs at the border: the taps that "
            "fall outside are folded onto the input positions they copy, and those entries of the matrix are "
            "summed. Still exactly linear, so still a Linear, but not a plain reshape of the kernel."
        )
    if relation == "kernel_covers_input":
        return (
            f"{pad} with zeros: the kernel still fits once, but the taps on the padding read zeros, so "
            "the equivalent Linear's weight is the kernel cropped to the taps that touch the input. "
            "Padding more would add positions and break the one-output equivalence."
        )
    unpadded = conv_geometry(shape[1:], geom.kernel, stride=geom.stride, padding=0, dilation=geom.dilation)
    return (
        f"{pad} with zeros adds output positions ({_x(unpadded.out_spatial)} without it, "
        f"{_x(geom.out_spatial)} with it) for windows that hang over the border; their taps on the padding "
        "read zeros and drop out of the matrix, so border rows have fewer nonzeros. Still exactly a Linear."
    )


def _every(stride: Sequence[int]) -> str:
    if len(set(stride)) == 1:
        return f"one window in {stride[0]} along each dim"
    return f"one window in {format_shape(stride)} per dim"


def _stride_text(geom: ConvGeometry, shape: tuple[int, ...], covers: bool) -> str:
    if covers:
        return (
            "none here: the kernel fits the input once, so every stride gives the same single output. "
            "On a larger input the stride is how far the window moves."
        )
    stride1 = conv_geometry(shape[1:], geom.kernel, stride=1, padding=(*geom.pad_left,),
                            dilation=geom.dilation) if geom.pad_left == geom.pad_right else None
    base = ""
    if all(s == 1 for s in geom.stride):
        base = "stride 1 evaluates every window: the matrix has one block row per position."
        if all(k == 1 for k in geom.kernel):
            return base + " A stride s would keep every s-th position and drop the other rows."
        return base + " A stride s keeps every s-th window: it drops rows, the rest stays exact."
    if stride1 is not None:
        base = (
            f"stride {geom.stride} keeps {_every(geom.stride)}: {_x(geom.out_spatial)} "
            f"positions instead of {_x(stride1.out_spatial)} at stride 1, i.e. rows of the stride-1 "
            "matrix are dropped and the rest is unchanged."
        )
    else:
        base = f"stride {geom.stride} keeps {_every(geom.stride)} (rows of the matrix are dropped)."
    spans = [d * (k - 1) + 1 for k, d in zip(geom.kernel, geom.dilation)]
    if all(s >= span for s, span in zip(geom.stride, spans)):
        base += " The windows do not overlap: the conv applies one Linear to each patch (a patch embedding)"
        if any(s > span for s, span in zip(geom.stride, spans)):
            base += "; the inputs between windows are never read (their columns of the matrix are zero)"
        base += "."
    return base


def _explain_conv(conv: _ConvNd, shape: tuple[int, ...]) -> Explanation:
    check_input_shape(shape, conv=conv, caller="explain")
    out_shape = conv_output_shape(conv, shape)
    in_numel, out_numel = math.prod(shape), math.prod(out_shape)
    params = sum(p.numel() for p in conv.parameters())
    bias = conv.bias is not None
    matrix_shape = (out_numel, in_numel)
    if isinstance(conv, _ConvTransposeNd):
        adjoint = conv_module_geometry(conv, out_shape[1:])
        nnz = conv_matrix_nnz(adjoint, "zeros", c_out=conv.in_channels,
                              c_in_per_group=conv.out_channels // conv.groups)
        return Explanation(
            layer=repr(conv), input_shape=shape, output_shape=out_shape, relation="structured_matrix",
            holds=("structured_matrix",),
            equivalent_layer=f"Linear({in_numel}, {out_numel}{'' if bias else ', bias=False'})",
            built_by=f"fcconv.conv_to_linear(conv, {format_shape(shape)})",
            params=params, equivalent_params=in_numel * out_numel + (out_numel if bias else 0),
            matrix_shape=matrix_shape, matrix_nnz=nnz,
            stride_effect=(
                f"a transposed conv's stride {conv.stride} spreads each input over the output with "
                "gaps: its matrix is the transpose of the strided conv's, still exactly a Linear."
            ),
            padding_effect=(
                f"padding {conv.padding} crops the output border (it removes rows of the matrix)."
                if any(conv.padding)
                else "none: a transposed conv's padding would crop the output border."
            ),
        )
    geom = conv_module_geometry(conv, shape[1:])
    nnz = conv_matrix_nnz(geom, conv.padding_mode, c_out=conv.out_channels,
                          c_in_per_group=conv.in_channels // conv.groups)
    covers = geom.single_position and (conv.padding_mode == "zeros" or not geom.pads)
    pointwise = (all(k == 1 for k in geom.kernel) and all(s == 1 for s in geom.stride)
                 and not geom.pads)
    holds: list[Relation] = []
    if covers:
        holds.append("kernel_covers_input")
    if pointwise:
        holds.append("pointwise")
    if not holds:
        holds.append("structured_matrix")
    bias_arg = "" if bias else ", bias=False"
    if holds[0] == "pointwise":
        groups = conv.groups
        eq_layer = f"Linear({conv.in_channels}, {conv.out_channels}{bias_arg}) at every position"
        if groups > 1:
            eq_layer += f", block-diagonal ({groups} blocks)"
        built_by = "fcconv.pointwise_to_linear(conv)"
        eq_params = conv.in_channels * conv.out_channels + (conv.out_channels if bias else 0)
    else:
        eq_layer = f"Linear({in_numel}, {out_numel}{bias_arg})"
        built_by = f"fcconv.conv_to_linear(conv, {format_shape(shape)})"
        eq_params = in_numel * out_numel + (out_numel if bias else 0)
        if holds[0] == "kernel_covers_input" and geom.pads:
            eq_layer += " with the kernel cropped to the input"
        elif holds[0] == "structured_matrix":
            eq_layer += " whose weight is the conv's matrix (fcconv.conv_matrix)"
    stride_text = _stride_text(geom, shape, covers)
    if pointwise and not covers:
        stride_text = (
            "stride 1: the Linear is applied at every position. A stride s would keep every s-th "
            "position only (the Linear applied to x[..., ::s])."
        )
    return Explanation(
        layer=repr(conv), input_shape=shape, output_shape=out_shape, relation=holds[0],
        holds=tuple(holds), equivalent_layer=eq_layer, built_by=built_by, params=params,
        equivalent_params=eq_params,
        matrix_shape=matrix_shape, matrix_nnz=nnz, stride_effect=stride_text,
        padding_effect=_padding_text(conv, geom, shape, holds[0]),
    )


def explain(module: nn.Module, input_shape: Sequence[int]) -> Explanation:
    """Tell which Linear/conv equivalence holds for ``module`` on inputs of shape ``input_shape``.

    Args:
        module: an ``nn.Linear``, ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d``.
        input_shape: the per-sample shape ``(C, *spatial)`` of the tensor that enters the layer, or, for
            a Linear, of the tensor that is flattened before it.

    Returns:
        An :class:`Explanation`; print it for the answer in words: the relation, the equivalent layer,
        both parameter counts, the matrix and what stride and padding do to the equivalence.

    Raises:
        FcconvError: on an unsupported module or a malformed input shape.
        NotEquivalentError: if a Linear's ``in_features`` fits neither reading of the shape.

    Example:
        >>> print(explain(nn.Linear(4, 2), (1, 2, 2)))  # doctest: +ELLIPSIS
        Linear(in_features=4, out_features=2, bias=True) on input (1, 2, 2) -> output (2, 1, 1)...
    """
    shape = check_input_shape(input_shape)
    if isinstance(module, nn.Linear):
        return _explain_linear(module, shape)
    if isinstance(module, _ConvNd):
        return _explain_conv(module, shape)
    raise FcconvError(
        f"explain expects an nn.Linear or a convolution (Conv1d/2d/3d, ConvTranspose1d/2d/3d); got "
        f"{type(module).__name__}. Pass one layer, e.g. model.classifier[0]."
    )
