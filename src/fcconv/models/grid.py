"""The geometry of a converted model's score map: stride, min_size, window, found from shapes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from fcconv._shapes import format_shape
from fcconv.errors import NotEquivalentError
from fcconv.models.descriptors import output_geometry, spatial_descriptors
from fcconv.models.ops import flatten_points
from fcconv.models.shapes import NodeFailure, node_failure, record_shapes
from fcconv.models.tracing import describe, first_tensor_output

__all__ = ["Geometry", "measure_geometry"]

_TODO_LARGER = (
    "That op only works at the training size (a reshape to fixed sizes, a Linear along a spatial "
    "dim, a pooling to a fixed size), so the model cannot slide over larger inputs; make it "
    "size-independent, or pass its module in leaf_modules if it already is"
)


@dataclass
class Geometry:
    """The score map's geometry (see :class:`~fcconv.models.FullyConvolutional`'s attributes)."""

    stride: tuple[int, ...]
    min_size: tuple[int, ...]
    window: tuple[int, ...]
    exact: bool
    num_classes: int | None


def _output_grid(gm: fx.GraphModule, channels: int, spatial: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The spatial size of the converted model's output on an input of ``spatial`` size."""
    try:
        shapes = record_shapes(gm, (channels, *spatial))
    except NodeFailure as error:
        raise node_failure(error, gm, (channels, *spatial), "The converted model on input",
                            _TODO_LARGER) from None
    out = first_tensor_output(gm)
    shape = shapes.get(out) if out is not None else None
    if not isinstance(shape, tuple) or len(shape) != ndim + 2:
        raise NotEquivalentError(
            f"The converted model returns {shape if shape else 'no tensor'} on input "
            f"{format_shape((channels, *spatial))}, not a score map (N, outputs, *grid). The "
            "model must end in a classifier head (flatten or global pooling, then Linear layers) "
            "or be fully convolutional already."
        )
    return tuple(shape[2:])


def _search_geometry(gm: fx.GraphModule, input_shape: tuple[int, ...], g0: tuple[int, ...]
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Stride and min_size found by probing sizes (for graphs the descriptors cannot model)."""
    channels, s0 = input_shape[0], input_shape[1:]
    ndim = len(s0)
    strides, mins = [], []
    for k in range(ndim):
        def grid(size: int, k: int = k) -> int:
            spatial = tuple(size if j == k else s for j, s in enumerate(s0))
            return _output_grid(gm, channels, spatial, ndim)[k]

        def next_step(start: int, value: int, k: int = k) -> int:
            """The smallest size above ``start`` whose grid exceeds ``value``."""
            delta = 1
            while grid(start + delta) <= value:
                delta *= 2
                if delta > 4096:
                    raise NotEquivalentError(
                        f"The converted model's output does not grow with the input along spatial "
                        f"dim {k}: not a sliding-window score map (is a global pooling left?)."
                    )
            lo, hi = start + delta // 2, start + delta
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if grid(mid) > value:
                    hi = mid
                else:
                    lo = mid
            return hi

        s1 = next_step(s0[k], g0[k])
        s2 = next_step(s1, g0[k] + 1)
        if grid(s1) != g0[k] + 1 or grid(s2) != g0[k] + 2:
            raise NotEquivalentError(
                f"The converted model's output grows by more than one cell per input pixel along "
                f"spatial dim {k} (upsampling): it has no integer stride, so no sliding-window "
                "geometry."
            )
        stride = s2 - s1
        strides.append(stride)
        mins.append(s1 - g0[k] * stride)
    return tuple(strides), tuple(mins)


def measure_geometry(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> Geometry:
    """Stride, min_size and window of a converted graph: the closed form of its descriptors,
    checked at two sizes around a step of the grid, else found by probing sizes."""
    ndim = len(input_shape) - 1
    channels, s0 = input_shape[0], tuple(input_shape[1:])
    try:
        shapes = record_shapes(gm, input_shape)
    except NodeFailure as error:
        raise node_failure(error, gm, input_shape, "The converted model on its training input",
                            "This is a bug in fcconv; please report it with the model") from None
    out = first_tensor_output(gm)
    out_shape = shapes.get(out) if out is not None else None
    if not isinstance(out_shape, tuple) or len(out_shape) != ndim + 2:
        returns = format_shape(out_shape) if isinstance(out_shape, tuple) else "no tensor"
        raise NotEquivalentError(
            f"{type(gm).__name__} returns {returns} on input {format_shape(input_shape)} (batch 2), "
            "and fcconv found no classifier head to convert: no flatten or global pooling of the "
            "feature map feeds the output. The model must end in such a head or be fully "
            "convolutional already."
        )
    g0 = tuple(out_shape[2:])
    desc = spatial_descriptors(gm, shapes, ndim, flatten_points(gm, shapes, ndim))
    if desc.linear_on_space:
        node = desc.linear_on_space[0]
        src = node.all_input_nodes[0]
        src_shape = shapes.get(src)
        raise NotEquivalentError(
            f"Cannot convolutionalize {describe(node, gm)}: it acts on the last dim of a "
            f"tensor of shape {format_shape(src_shape) if isinstance(src_shape, tuple) else '?'} "
            "(batch 2) that changes with the input size, a spatial dim, so it cannot slide. "
            "Flatten the feature map (torch.flatten(x, 1)) before the first Linear, or pool it "
            "globally, and convert again."
        )
    entries = output_geometry(desc.desc.get(out) if out is not None else None, ndim)  # type: ignore[arg-type]
    # Exact only if every cell sees its window alone: no padding, and no pooling of the whole
    # map left inside the network (squeeze-and-excitation blocks see the whole image).
    exact = not desc.pads and not desc.unknown and not desc.collapses
    if entries is not None:
        stride = tuple(e.T for e in entries)
        min_size = tuple(e.T - e.C for e in entries)
        predicted = tuple(e.size(s) for e, s in zip(entries, s0))
        # Check the closed form at the two sizes around a step of the grid.
        below = tuple(m + (g + 1) * t - 1 for m, g, t in zip(min_size, g0, stride))
        above = tuple(b + 1 for b in below)
        ok = (predicted == g0
              and _output_grid(gm, channels, below, ndim) == tuple(g + 1 for g in g0)
              and _output_grid(gm, channels, above, ndim) == tuple(g + 2 for g in g0))
        if not ok:
            entries = None
    if entries is None:
        exact = False
        stride, min_size = _search_geometry(gm, input_shape, g0)
    window = tuple(s - (g - 1) * t for s, g, t in zip(s0, g0, stride))
    return Geometry(stride, min_size, window, exact, out_shape[1])
