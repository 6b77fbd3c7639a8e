"""The geometry of a traced network, proven op by op: receptive field, locality and exactness.

The graph runs once on fake tensors at one input size, so every call sees its concrete arguments
(TF-"same" padding computed from ``x.size()`` included). Each tensor gets a descriptor: for each of
its dims, either nothing spatial (batch, channels) or the input axis it runs along with an affine
``(stride, offset, extent)``: index ``j`` depends on input ``[offset + stride*j, ... + extent)``.
Only ops on an allow-list of local, translation-equivariant ops keep the descriptor; the first
other op (and the first op that pads) is named.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from fcconv._shapes import check_input_shape, format_shape
from fcconv.errors import FcconvError

__all__ = ["Analysis", "ReceptiveField", "analyze"]


@dataclass(frozen=True)
class ReceptiveField:
    """The input region one output cell depends on, per spatial dim.

    Cell ``j`` depends on input ``[offset + stride*j, offset + stride*j + extent)`` along each dim.

    Attributes:
        stride: input pixels between neighbouring output cells.
        offset: input coordinate of the first pixel cell 0 depends on (negative with padding).
        extent: input pixels one cell depends on.
    """

    stride: tuple[int, ...]
    offset: tuple[int, ...]
    extent: tuple[int, ...]

    def box(self, cell: Any) -> tuple[int, ...]:
        """``(*starts, *ends)`` of the input box cell ``cell`` depends on, half-open; it may extend
        past the image. ``cell`` holds ints, numpy ints or 0-d integer tensors.

        Example:
            >>> top, left, bottom, right = analyze(gm, (3, 320, 320)).field.box((2, 3))
        """
        ndim = len(self.stride)
        try:
            if isinstance(cell, (str, bytes)):
                raise TypeError
            try:
                index: tuple[int, ...] = (operator.index(cell),)
            except TypeError:
                index = tuple(operator.index(c) for c in cell)
        except TypeError:
            raise FcconvError(f"cell must be {ndim} integer(s), one per spatial dim; got {cell!r}.") from None
        if len(index) != ndim or any(i < 0 for i in index):
            raise FcconvError(
                f"cell must be {ndim} non-negative integer(s), one per spatial dim; got {cell!r}."
            )
        starts = tuple(o + s * i for o, s, i in zip(self.offset, self.stride, index))
        return starts + tuple(a + e for a, e in zip(starts, self.extent))


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyze` proved about a graph at one input size.

    Attributes:
        field: the receptive field of an output cell; None if some op between input and output
            is not a sliding op (or the output is not an ``(N, C, *spatial)`` map).
        local: every op is proven local and translation-equivariant (padding allowed): tiles
            aligned to the stride, read with a halo covering the field, reproduce the untiled map.
        why_not_local: the first node that breaks locality, and why.
        exact_sliding_window: local and nothing pads, so each cell equals the model on its crop.
        why_not_exact: the first node that breaks exactness, and why.
        size_dependent: padding amounts (hence possibly the field) depend on the input size.
    """

    field: ReceptiveField | None
    local: bool
    why_not_local: str | None
    exact_sliding_window: bool
    why_not_exact: str | None
    size_dependent: bool


# ----------------------------------------------------------------------------------------------
# Descriptors


@dataclass(frozen=True)
class _Axis:
    """A tensor dim that runs along input axis ``axis``: index j reads [offset + stride*j, +extent)."""

    axis: int
    stride: int
    offset: int
    extent: int


@dataclass(frozen=True)
class _Map:
    """A tensor computed from the input values: per dim, its ``_Axis`` or None (batch, channels)."""

    dims: tuple[_Axis | None, ...]


class _Tag:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


CONST = _Tag("CONST")    # depends on neither the input's values nor its size
SIZE = _Tag("SIZE")      # depends on the input's size only (shapes, positions built from it)
GLOBAL = _Tag("GLOBAL")  # depends on the input's values through an op not proven local
Desc = Any  # _Map | _Tag | list[Desc]


class _NotLocal(Exception):
    """Raised by a rule: the op is not local; ``keep`` is the descriptor when the field survives."""

    def __init__(self, why: str, keep: Desc = GLOBAL) -> None:
        super().__init__(why)
        self.why, self.keep = why, keep


def _arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, (int, torch.SymInt)):
        return (int(value),) * n
    values = tuple(int(v) for v in value)
    return values * n if len(values) == 1 else values


