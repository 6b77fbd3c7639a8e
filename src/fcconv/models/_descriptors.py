"""Per-tensor descriptors of the geometry proof, and the call a rule of the allow-list reads.

A map (a tensor computed from the input's values) has, per dim, either None (batch, channels) or
the input axis it runs along with an affine ``(stride, offset, extent)``: index ``j`` depends on
input ``[offset + stride*j, offset + stride*j + extent)``. Anything else is tagged CONST, SIZE
(depends on the input's size only) or GLOBAL (depends on its values through an unproven op).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx


@dataclass(frozen=True)
class Axis:
    """A tensor dim that runs along input axis ``axis``: index j reads [offset + stride*j, +extent)."""

    axis: int
    stride: int
    offset: int
    extent: int


@dataclass(frozen=True)
class Map:
    """A tensor computed from the input values: per dim, its ``Axis`` or None (batch, channels)."""

    dims: tuple[Axis | None, ...]


class Tag:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


CONST = Tag("CONST")    # depends on neither the input's values nor its size
SIZE = Tag("SIZE")      # depends on the input's size only (shapes, positions built from it)
GLOBAL = Tag("GLOBAL")  # depends on the input's values through an op not proven local
Desc = Any  # Map | Tag | list[Desc]


class NotLocal(Exception):
    """Raised by a rule: the op is not local; ``keep`` is the descriptor when the field survives."""

    def __init__(self, why: str, keep: Desc = GLOBAL) -> None:
        super().__init__(why)
        self.why, self.keep = why, keep


def argument(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def ntuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, (int, torch.SymInt)):
        return (int(value),) * n
    values = tuple(int(v) for v in value)
    return values * n if len(values) == 1 else values


def _spatial_dims(m: Map, n: int, what: str) -> tuple[Axis, ...]:
    """The last ``n`` dims of ``m``, which a sliding op slides over; all others must be non-spatial."""
    tail = m.dims[len(m.dims) - n:]
    if len(m.dims) < n + 1 or not all(isinstance(d, Axis) for d in tail) or any(
            isinstance(d, Axis) for d in m.dims[:len(m.dims) - n]):
        raise NotLocal(f"{what} over dims that are not the map's spatial dims (N, C, *spatial)")
    return tail  # type: ignore[return-value]


def slide(m: Map, x: Tensor, out: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
           pads: Sequence[tuple[int, int]], dilation: tuple[int, ...], ceil_mode: bool = False) -> Map:
    """The descriptor after a sliding op, checked against the output size it really produced."""
    n = len(kernel)
    axes = _spatial_dims(m, n, "slides")
    new: list[Axis] = []
    for i, (a, k, s, (left, right), d) in enumerate(zip(axes, kernel, stride, pads, dilation)):
        size = x.shape[x.dim() - n + i]
        span = size + left + right - d * (k - 1) - 1
        expected = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (expected - 1) * s >= size + left:
            expected -= 1
        if out.shape[out.dim() - n + i] != expected:
            raise NotLocal("its output size is not that of a sliding window of its parameters")
        new.append(Axis(a.axis, a.stride * s, a.offset - a.stride * left,
                         a.extent + a.stride * d * (k - 1)))
    return Map(m.dims[:len(m.dims) - n] + tuple(new))


def same_pads(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
               dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    """TF "same" padding at this size, as timm's ``pad_same`` computes it."""
    n, pads = len(kernel), []
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        size = x.shape[x.dim() - n + i]
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def combine(entries: list[Axis | None], what: str) -> Axis | None:
    """One dim of several maps combined element by element: the union of their fields."""
    axes = [e for e in entries if e is not None]
    if not axes:
        return None
    if len(axes) != len(entries) or len({(a.axis, a.stride) for a in axes}) != 1:
        raise NotLocal(f"{what} maps whose dims do not match (a spatial dim against another dim, "
                        "or different strides)")
    start = min(a.offset for a in axes)
    end = max(a.offset + a.extent for a in axes)
    return Axis(axes[0].axis, axes[0].stride, start, end - start)


# ----------------------------------------------------------------------------------------------
# One call and the rules of the allow-list


@dataclass
class Call:
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
        return argument(self.args, self.kwargs, i, name, default)

    def desc(self, i: int, name: str = "") -> Desc:
        return desc_of(argument(self.node.args, self.node.kwargs, i, name, None), self.descs)

    def map(self) -> Map:
        d = self.desc(0, "input")
        if not isinstance(d, Map):
            raise NotLocal("its input is not a map of the image")
        return d

    def pad(self, why: str) -> None:
        self.pads = self.pads or why


def merged(d: Desc) -> Desc:
    """A list of tags (a shape) as one tag; a list of maps (chunks) as it is."""
    if not isinstance(d, list) or not all(isinstance(e, Tag) for e in d):
        return d
    return next((t for t in (GLOBAL, SIZE) if any(e is t for e in d)), CONST)


def desc_of(a: Any, descs: dict[fx.Node, Desc]) -> Desc:
    if isinstance(a, fx.Node):
        return merged(descs[a])
    if isinstance(a, (list, tuple)):
        found = [desc_of(x, descs) for x in a]
        for tag in (GLOBAL, SIZE):
            if any(f is tag for f in found):
                return tag
        maps = [f for f in found if not isinstance(f, Tag)]
        return maps if maps else CONST
    if isinstance(a, dict):
        return desc_of(list(a.values()), descs)
    if isinstance(a, slice):
        return desc_of([a.start, a.stop, a.step], descs)
    return CONST


def elementwise(c: Call, operands: list[tuple[Any, Desc]]) -> Map:
    """Element by element with broadcasting: the union of the maps' fields; constants must be
    broadcast along every spatial dim (per-channel), and nothing may come from the input size."""
    out = c.value
    rank = out.dim()
    maps = [(v, d) for v, d in operands if isinstance(d, Map)]
    dims: list[Axis | None] = []
    for i in range(rank):
        entries = []
        for v, d in maps:
            j = i - (rank - v.dim())
            if j < 0:
                continue
            if v.shape[j] != out.shape[i]:
                if d.dims[j] is not None:
                    raise NotLocal("broadcasts a map along a spatial dim")
                continue
            entries.append(d.dims[j])
        dims.append(combine(entries, "combines") if entries else None)
    result = Map(tuple(dims))
    for v, d in operands:
        if d is SIZE:
            raise NotLocal("uses the input size as a value (sizes or positions read at run time)", result)
        if isinstance(v, Tensor) and d is CONST and any(
                e is not None and i - (rank - v.dim()) >= 0 and v.shape[i - (rank - v.dim())] != 1
                for i, e in enumerate(dims)):
            raise NotLocal("combines the map with a constant that varies along a spatial dim "
                            "(a position encoding)", result)
    return result
