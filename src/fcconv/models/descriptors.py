"""How the size of every dim of every tensor of a graph depends on the input's spatial size.

An abstract interpretation of the graph: a dim that follows the input is ``Spatial(k, T, C)``, its
size ``floor((S_k + C) / T)`` for the input size ``S_k``: the closed form of any chain of
convolutions and poolings (``floor((floor((S + C)/T) + a)/s) == floor((S + C + aT)/(Ts))``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import fx, nn

from fcconv._shapes import SPATIAL_LABELS, dim_labels
from fcconv.models.ops import adaptive_output_size, permutation_of, reduction_of, sliding_op_of
from fcconv.models.shapes import NodeValue, Shape
from fcconv.models.tracing import arg, data_inputs

__all__ = [
    "FLAT",
    "UNKNOWN",
    "Descriptors",
    "Spatial",
    "depends_on_input_size",
    "desc_labels",
    "output_geometry",
    "permuted_dims",
    "spatial_descriptors",
]

@dataclass(frozen=True)
class Spatial:
    """A dim whose size is ``floor((S_k + C) / T)`` for the input's spatial size ``S_k``."""

    k: int
    T: int
    C: int

    def size(self, s: int) -> int:
        return (s + self.C) // self.T


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# A dim that depends on the input size in a way the pass does not model (upsampling, an unknown op).
UNKNOWN = _Marker("UNKNOWN")
# The features of a flattened map (N, C*h*w): not spatial, but not a channel dim either.
FLAT = _Marker("FLAT")

Entry = Spatial | _Marker | None
Desc = tuple[Entry, ...]


def depends_on_input_size(desc: Desc | list[Desc] | None) -> bool:
    """True if any dim of the value changes with the input's spatial size (or may)."""
    if desc is None:
        return False
    if isinstance(desc, list):
        return any(depends_on_input_size(d) for d in desc)
    return any(isinstance(e, Spatial) or e is UNKNOWN for e in desc)


def _slide(entry: Entry, kernel: int, stride: int, padding: int | str, dilation: int,
           ceil_mode: bool) -> Entry:
    """The descriptor of a dim after a sliding op (conv or pooling)."""
    if not isinstance(entry, Spatial):
        return entry  # a constant dim stays constant, an unknown one unknown
    if padding == "same":
        return entry if stride == 1 else UNKNOWN
    if padding == "tf_same":  # ceil(S / stride), the padding computed from the size at run time
        return Spatial(entry.k, entry.T * stride, entry.C + (stride - 1) * entry.T)
    p = 0 if padding == "valid" else int(padding)
    a = 2 * p - dilation * (kernel - 1) - 1 + stride
    if ceil_mode:
        a += stride - 1
    return Spatial(entry.k, entry.T * stride, entry.C + a * entry.T)


def _align(in_shape: Shape, out_shape: Shape, in_desc: Desc) -> Desc:
    """Descriptors through a reshape: dims equal from the front and from the back are inherited."""
    n_in, n_out = len(in_shape), len(out_shape)
    front = 0
    while front < min(n_in, n_out) and in_shape[front] == out_shape[front]:
        front += 1
    back = 0
    while (back < min(n_in, n_out) - front
           and in_shape[n_in - 1 - back] == out_shape[n_out - 1 - back]):
        back += 1
    middle_in = in_desc[front:n_in - back]
    moving = any(isinstance(e, Spatial) or e is UNKNOWN for e in middle_in)
    middle: Entry = UNKNOWN if moving else (FLAT if FLAT in middle_in else None)
    return (
        tuple(in_desc[:front])
        + (middle,) * (n_out - front - back)
        + tuple(in_desc[n_in - back:])
    )


@dataclass
class Descriptors:
    """The result of :func:`spatial_descriptors`."""

    desc: dict[fx.Node, Desc | list[Desc] | None]
    pads: list[fx.Node]  # nodes that pad or use ceil_mode on a spatial dim
    unknown: list[fx.Node]  # nodes whose size arithmetic the pass does not model
    linear_on_space: list[fx.Node]  # Linears applied along a spatial dim
    # tensors of a fixed size computed from the varying map (global poolings, flattens)
    collapses: list[fx.Node] = field(default_factory=list)


def permuted_dims(desc: Desc | None) -> bool:
    """True if a spatial dim of a map sits elsewhere than at position ``2 + k`` (NHWC, H/W swapped)."""
    return desc is not None and any(
        isinstance(e, Spatial) and e.k != i - 2 for i, e in enumerate(desc))


def desc_labels(desc: Desc, ndim: int) -> tuple[str, ...] | None:
    """``('N', 'H', 'W', 'C')`` for the descriptor of a channels-last map; None if unreadable."""
    names = SPATIAL_LABELS[ndim]
    labels = []
    for i, e in enumerate(desc):
        if isinstance(e, Spatial):
            labels.append(names[e.k])
        elif e is None:
            labels.append("N" if i == 0 else "C")
        else:
            return None
    if sorted(labels) != sorted(dim_labels(ndim)):
        return None
    return tuple(labels)


