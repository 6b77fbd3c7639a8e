"""Finding the classifier head of an ONNX graph by what its nodes compute.

* The flatten point is the node that turns a map ``(N, C, H, W)`` into rows ``(N, F)`` and whose rows
  never come back to a map: a squeeze-and-excitation block written with Linear layers flattens too,
  but its gate is reshaped to ``(N, C, 1, 1)`` and multiplies the trunk; it is inner gating, not the head.
* Between a global pool and the flatten, nodes that compute each cell on its own (1x1 Convs, norms
  over the channels, activations, Transposes: timm's ``conv_head``, convnext's LayerNorm head) may sit;
  once the pool slides they run on every cell of the map. Any other node there is refused by name.
"""

from __future__ import annotations

from typing import Any

from onnx import helper

from fcconv.errors import FcconvError

__all__ = ["flatten_point", "pool_behind", "to_channels_first"]

GLOBAL_POOLS = {"GlobalAveragePool": "AveragePool", "GlobalMaxPool": "MaxPool", "ReduceMean": "AveragePool"}
_UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish",
          "Erf", "Gelu", "Identity", "Dropout", "Softplus", "Softsign", "Mish", "Cast", "Sqrt", "Exp", "Log",
          "Abs", "Neg", "Reciprocal", "PRelu"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Min", "Max"}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare"}


def _rank(s: Any, name: str) -> int | None:
    shape = s.shapes.get(name)
    return None if shape is None else len(shape)


def flatten_point(s: Any) -> int:
    """The index of the node that enters the head: map to rows, the rows never back to a map."""
    consumers: dict[str, list[Any]] = {}
    for node in s.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for i, node in enumerate(s.graph.node):
        if not node.input or node.op_type in ("Shape", "Constant"):
            continue
        rows = _rank(s, node.input[0]) == 4 and _rank(s, node.output[0]) == 2
        if rows and not _back_to_a_map(s, node, consumers):
            return i
    raise FcconvError(
        "Found no node that flattens a feature map (N, C, H, W) into rows (N, F) for the output: the model "
        "has no classifier head to convolutionalize (it may be fully convolutional already)."
    )


def _back_to_a_map(s: Any, node: Any, consumers: dict[str, list[Any]]) -> bool:
    """True when a value computed from ``node``'s rows has rank 3 or more (an SE gate back on the map)."""
    seen, todo = set(), list(node.output)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for user in consumers.get(name, []):
            if user.op_type == "Shape":
                continue
            if any((_rank(s, out) or 0) >= 3 for out in user.output):
                return True
            todo += list(user.output)
    return False


def reduced_axes(s: Any, node: Any) -> list[int] | None:
    """The sorted axes (counted from 0 of a rank-4 value) the Reduce ``node`` reduces; None if not known."""
    axes = None
    for attr in node.attribute:
        if attr.name == "axes":
            axes = list(helper.get_attribute_value(attr))
    if axes is None and len(node.input) > 1:
        value = s.const(node.input[1])
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    return None if axes is None else sorted(a % 4 for a in axes)


def spatial_axes(s: Any, node: Any) -> bool:
    """True when the ReduceMean ``node`` reduces axes 2 and 3 of a rank-4 map."""
    return reduced_axes(s, node) == [2, 3]


def _is_pool(s: Any, node: Any) -> bool:
    if node.op_type not in GLOBAL_POOLS or _rank(s, node.output[0]) != 4:
        return False
    return node.op_type != "ReduceMean" or spatial_axes(s, node)


def pool_behind(s: Any, value: str) -> tuple[Any, list[Any]] | None:
    """The global pool ``value`` is computed from cell by cell, and the nodes between, in graph order.

    None when ``value`` does not come from exactly one global pool through per-cell ops only.
    """
    order = {id(n): i for i, n in enumerate(s.graph.node)}
    pools: dict[int, Any] = {}
    segment: dict[int, Any] = {}
    todo = [value]
    while todo:
        name = todo.pop()
        node = s.producers.get(name)
        if node is None:
            if s.const(name) is not None:
                continue
            return None  # the graph input: no pool on this path
        if id(node) in pools or id(node) in segment or node.op_type == "Constant":
            continue
        if _is_pool(s, node):
            pools[id(node)] = node
            continue
        if len(segment) > 200:
            return None
        segment[id(node)] = node
        todo += [i for i in node.input if i and s.const(i) is None]
    if len(pools) != 1:
        return None
    nodes = sorted(segment.values(), key=lambda n: order[id(n)])
    return next(iter(pools.values())), nodes


def check_per_cell(s: Any, pool: Any, nodes: list[Any]) -> dict[str, tuple[int, ...]]:
    """The spatial axes of every value between the pool and the flatten; refuses a node that mixes cells.

    Raises:
        FcconvError: naming the first node that does not compute each cell on its own.
    """
    spatial: dict[str, tuple[int, ...]] = {pool.output[0]: (2, 3)}
    for node in nodes:
        inputs = [i for i in node.input if i in spatial]
        if not inputs:
            raise s.fail(node, "it sits between the global pool and the flatten but reads no pooled value")
        axes = spatial[inputs[0]]
        out = _per_cell(s, node, axes, inputs, spatial)
        if out is None:
            raise s.fail(node, "it sits between the global pool and the flatten and does not compute each "
                               "cell on its own")
        for name in node.output:
            spatial[name] = out
    return spatial


def _per_cell(s: Any, node: Any, axes: tuple[int, ...], inputs: list[str],
              spatial: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The spatial axes of ``node``'s output if it computes each cell on its own, else None."""
    op, attrs = node.op_type, {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if any(spatial[i] != axes for i in inputs):
        return None
    if op in _UNARY:
        return axes
    if op == "BatchNormalization":
        return axes if axes == (2, 3) else None
    if op in _BINARY:
        others = [s.const(i) for i in node.input if i not in spatial]
        ok = all(c is not None and all(c.shape[a - 4] == 1 for a in axes if a - 4 >= -c.ndim) for c in others)
        return axes if ok else None
    if op == "Transpose":
        perm = list(attrs.get("perm", [3, 2, 1, 0]))
        return tuple(sorted(perm.index(a) for a in axes))
    if op == "Conv":
        weight = s.const(node.input[1])
        flat = (attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID") and not any(attrs.get("pads", []))
                and all(v == 1 for v in attrs.get("strides", [1])))
        return axes if axes == (2, 3) and weight is not None and weight.shape[2:] == (1, 1) and flat else None
    if op == "LayerNormalization":
        first = attrs.get("axis", -1) % 4
        return axes if all(a < first for a in axes) else None
    if op in _REDUCE:
        reduced = attrs.get("axes")
        if reduced is None and len(node.input) > 1:
            value = s.const(node.input[1])
            reduced = None if value is None else value.reshape(-1).tolist()
        keep = attrs.get("keepdims", 1)
        return axes if reduced is not None and keep and not {a % 4 for a in reduced} & set(axes) else None
    return None


def to_channels_first(axes: tuple[int, ...]) -> list[int] | None:
    """The Transpose perm that puts a rank-4 value with these spatial axes in ``(N, C, H, W)``; None if so."""
    if axes == (2, 3):
        return None
    channel = next(a for a in (1, 2, 3) if a not in axes)
    return [0, channel, *axes]