def _spatial_dims(m: _Map, n: int, what: str) -> tuple[_Axis, ...]:
    """The last ``n`` dims of ``m``, which a sliding op slides over; all others must be non-spatial."""
    tail = m.dims[len(m.dims) - n:]
    if len(m.dims) < n + 1 or not all(isinstance(d, _Axis) for d in tail) or any(
            isinstance(d, _Axis) for d in m.dims[:len(m.dims) - n]):
        raise _NotLocal(f"{what} over dims that are not the map's spatial dims (N, C, *spatial)")
    return tail  # type: ignore[return-value]


def _slide(m: _Map, x: Tensor, out: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
           pads: Sequence[tuple[int, int]], dilation: tuple[int, ...], ceil_mode: bool = False) -> _Map:
    """The descriptor after a sliding op, checked against the output size it really produced."""
    n = len(kernel)
    axes = _spatial_dims(m, n, "slides")
    new: list[_Axis] = []
    for i, (a, k, s, (left, right), d) in enumerate(zip(axes, kernel, stride, pads, dilation)):
        size = x.shape[x.dim() - n + i]
        span = size + left + right - d * (k - 1) - 1
        expected = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (expected - 1) * s >= size + left:
            expected -= 1
        if out.shape[out.dim() - n + i] != expected:
            raise _NotLocal("its output size is not that of a sliding window of its parameters")
        new.append(_Axis(a.axis, a.stride * s, a.offset - a.stride * left,
                         a.extent + a.stride * d * (k - 1)))
    return _Map(m.dims[:len(m.dims) - n] + tuple(new))