class _Walk:
    """One pass over the graph in order, filling ``out`` with each node's descriptor."""

    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, NodeValue], ndim: int) -> None:
        self.gm, self.shapes, self.ndim = gm, shapes, ndim
        self.out: dict[fx.Node, Desc | list[Desc] | None] = {}
        self.pads: list[fx.Node] = []
        self.unknown: list[fx.Node] = []
        self.linear_on_space: list[fx.Node] = []
        self.seen_input = False

    def primary(self, node: fx.Node) -> tuple[fx.Node | None, Shape | None, Desc | None]:
        """The input that best explains the output: same shape and varying with the input size,
        else same shape, else varying, else the first tensor."""
        shape = self.shapes.get(node)
        best: tuple[fx.Node | None, Shape | None, Desc | None] = (None, None, None)
        best_rank = -1
        for i in data_inputs(node):
            s, d = self.shapes.get(i), self.out.get(i)
            if not isinstance(s, tuple) or not isinstance(d, tuple):
                continue
            rank = 2 * (s == shape) + depends_on_input_size(d)
            if rank > best_rank:
                best, best_rank = (i, s, d), rank
        return best

    def merged(self, node: fx.Node, shape: Shape, base: Desc) -> Desc:
        """Inherit ``base``, filling constant dims from other same-shaped inputs that vary."""
        entries = list(base)
        for i in data_inputs(node):
            s, d = self.shapes.get(i), self.out.get(i)
            if s == shape and isinstance(d, tuple):
                for j, e in enumerate(d):
                    if entries[j] is None and e is not None:
                        entries[j] = e
        return tuple(entries)

    def generic(self, node: fx.Node, shape: Shape) -> Desc:
        """Any other op: dims whose size did not change are inherited, changed ones unknown."""
        src, src_shape, src_desc = self.primary(node)
        if src is None or src_shape is None or src_desc is None:
            return (None,) * len(shape)
        if src_shape == shape:
            return self.merged(node, shape, src_desc)
        if len(src_shape) == len(shape):
            return _same_rank(src_shape, shape, src_desc)
        return _align(src_shape, shape, src_desc)

    def placeholder(self, node: fx.Node, shape: NodeValue) -> None:
        if isinstance(shape, tuple) and not self.seen_input:
            self.seen_input = True
            self.out[node] = (None, None, *(Spatial(k, 1, 0) for k in range(self.ndim)))
        elif isinstance(shape, tuple):
            self.out[node] = (None,) * len(shape)

    def several(self, node: fx.Node, shape: list[Shape | None]) -> None:
        """chunk, split, unbind: one descriptor per element."""
        _, src_shape, src_desc = self.primary(node)
        descs: list[Desc] = []
        for s in shape:
            if s is None:
                continue
            if src_shape is not None and src_desc is not None and len(s) == len(src_shape):
                descs.append(tuple(e if a == b or e is None or e is FLAT else UNKNOWN
                                   for a, b, e in zip(src_shape, s, src_desc)))
            else:
                descs.append((UNKNOWN,) * len(s))
        self.out[node] = descs

    def sliding(self, node: fx.Node, shape: Shape) -> bool:
        """A conv or a pooling: each spatial dim slides (True if ``node`` is one)."""
        found = sliding_op_of(node, self.gm, self.shapes)
        if found is None:
            return False
        n, op = found
        _, _, src_desc = self.primary(node)
        if op is None or src_desc is None or len(src_desc) != n + 2:
            self.unknown.append(node)
            self.out[node] = (None, None, *(UNKNOWN,) * (len(shape) - 2))
            return True
        entries = list(src_desc[:2])
        for i in range(n):
            p = op.padding if isinstance(op.padding, str) else op.padding[i]
            e = src_desc[2 + i]
            pads_here = op.ceil_mode or (p in ("same", "tf_same") and op.kernel[i] > 1) or (
                not isinstance(p, str) and p > 0)
            if isinstance(e, Spatial) and pads_here:
                self.pads.append(node)
            entries.append(_slide(e, op.kernel[i], op.stride[i], p, op.dilation[i], op.ceil_mode))
        entries[1] = None  # channels
        self.out[node] = tuple(entries)
        return True

    def adaptive(self, node: fx.Node) -> bool:
        found = adaptive_output_size(node, self.gm)
        if found is None:
            return False
        _, _, src_desc = self.primary(node)
        n, _, size = found
        if src_desc is None or len(src_desc) != n + 2:
            return False
        self.out[node] = (*src_desc[:2], *(src_desc[2 + i] if size[i] is None else None for i in range(n)))
        return True

    def reduction(self, node: fx.Node) -> bool:
        found = reduction_of(node)
        _, _, src_desc = self.primary(node)
        if found is None or src_desc is None:
            return False
        rank = len(src_desc)
        reduced = {d % rank for d in found[1]}
        if found[2]:  # keepdim
            self.out[node] = tuple(None if i in reduced else e for i, e in enumerate(src_desc))
        else:
            self.out[node] = tuple(e for i, e in enumerate(src_desc) if i not in reduced)
        return True

    def pad(self, node: fx.Node) -> bool:
        if not (node.op == "call_function" and node.target is F.pad):
            return False
        _, _, src_desc = self.primary(node)
        pad = arg(node, 1, "pad")
        if src_desc is None or not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad):
            return False
        entries = list(src_desc)
        for j in range(len(pad) // 2):
            dim = len(entries) - 1 - j
            e = entries[dim]
            total = pad[2 * j] + pad[2 * j + 1]
            if isinstance(e, Spatial) and total:
                entries[dim] = Spatial(e.k, e.T, e.C + total * e.T)
                self.pads.append(node)
        self.out[node] = tuple(entries)
        return True

    def permute(self, node: fx.Node) -> bool:
        _, _, src_desc = self.primary(node)
        perm = permutation_of(node, len(src_desc)) if src_desc is not None else None
        if perm is None or src_desc is None:
            return False
        self.out[node] = tuple(src_desc[d] for d in perm)
        return True

    def linear(self, node: fx.Node) -> bool:
        """A Linear acts on the last dim: flagged when that dim is spatial."""
        if not (node.op == "call_module" and isinstance(self.gm.get_submodule(str(node.target)), nn.Linear)):
            return False
        _, _, src_desc = self.primary(node)
        if not src_desc:
            return False
        last = src_desc[-1]
        if isinstance(last, Spatial) or last is UNKNOWN:
            self.linear_on_space.append(node)
            self.out[node] = (*src_desc[:-1], UNKNOWN)
        else:
            self.out[node] = (*src_desc[:-1], None)
        return True

    def getitem(self, node: fx.Node) -> bool:
        """An element of a chunk/split/unbind."""
        if not (node.op == "call_function" and node.target is operator.getitem):
            return False
        container = node.args[0]
        cdesc = self.out.get(container) if isinstance(container, fx.Node) else None
        if not (isinstance(cdesc, list) and isinstance(node.args[1], int)):
            return False
        self.out[node] = cdesc[node.args[1]]
        return True

    def node(self, node: fx.Node, flatten_points: set[fx.Node]) -> None:
        shape = self.shapes.get(node)
        if node.op == "placeholder":
            self.placeholder(node, shape)
        elif isinstance(shape, list):
            self.several(node, shape)
        elif not isinstance(shape, tuple):
            self.out[node] = None
        elif node.op == "get_attr":
            self.out[node] = (None,) * len(shape)
        elif self.getitem(node):
            pass
        elif node in flatten_points:
            self.out[node] = (None, FLAT)
        elif not (self.sliding(node, shape) or self.adaptive(node) or self.reduction(node)
                  or self.pad(node) or self.permute(node) or self.linear(node)):
            desc = self.generic(node, shape)
            _, _, src_desc = self.primary(node)
            if UNKNOWN in desc and not (src_desc is not None and UNKNOWN in src_desc):
                self.unknown.append(node)
            self.out[node] = desc


def _same_rank(src_shape: Shape, shape: Shape, src_desc: Desc) -> Desc:
    """Through an op that keeps the rank: a dim whose size changed with a varying input is unknown."""
    return tuple(
        (e if a == b else None) if a == b or e is None or e is FLAT else UNKNOWN
        for a, b, e in zip(src_shape, shape, src_desc)
    )


def spatial_descriptors(gm: fx.GraphModule, shapes: dict[fx.Node, NodeValue], ndim: int,
                        flatten_points: set[fx.Node] | None = None) -> Descriptors:
    """Per node and per dim, how the size depends on the input's spatial size (see module doc).

    Args:
        gm: the traced graph.
        shapes: the node shapes at the training input, from :func:`~fcconv.models.shapes.record_shapes`.
        ndim: number of spatial dims of the input.
        flatten_points: nodes that flatten a map into ``(N, features)``; their output is marked
            ``FLAT`` rather than ``UNKNOWN``.
    """
    walk = _Walk(gm, shapes, ndim)
    for node in gm.graph.nodes:
        if node.op != "output":
            walk.node(node, flatten_points or set())
    result = Descriptors(walk.out, walk.pads, walk.unknown, walk.linear_on_space)
    for node, d in walk.out.items():
        if isinstance(d, tuple) and not depends_on_input_size(d) and any(
                depends_on_input_size(walk.out.get(i)) for i in data_inputs(node)):
            result.collapses.append(node)
    return result


def output_geometry(desc: Desc | None, ndim: int) -> list[Spatial] | None:
    """The ``Spatial`` entries of an output ``(N, F, *grid)``, dim k at position 2 + k, or None."""
    if desc is None or len(desc) != ndim + 2 or desc[0] is not None or desc[1] is not None:
        return None
    entries = desc[2:]
    if not all(isinstance(e, Spatial) and e.k == k for k, e in enumerate(entries)):
        return None
    return [e for e in entries if isinstance(e, Spatial)]
