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

__all__ = ["Geometry", "measure_geometry", "size_moduli"]

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
    # the model runs only at sizes S0 + modulus*j (1: at any size from min_size)
    modulus: tuple[int, ...] = ()


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


def _grid_or_none(gm: fx.GraphModule, channels: int, spatial: tuple[int, ...], ndim: int
                  ) -> tuple[int, ...] | None:
    """:func:`_output_grid`, or None if the converted model fails on that size."""
    try:
        record_shapes(gm, (channels, *spatial))
    except NodeFailure:
        return None
    return _output_grid(gm, channels, spatial, ndim)


# Moduli tried, in order, for a model that fails one pixel above its training size (DLA, HRNet:
# branches merged by addition after different strides; TResNet: a space-to-depth view).
_MODULI = (1, 2, 4, 8, 16, 32, 64, 128)


def size_moduli(gm: fx.GraphModule, input_shape: tuple[int, ...], hint: tuple[int, ...] | None
                ) -> tuple[int, ...]:
    """Per spatial dim, the smallest ``M`` such that the model runs at ``S0 + M, S0 + 2M, S0 + 3M``.

    Raises:
        NotEquivalentError: naming the failing node, if no modulus up to 128 works.
    """
    channels, s0 = input_shape[0], tuple(input_shape[1:])
    ndim = len(s0)
    moduli = []
    for k in range(ndim):
        candidates = sorted({*_MODULI, *((hint[k],) if hint else ())})
        for m in candidates:
            sizes = [tuple(s + j * m if i == k else s for i, s in enumerate(s0)) for j in (1, 2, 3)]
            if all(_grid_or_none(gm, channels, size, ndim) is not None for size in sizes):
                moduli.append(m)
                break
        else:
            first = tuple(s + 1 if i == k else s for i, s in enumerate(s0))
            _output_grid(gm, channels, first, ndim)  # raises, naming the failing node
            raise NotEquivalentError(
                f"The converted model runs at {format_shape((channels, *first))} but at no size "
                f"S0 + M*j along spatial dim {k} for M up to 128. {_TODO_LARGER}."
            )
    return tuple(moduli)


def _search_geometry(gm: fx.GraphModule, input_shape: tuple[int, ...], g0: tuple[int, ...],
                     moduli: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Stride and min_size found by probing accepted sizes ``S0 + M*j`` (for graphs the
    descriptors cannot model, or that run only at some sizes)."""
    channels, s0 = input_shape[0], input_shape[1:]
    ndim = len(s0)
    strides, mins = [], []
    for k in range(ndim):
        m = moduli[k]

        def grid(j: int, k: int = k, m: int = m) -> int:
            spatial = tuple(s + j * m if i == k else s for i, s in enumerate(s0))
            return _output_grid(gm, channels, spatial, ndim)[k]

        def next_step(start: int, value: int, k: int = k, m: int = m) -> int:
            """The smallest step above ``start`` whose grid exceeds ``value``."""
            delta = 1
            while grid(start + delta) <= value:
                delta *= 2
                if delta * m > 4096:
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

        j1 = next_step(0, g0[k])
        jump = grid(j1) - g0[k]
        if m > 1 and j1 == 1 and jump > 1 and m % jump == 0 and grid(2) == g0[k] + 2 * jump:
            # several cells per accepted step: a stride finer than the modulus
            strides.append(m // jump)
            mins.append(s0[k] - (g0[k] - 1) * (m // jump))
            continue
        j2 = next_step(j1, g0[k] + 1)
        if grid(j1) != g0[k] + 1 or grid(j2) != g0[k] + 2:
            raise NotEquivalentError(
                f"The converted model's output grows by more than one cell per input pixel along "
                f"spatial dim {k} (upsampling): it has no integer stride, so no sliding-window "
                "geometry."
            )
        stride = (j2 - j1) * m
        strides.append(stride)
        mins.append(s0[k] + j1 * m - g0[k] * stride)
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
    stride_hint = entries
    if entries is not None:
        stride = tuple(e.T for e in entries)
        min_size = tuple(e.T - e.C for e in entries)
        predicted = tuple(e.size(s) for e, s in zip(entries, s0))
        # Check the closed form at the two sizes around a step of the grid.
        below = tuple(m + (g + 1) * t - 1 for m, g, t in zip(min_size, g0, stride))
        above = tuple(b + 1 for b in below)
        ok = (predicted == g0
              and _grid_or_none(gm, channels, below, ndim) == tuple(g + 1 for g in g0)
              and _grid_or_none(gm, channels, above, ndim) == tuple(g + 2 for g in g0))
        if not ok:
            entries = None
    moduli = (1,) * ndim
    if entries is None:
        exact = False
        hint = tuple(e.T for e in stride_hint) if stride_hint is not None else None
        moduli = size_moduli(gm, input_shape, hint)
        stride, min_size = _search_geometry(gm, input_shape, g0, moduli)
    window = tuple(s - (g - 1) * t for s, g, t in zip(s0, g0, stride))
    return Geometry(stride, min_size, window, exact, out_shape[1], moduli)