def _same_pads(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
               dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    """TF "same" padding at this size, as timm's ``pad_same`` computes it."""
    n, pads = len(kernel), []
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        size = x.shape[x.dim() - n + i]
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _combine(entries: list[_Axis | None], what: str) -> _Axis | None:
    """One dim of several maps combined element by element: the union of their fields."""
    axes = [e for e in entries if e is not None]
    if not axes:
        return None
    if len(axes) != len(entries) or len({(a.axis, a.stride) for a in axes}) != 1:
        raise _NotLocal(f"{what} maps whose dims do not match (a spatial dim against another dim, "
                        "or different strides)")
    start = min(a.offset for a in axes)
    end = max(a.offset + a.extent for a in axes)
    return _Axis(axes[0].axis, axes[0].stride, start, end - start)


# ----------------------------------------------------------------------------------------------
# One call and the rules of the allow-list


@dataclass
class _Call:
    """A node with its concrete arguments and output, and the descriptors of its inputs."""

    node: fx.Node
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    value: Any
    descs: dict[fx.Node, Desc]
    module: Any = None             # the called module, for call_module
    pads: str | None = None        # set by a rule whose op pads: why the cell is not the crop
    sized: bool = False            # set by a rule whose padding is computed from the input size

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        return _arg(self.args, self.kwargs, i, name, default)

    def desc(self, i: int, name: str = "") -> Desc:
        return _desc_of(_arg(self.node.args, self.node.kwargs, i, name, None), self.descs)

    def map(self) -> _Map:
        d = self.desc(0, "input")
        if not isinstance(d, _Map):
            raise _NotLocal("its input is not a map of the image")
        return d

    def pad(self, why: str) -> None:
        self.pads = self.pads or why


def _desc_of(a: Any, descs: dict[fx.Node, Desc]) -> Desc:
    if isinstance(a, fx.Node):
        return descs[a]
    if isinstance(a, (list, tuple)):
        found = [_desc_of(x, descs) for x in a]
        for tag in (GLOBAL, SIZE):
            if any(f is tag for f in found):
                return tag
        maps = [f for f in found if not isinstance(f, _Tag)]
        return maps if maps else CONST
    if isinstance(a, dict):
        return _desc_of(list(a.values()), descs)
    return CONST


def _elementwise(c: _Call, operands: list[tuple[Any, Desc]]) -> _Map:
    """Element by element with broadcasting: the union of the maps' fields; constants must be
    broadcast along every spatial dim (per-channel), and nothing may come from the input size."""
    out = c.value
    rank = out.dim()
    maps = [(v, d) for v, d in operands if isinstance(d, _Map)]
    dims: list[_Axis | None] = []
    for i in range(rank):
        entries = []
        for v, d in maps:
            j = i - (rank - v.dim())
            if j < 0:
                continue
            if v.shape[j] != out.shape[i]:
                if d.dims[j] is not None:
                    raise _NotLocal("broadcasts a map along a spatial dim")
                continue
            entries.append(d.dims[j])
        dims.append(_combine(entries, "combines") if entries else None)
    result = _Map(tuple(dims))
    for v, d in operands:
        if d is SIZE:
            raise _NotLocal("uses the input size as a value (sizes or positions read at run time)", result)
        if isinstance(v, Tensor) and d is CONST and any(
                e is not None and i - (rank - v.dim()) >= 0 and v.shape[i - (rank - v.dim())] != 1
                for i, e in enumerate(dims)):
            raise _NotLocal("combines the map with a constant that varies along a spatial dim "
                            "(a position encoding)", result)
    return result


def _pointwise(c: _Call) -> _Map:
    operands = [(v, _desc_of(n, c.descs)) for v, n in zip(c.args, c.node.args)]
    operands += [(c.kwargs[k], _desc_of(n, c.descs)) for k, n in c.node.kwargs.items()
                 if k not in ("inplace", "dtype", "approximate", "alpha", "memory_format")]
    return _elementwise(c, operands)


def _identity(c: _Call) -> _Map:
    return c.map()


def _per_channel(c: _Call) -> _Map:
    """An op that treats each position alike, with per-channel parameters (dim 1 not spatial)."""
    m = c.map()
    if len(m.dims) > 1 and m.dims[1] is not None:
        raise _NotLocal("mixes a spatial dim (dim 1 is not the channels)")
    return m


def _over_dims(c: _Call, dims: Any, what: str) -> _Map:
    """An op that mixes values along ``dims`` only: they must not be spatial."""
    m = c.map()
    rank = len(m.dims)
    for d in (dims if isinstance(dims, (tuple, list)) else (dims,)):
        if not isinstance(d, int) or m.dims[d % rank] is not None:
            raise _NotLocal(f"{what} over a spatial dim (global)")
    return m


def _dropout_like(training: bool) -> Callable[[_Call], _Map]:
    def rule(c: _Call) -> _Map:
        if c.module is not None and c.module.training or c.arg(2, "training", training):
            raise _NotLocal("is random in training mode (call model.eval())")
        return c.map()
    return rule


def _batch_norm(c: _Call) -> _Map:
    if c.module is not None:
        stats, training = c.module.running_mean is not None, c.module.training
    else:
        stats, training = c.arg(1, "running_mean") is not None, c.arg(5, "training", False)
    if training or not stats:
        raise _NotLocal("normalizes with batch statistics (training mode or "
                        "track_running_stats=False): global")
    return _per_channel(c)


def _layer_norm(c: _Call) -> _Map:
    shape = c.module.normalized_shape if c.module is not None else c.arg(1, "normalized_shape")
    n = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    return _over_dims(c, tuple(range(-n, 0)), "normalizes")


def _linear(c: _Call) -> _Map:
    if c.module is None and c.desc(1, "weight") is not CONST:
        raise _NotLocal("multiplies by a matrix computed from the input")
    return _over_dims(c, -1, "mixes values")


def _global(why: str) -> Callable[[_Call], _Map]:
    def rule(c: _Call) -> _Map:
        raise _NotLocal(why)
    return rule


def _softmax(c: _Call) -> _Map:
    if c.module is not None:
        dim = -3 if isinstance(c.module, nn.Softmax2d) else c.module.dim
    else:
        dim = c.arg(1, "dim")
    if dim is None:
        dim = 0 if c.value.dim() in (0, 1, 3) else 1  # torch's legacy implicit dim
    return _over_dims(c, dim, "normalizes")


def _reduce(c: _Call) -> Desc:
    """mean/sum/amax/... over explicit non-spatial dims (e.g. CBAM's channel mean)."""
    dim = c.arg(1, "dim")
    if isinstance(dim, Tensor) or (dim is None and c.node.target in ("max", "min", torch.max, torch.min)
                                   and len(c.args) > 1):
        return _pointwise(c)  # torch.max(a, b): element by element
    if dim is None:
        raise _NotLocal("reduces over every dim (global)")
    m = _over_dims(c, dim, "reduces")
    out = c.value[0] if isinstance(c.value, tuple) else c.value
    rank = len(m.dims)
    dropped = {d % rank for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
    kept = m.dims if out.dim() == rank else tuple(e for i, e in enumerate(m.dims) if i not in dropped)
    return [_Map(kept), _Map(kept)] if isinstance(c.value, tuple) else _Map(kept)


# ----------------------------------------------------------------------------------------------
# Sliding ops: convolutions, pools, padding

# Conv subclasses whose forward is still a convolution with the module's parameters; "Same" ones
# (timm's Conv2dSame, StdConv2dSame, ...) pad TF-"same" at run time.
_KNOWN_CONVS = {"UnfoldConv1d", "UnfoldConv2d", "UnfoldConv3d", "StdConv2d", "ScaledStdConv2d"}
_PLAIN_CONV = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}


def _static_pads(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        return [((d * (k - 1)) // 2, d * (k - 1) - (d * (k - 1)) // 2) for k, d in zip(kernel, dilation)]
    return [(p, p) for p in _tuple(padding, len(kernel))]


def _note_pads(c: _Call, pads: Sequence[tuple[int, int]], what: str, ceil_mode: bool = False) -> None:
    if any(p for pair in pads for p in pair):
        c.pad(f"pads the map ({what} {[list(p) for p in pads]}), so border cells are not their crop")
    elif ceil_mode:
        c.pad("uses ceil_mode=True: partial windows at the border act as padding")


def _conv(c: _Call) -> _Map:
    x, m = c.args[0], c.module
    if m is not None:
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            raise _NotLocal("is a transposed convolution (upsampling), not on the allow-list")
        name = type(m).__name__
        if type(m).forward not in _PLAIN_CONV and name not in _KNOWN_CONVS and "Same" not in name:
            raise _NotLocal(f"{name} overrides forward and is not on the allow-list of convolutions")
        kernel, stride, dilation = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
        if "Same" in name:
            pads = _same_pads(x, kernel, stride, dilation)
            c.sized = c.sized or any(s > 1 and (k - 1) * d > 0 for k, s, d in zip(kernel, stride, dilation))
        else:
            pads = _static_pads(m.padding, kernel, dilation)
        if m.padding_mode == "circular" and any(p for pair in pads for p in pair):
            raise _NotLocal("pads circularly: border cells read the opposite border")
        _note_pads(c, pads, f"{m.padding_mode} padding")
    else:
        if c.desc(1, "weight") is not CONST:
            raise _NotLocal("convolves with a kernel computed from the input")
        kernel = tuple(c.args[1].shape[2:])
        stride = _tuple(c.arg(3, "stride", 1), len(kernel))
        dilation = _tuple(c.arg(5, "dilation", 1), len(kernel))
        pads = _static_pads(c.arg(4, "padding", 0), kernel, dilation)
        _note_pads(c, pads, "padding")
    return _slide(c.map(), x, c.value, kernel, stride, pads, dilation)


_POOLS: dict[type[nn.Module], int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
                           nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_MAX_POOL_FNS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_AVG_POOL_FNS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}


def _pool(c: _Call) -> _Map:
    x, m = c.args[0], c.module
    if m is not None:
        n = next(v for k, v in _POOLS.items() if isinstance(m, k))
        name = type(m).__name__
        if type(m).forward is not next(k for k in _POOLS if isinstance(m, k)).forward and "Same" not in name:
            raise _NotLocal(f"{name} overrides forward and is not on the allow-list of pools")
        kernel, stride = _tuple(m.kernel_size, n), _tuple(m.stride or m.kernel_size, n)
        dilation, padding = _tuple(getattr(m, "dilation", 1), n), m.padding
        ceil_mode, indices = m.ceil_mode, getattr(m, "return_indices", False)
        same = [(0, 0)] * n
        if "Same" in name:  # timm's MaxPool2dSame, AvgPool2dSame: F.pad TF-"same", then the pool
            same = _same_pads(x, kernel, stride, dilation)
            c.sized = c.sized or any(s > 1 and (k - 1) * d > 0 for k, s, d in zip(kernel, stride, dilation))
    else:
        is_max = c.node.target in _MAX_POOL_FNS
        n = (_MAX_POOL_FNS if is_max else _AVG_POOL_FNS)[c.node.target]  # type: ignore[index]
        kernel = _tuple(c.arg(1, "kernel_size"), n)
        stride = _tuple(c.arg(2, "stride") or kernel, n)
        padding = c.arg(3, "padding", 0)
        dilation = _tuple(c.arg(4, "dilation", 1), n) if is_max else (1,) * n
        ceil_mode = bool(c.arg(5 if is_max else 4, "ceil_mode", False))
        indices = is_max and c.arg(6, "return_indices", False)
        same = [(0, 0)] * n
    if indices:
        raise _NotLocal("returns indices, absolute positions in the map")
    pads = [(a + p, b + p) for (a, b), p in zip(same, _tuple(padding, n))]
    _note_pads(c, pads, "padding", ceil_mode)
    return _slide(c.map(), x, c.value, kernel, stride, pads, dilation, ceil_mode)


_PAD_MODES = {nn.ConstantPad1d: "constant", nn.ConstantPad2d: "constant", nn.ConstantPad3d: "constant",
              nn.ZeroPad2d: "constant", nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect",
              nn.ReflectionPad3d: "reflect", nn.ReplicationPad1d: "replicate",
              nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate"}


def _pad(c: _Call) -> _Map:
    """F.pad and the padding modules; pairs run from the last dim backwards."""
    if c.module is not None:
        mode = next((v for k, v in _PAD_MODES.items() if type(c.module) is k), None)
        if mode is None:
            raise _NotLocal(f"{type(c.module).__name__} is not on the allow-list of paddings")
        amounts = list(c.module.padding)
    else:
        mode, amounts = c.arg(2, "mode", "constant"), list(c.arg(1, "pad"))
        if c.desc(1, "pad") is SIZE:
            c.sized = True
    m = c.map()
    dims = list(m.dims)
    pairs = [(amounts[i], amounts[i + 1]) for i in range(0, len(amounts), 2)]
    for k, (left, right) in enumerate(pairs):
        i = len(dims) - 1 - k
        e = dims[i]
        if isinstance(e, _Axis):
            if left or right:
                if mode == "circular":
                    raise _NotLocal("pads circularly: border cells read the opposite border")
                c.pad(f"pads the map ({mode} {[list(p) for p in pairs]}), so border cells are not "
                      "their crop")
            dims[i] = _Axis(e.axis, e.stride, e.offset - e.stride * left, e.extent)
    return _Map(tuple(dims))


# ----------------------------------------------------------------------------------------------
# Layout: reshape, permute, indexing, split, cat


def _reshape(c: _Call) -> _Map:
    """view/reshape/flatten/squeeze/...: each spatial dim must come out whole, as a dim of its own."""
    m, shape_in, shape_out = c.map(), tuple(c.args[0].shape), tuple(c.value.shape)
    before_in = [math.prod(shape_in[:i]) for i in range(len(shape_in) + 1)]
    before_out = [math.prod(shape_out[:j]) for j in range(len(shape_out) + 1)]
    dims: list[_Axis | None] = [None] * len(shape_out)
    j0 = 0
    for i, e in enumerate(m.dims):
        if e is None:
            continue
        j = next((j for j in range(j0, len(shape_out)) if before_out[j] == before_in[i]
                  and before_out[j + 1] == before_in[i + 1] and dims[j] is None), None)
        if j is None:
            raise _NotLocal(f"reshapes {format_shape(shape_in)} to {format_shape(shape_out)}, "
                            "merging or splitting a spatial dim")
        dims[j], j0 = e, j + 1
    return _Map(tuple(dims))


def _permute(c: _Call) -> _Map:
    """permute/transpose/movedim: replayed on a meta tensor of distinct sizes to read the order."""
    m = c.map()
    probe = torch.empty(tuple(range(2, 2 + len(m.dims))), device="meta")
    target = c.node.target
    fn = getattr(probe, target) if isinstance(target, str) else (lambda *a, **k: target(probe, *a, **k))
    order = [s - 2 for s in fn(*c.args[1:], **c.kwargs).shape]
    return _Map(tuple(m.dims[i] for i in order))


def _getitem(c: _Call) -> Desc:
    d = c.desc(0)
    if isinstance(d, list):
        return d[c.args[1]]
    if not isinstance(d, _Map) or not isinstance(c.args[0], Tensor):
        raise _NotLocal("indexes a value that is not a map")
    if c.desc(1) is SIZE:
        c.sized = True
    index = c.args[1] if isinstance(c.args[1], tuple) else (c.args[1],)
    if any(isinstance(i, (Tensor, list)) for i in index):
        raise _NotLocal("indexes with tensors (advanced indexing)")
    used = sum(i is not None and i is not Ellipsis for i in index)
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (len(d.dims) - used) + index[k + 1:]
    index = index + (slice(None),) * (len(d.dims) - sum(i is not None for i in index))
    dims: list[_Axis | None] = []
    src = 0
    for i in index:
        if i is None:
            dims.append(None)
            continue
        e, size = d.dims[src], c.args[0].shape[src]
        src += 1
        if isinstance(i, slice):
            dims.append(_slice_axis(e, i, size))
        elif e is not None:
            raise _NotLocal("picks one position along a spatial dim")
    return _Map(tuple(dims))


def _slice_axis(e: _Axis | None, s: slice, size: int) -> _Axis | None:
    if e is None:
        return None
    start, step = s.start or 0, s.step or 1
    if start < 0 or step < 1 or (s.stop is not None and s.stop < size):
        raise _NotLocal("crops a spatial dim at a position fixed relative to its end")
    return _Axis(e.axis, e.stride * step, e.offset + e.stride * start, e.extent)


def _split(c: _Call) -> list[Desc]:
    """chunk/split/unbind along a non-spatial dim: one map per piece."""
    default = 0
    dim = c.arg(1 if c.node.target in ("unbind", torch.unbind) else 2, "dim", default)
    m = _over_dims(c, dim, "splits")
    if c.node.target in ("unbind", torch.unbind):
        m = _Map(tuple(e for i, e in enumerate(m.dims) if i != dim % len(m.dims)))
    return [m for _ in c.value]


def _cat(c: _Call) -> _Map:
    tensors, nodes = c.args[0], _arg(c.node.args, c.node.kwargs, 0, "tensors")
    descs = [_desc_of(n, c.descs) for n in nodes]
    rank = c.value.dim()
    dim = c.arg(1, "dim", 0) % rank
    maps = [d for d in descs if isinstance(d, _Map)]
    if any(m.dims[dim] is not None for m in maps):
        raise _NotLocal("concatenates along a spatial dim")
    result = _Map(tuple(_combine([m.dims[i] for m in maps], "concatenates") for i in range(rank)))
    if any(d is SIZE for d in descs):
        raise _NotLocal("concatenates a tensor built from the input size (e.g. coordinate channels)",
                        result)
    if any(d is CONST for d, t in zip(descs, tensors) if t.numel()):
        raise _NotLocal("concatenates a tensor that does not come from the input (position-dependent)",
                        result)
    return result


# ----------------------------------------------------------------------------------------------
# The allow-list


def _size(c: _Call) -> _Tag:
    return SIZE


def _attribute(c: _Call) -> _Tag:
    if c.args[1] in ("dtype", "device", "ndim", "is_cuda", "layout"):
        return CONST
    if c.args[1] == "shape":
        return SIZE
    raise _NotLocal(f"reads the attribute {c.args[1]!r}, not on the allow-list")


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
                nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.Hardshrink, nn.Softshrink,
                nn.Identity)
_MODULE_RULES: list[tuple[tuple[type[nn.Module], ...], Callable[[_Call], Desc]]] = [
    (_ACTIVATIONS, _identity),
    ((nn.PReLU,), _per_channel),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
      nn.RReLU), _dropout_like(False)),
    ((nn.modules.conv._ConvNd,), _conv),
    (tuple(_POOLS), _pool),
    (tuple(_PAD_MODES) + (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d), _pad),
    ((nn.modules.batchnorm._BatchNorm,), _batch_norm),
    ((nn.LayerNorm,), _layer_norm),
    ((nn.Linear,), _linear),
    ((nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d), _softmax),
    ((nn.Flatten, nn.Unflatten), _reshape),
    ((nn.GroupNorm, nn.modules.instancenorm._InstanceNorm),
     _global("normalizes over the whole map (global statistics)")),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
      nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), _global("pools to a fixed output size (global)")),
    ((nn.Upsample,), _global("resamples the map (not a sliding op)")),
]
# Subclasses that keep the base's computation although they override forward.
_KNOWN_SUBCLASSES: dict[str, tuple[type, Callable[[_Call], Desc]]] = {
    "ChannelLayerNorm": (nn.LayerNorm, _per_channel),  # fcconv's LayerNorm over dim 1
    "Linear": (nn.Linear, _linear),                    # timm.layers.Linear: F.linear with a cast
}

_FUNCTION_RULES: dict[Any, Callable[[_Call], Desc]] = {
    **dict.fromkeys([
        F.relu, F.relu_, F.relu6, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
        F.hardsigmoid, F.hardtanh, F.leaky_relu, F.softplus, F.logsigmoid, F.softsign, F.tanhshrink,
        F.threshold, F.sigmoid, F.tanh, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp,
        torch.log, torch.abs, torch.sqrt, torch.rsqrt, torch.neg, torch.clamp, torch.clip, torch.square,
        torch.erf, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.maximum,
        torch.minimum, torch.pow, operator.add, operator.sub, operator.mul, operator.truediv,
        operator.pow, operator.neg, operator.pos, operator.iadd, operator.isub, operator.imul,
        operator.itruediv], _pointwise),
    F.prelu: _per_channel,
    **dict.fromkeys([F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                     F.feature_alpha_dropout], _dropout_like(True)),
    F.rrelu: _dropout_like(False),
    **dict.fromkeys([F.conv1d, F.conv2d, F.conv3d], _conv),
    **dict.fromkeys([*_MAX_POOL_FNS, *_AVG_POOL_FNS], _pool),
    F.pad: _pad,
    F.batch_norm: _batch_norm,
    F.layer_norm: _layer_norm,
    F.linear: _linear,
    **dict.fromkeys([F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax], _softmax),
    F.normalize: lambda c: _over_dims(c, c.arg(2, "dim", 1), "normalizes"),
    **dict.fromkeys([torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.std,
                     torch.var, torch.logsumexp, torch.prod], _reduce),
    **dict.fromkeys([torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze], _reshape),
    **dict.fromkeys([torch.permute, torch.transpose, torch.movedim, torch.swapaxes], _permute),
    **dict.fromkeys([torch.chunk, torch.split, torch.unbind], _split),
    torch.cat: _cat,
    torch.concat: _cat,
    operator.getitem: _getitem,
    getattr: _attribute,
    **dict.fromkeys([F.group_norm, F.instance_norm],
                    _global("normalizes over the whole map (global statistics)")),
    **dict.fromkeys([F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                     F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d],
                    _global("pools to a fixed output size (global)")),
    F.interpolate: _global("resamples the map (not a sliding op)"),
}

_METHOD_RULES: dict[str, Callable[[_Call], Desc]] = {
    **dict.fromkeys(["relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs",
                     "sqrt", "rsqrt", "neg", "clamp", "clamp_", "clamp_min", "clamp_max", "clip",
                     "square", "pow", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_",
                     "maximum", "minimum"], _pointwise),
    **dict.fromkeys(["float", "double", "half", "bfloat16", "to", "type_as", "contiguous", "clone",
                     "detach"], _identity),
    **dict.fromkeys(["view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "view_as",
                     "reshape_as"], _reshape),
    **dict.fromkeys(["permute", "transpose", "movedim", "swapaxes", "swapdims"], _permute),
    **dict.fromkeys(["mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod"],
                    _reduce),
    **dict.fromkeys(["chunk", "split", "unbind"], _split),
    **dict.fromkeys(["softmax", "log_softmax"], _softmax),
    "size": _size,
    "numel": _size,
    "dim": lambda c: CONST,
    "ndimension": lambda c: CONST,
}


def _module_rule(m: nn.Module) -> Callable[[_Call], Desc] | None:
    name = type(m).__name__
    if name in _KNOWN_SUBCLASSES and isinstance(m, _KNOWN_SUBCLASSES[name][0]):
        return _KNOWN_SUBCLASSES[name][1]
    for classes, rule in _MODULE_RULES:
        base = next((k for k in classes if isinstance(m, k)), None)
        if base is None:
            continue
        if rule in (_conv, _pool) or type(m).forward is base.forward:
            return rule  # _conv/_pool check subclasses themselves
        return _global(f"{name} subclasses {base.__name__} but overrides forward; not on the "
                       "allow-list")
    return None


# ----------------------------------------------------------------------------------------------
# The run


def _what(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


class _Prover(fx.Interpreter):
    """Runs the graph and keeps, per node, its descriptor and what it breaks."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.descs: dict[fx.Node, Desc] = {}
        self.not_local: dict[fx.Node, str] = {}
        self.not_exact: dict[fx.Node, str] = {}
        self.sized: set[fx.Node] = set()
        self._seen_input = False

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.descs[n] = self._describe(n, value)
        return value

    def _describe(self, n: fx.Node, value: Any) -> Desc:
        if n.op == "placeholder":
            if self._seen_input or not isinstance(value, Tensor):
                return CONST
            self._seen_input = True
            return _Map((None, None) + tuple(_Axis(i, 1, 0, 1) for i in range(value.dim() - 2)))
        if n.op in ("get_attr", "output"):
            return CONST
        found = [self.descs[i] for i in n.all_input_nodes]
        if any(d is GLOBAL for d in found):
            return GLOBAL
        if not any(isinstance(d, (_Map, list)) for d in found):
            return SIZE if any(d is SIZE for d in found) else CONST
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.module.get_submodule(str(n.target)) if n.op == "call_module" else None
        rule = self._rule(n, module)
        call = _Call(n, args, kwargs, value, self.descs, module)
        try:
            if rule is None:
                raise _NotLocal("is not on the allow-list of ops known to be local")
            desc = rule(call)
        except _NotLocal as e:
            self.not_local[n] = e.why
            desc = e.keep
        if call.pads:
            self.not_exact[n] = call.pads
        if call.sized:
            self.sized.add(n)
        return desc

    def _rule(self, n: fx.Node, module: nn.Module | None) -> Callable[[_Call], Desc] | None:
        if module is not None:
            return _module_rule(module)
        if n.op == "call_method":
            return _METHOD_RULES.get(str(n.target))
        try:
            return _FUNCTION_RULES.get(n.target)
        except TypeError:  # unhashable target
            return None


def _run(gm: fx.GraphModule, shape: tuple[int, ...]) -> _Prover:
    """Run on fake tensors (no compute, no memory); on real zeros if the graph needs values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    param = next((p for p in gm.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    device = param.device if param is not None else torch.device("cpu")
    prover = _Prover(gm)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            prover.run(torch.empty(1, *shape, dtype=dtype, device=device))
        return prover
    except Exception:  # data-dependent control flow or an op without a fake kernel
        prover = _Prover(gm)
    try:
        with torch.no_grad():
            prover.run(torch.zeros(1, *shape, dtype=dtype, device=device))
    except Exception as e:
        raise FcconvError(
            f"Cannot analyze the graph at input shape {format_shape(shape)}: running it failed with "
            f"{type(e).__name__}: {e}. Pass a shape the model accepts."
        ) from None
    return prover


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _field(desc: Desc, ndim: int) -> ReceptiveField | None:
    if not isinstance(desc, _Map):
        return None
    axes = [e for e in desc.dims if e is not None]
    if len(desc.dims) != ndim + 2 or desc.dims[:2] != (None, None) or [a.axis for a in axes] != list(
            range(ndim)):
        return None
    return ReceptiveField(tuple(a.stride for a in axes), tuple(a.offset for a in axes),
                          tuple(a.extent for a in axes))


def analyze(gm: fx.GraphModule, input_shape: Sequence[int]) -> Analysis:
    """Prove the geometry of ``gm`` (a traced or converted model) at one input size.

    Args:
        gm: the graph, e.g. ``convolutionalize(model, shape).graph_module``.
        input_shape: per-sample ``(C, *spatial)`` of the image at which to evaluate the geometry.

    Returns:
        An :class:`Analysis`: the receptive field of an output cell, whether tiling is exact
        (``local``), whether each cell is the model on its crop (``exact_sliding_window``), each
        with the first node that breaks it.

    Raises:
        FcconvError: on a malformed ``input_shape`` or a graph that fails to run at it.

    Example:
        >>> a = analyze(convolutionalize(resnet18().eval(), (3, 224, 224)).graph_module, (3, 320, 320))
        >>> a.local, a.exact_sliding_window, a.field.box((0, 0))
    """
    shape = check_input_shape(input_shape)
    prover = _run(gm, shape)
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    result = _first_node(out.args) if out is not None else None
    if result is None:
        raise FcconvError("Cannot analyze a graph that returns no tensor computed from its input.")
    order = [n for n in gm.graph.nodes if n in _ancestors(result)]
    field = _field(prover.descs[result], len(shape) - 1)
    why_local = next((_reason(n, gm, prover.not_local[n]) for n in order if n in prover.not_local), None)
    if why_local is None and field is None:
        why_local = f"the output {_what(result, gm)} is not an (N, C, *spatial) map of the input"
    breaks = {**prover.not_exact, **prover.not_local}
    why_exact = next((_reason(n, gm, breaks[n]) for n in order if n in breaks), why_local)
    return Analysis(
        field=field, local=why_local is None, why_not_local=why_local,
        exact_sliding_window=why_exact is None, why_not_exact=why_exact,
        size_dependent=any(n in prover.sized for n in order),
    )


def _first_node(args: Any) -> fx.Node | None:
    if isinstance(args, fx.Node):
        return args
    if isinstance(args, (list, tuple)):
        return next((f for f in map(_first_node, args) if f is not None), None)
    if isinstance(args, dict):
        return _first_node(list(args.values()))
    return None


def _reason(node: fx.Node, gm: fx.GraphModule, why: str) -> str:
    return f"node {node.name!r} ({_what(node, gm)}): {why}"
