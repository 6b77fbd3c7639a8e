"""Where the feature map enters the head: a flatten, or a global pooling in any of its forms,
becomes a stride-1 pooling over the training feature size."""

from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn

from fcconv._shapes import dim_labels, format_shape
from fcconv.errors import NotEquivalentError
from fcconv.models.descriptors import Spatial, desc_labels, permuted_dims
from fcconv.models.head_state import Layout, Pass
from fcconv.models.modules import pool_module
from fcconv.models.ops import adaptive_output_size, is_flatten_like, reduction_of
from fcconv.models.tracing import arg, data_inputs, describe

__all__ = ["collapse", "downstream", "permuted_map_error"]


def collapse(p: Pass, node: fx.Node, src: fx.Node) -> Layout:
    """Rewrite a node that turns the varying feature map into the fixed head input."""
    gm, ndim = p.gm, p.ndim
    if not isinstance(p.shapes.get(src), tuple):  # x.flatten(2).max(2).values: src is max's pair
        found = _global_reduction(p, node, src)
        if found is None:
            raise p.fail(node, "it reads a pair of tensors computed from the feature map",
                         "Only a global pooling, written in any of the usual ways, can feed the head")
        return _replace_by_pool(p, node, found[1], found[0], tuple(p.shape(found[1])[2:]),
                                keep=False, layout_spatial=(1,) * ndim)
    src_shape = p.shape(src)
    channels, spatial = src_shape[1], tuple(src_shape[2:])
    adaptive = adaptive_output_size(node, gm)
    reduction = reduction_of(node)
    out_shape = p.shape(node)
    src_desc = p.descs.get(src)
    if isinstance(src_desc, tuple) and permuted_dims(src_desc) and len(src_shape) == ndim + 2 and (
            is_flatten_like(node, gm) or (adaptive is not None and any(o != 1 for o in adaptive[2]))):
        raise permuted_map_error(p, node, _permuting_node(p, src), src_shape, desc_labels(src_desc, ndim))
    if adaptive is not None and len(src_shape) == ndim + 2:
        _, kind, size = adaptive
        kernel, stride = [], []
        for s, o in zip(spatial, size):
            if o is None or o == s:
                kernel.append(1)
            elif o == 1:
                kernel.append(s)
            elif s % o == 0:  # VGG's AdaptiveAvgPool2d(7) on a 14x14 map: AvgPool2d(2)
                kernel.append(s // o)
            else:
                raise p.fail(
                    node, f"it pools the {format_shape(src_shape[1:])} feature map to "
                    f"{format_shape(out_shape[1:])}, neither the identity, a global pool nor a "
                    "pool whose output size divides its input's, so it has no convolutional "
                    "equivalent",
                    "Convert at the training resolution where it is the identity (e.g. "
                    "input_shape=(3, 224, 224) for torchvision's vgg and alexnet) or global",
                )
            stride.append(kernel[-1] if o not in (None, 1) else 1)
        return _replace_by_pool(p, node, src, kind, tuple(kernel), keep=True,
                                layout_spatial=tuple(out_shape[2:]),
                                stride=tuple(stride) if any(t != 1 for t in stride) else None)
    if reduction is not None and len(src_shape) == ndim + 2:
        kind, dims, keepdim = reduction
        rank = len(src_shape)
        if {d % rank for d in dims} == set(range(2, rank)):
            return _replace_by_pool(p, node, src, kind, spatial, keep=keepdim,
                                    layout_spatial=(1,) * ndim)
    global_pool = _global_reduction(p, node, src)
    if global_pool is not None:
        kind, base = global_pool
        return _replace_by_pool(p, node, base, kind, tuple(p.shape(base)[2:]), keep=False,
                                layout_spatial=(1,) * ndim)
    if is_flatten_like(node, gm) and len(out_shape) == 2 and len(src_shape) == ndim + 2:
        p.remove(node, src)
        if all(s == 1 for s in spatial):
            return Layout("channels", channels, spatial)
        return Layout("window", channels, spatial)
    raise p.fail(
        node, f"it turns the feature map {format_shape(src_shape[1:])} into "
        f"{format_shape(out_shape[1:]) if out_shape else 'a value'} of a size fixed by the training "
        "input, which fcconv cannot slide",
        "Only a flatten (torch.flatten, view, reshape, nn.Flatten), an adaptive pooling that is "
        "the identity or global, or a mean/amax over all spatial dims can feed the head",
    )


def _reduction_step(p: Pass, node: fx.Node) -> tuple[str, tuple[int, ...], fx.Node] | None:
    """``(kind, dims, input)`` for a reduction without keepdim: ``mean``/``amax`` (avg, max),
    ``sum`` (sum) over dims, and ``x.max(dim).values`` (max)."""
    found = reduction_of(node)
    if found is None and node.op in ("call_method", "call_function") and node.target in (
            "sum", torch.sum):
        dims = _int_dims(arg(node, 1, "dim"))
        keep = arg(node, 2, "keepdim", False)
        found = ("sum", dims, keep) if dims is not None and isinstance(keep, bool) else None
    if found is None and _is_max_values(node):
        reduced = node.args[0]
        assert isinstance(reduced, fx.Node)
        dims = _int_dims(arg(reduced, 1, "dim"))
        keep = arg(reduced, 2, "keepdim", False)
        found = ("max", dims, keep) if dims is not None and isinstance(keep, bool) else None
        node = reduced
    if found is None or found[2] or not node.all_input_nodes:
        return None
    return found[0], found[1], node.all_input_nodes[0]


def _int_dims(value: object) -> tuple[int, ...] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def _is_max_values(node: fx.Node) -> bool:
    """``x.max(dim).values`` or ``x.max(dim)[0]``."""
    is_values = (node.op == "call_function" and node.target is getattr and node.args[1:] == ("values",)
                 ) or (node.op == "call_function" and node.target is operator.getitem
                       and node.args[1:] == (0,))
    reduced = node.args[0] if node.args else None
    return is_values and isinstance(reduced, fx.Node) and reduced.target in ("max", torch.max) and (
        arg(reduced, 1, "dim") is not None)


def _global_reduction(p: Pass, node: fx.Node, src: fx.Node) -> tuple[str, fx.Node] | None:
    """``(kind, map)`` if ``node`` pools a canonical ``(N, C, *spatial)`` map over all its spatial
    dims into ``(N, C)``, written another way: a mean over the spatial dims of a channels-last map
    (a canonical copy is inserted), means of means (``x.mean(-1).mean(-1)``), a sum, a max over
    the last dim of a ``(N, C, H*W)`` flatten (``x.flatten(2).max(2).values``)."""
    step = _reduction_step(p, node)
    if step is None:
        return None
    kind, dims, current = step
    removed: list[int] = []
    while True:
        desc, shape = p.descs.get(current), p.shapes.get(current)
        if not isinstance(desc, tuple) or not isinstance(shape, tuple) or len(desc) != len(shape):
            return None
        rank = len(shape)
        reduced = [desc[d % rank] for d in dims]
        if rank == 3 and {d % rank for d in dims} == {2} and _flattens_map(p, current):
            return kind, current.all_input_nodes[0]
        if not all(isinstance(e, Spatial) for e in reduced):
            return None
        removed += [e.k for e in reduced if isinstance(e, Spatial)]
        if sorted(removed) == list(range(p.ndim)) and rank == p.ndim + 2:
            return kind, _canonical(p, current, desc)
        step = _reduction_step(p, current)
        if step is None or step[0] != kind:
            return None
        _, dims, current = step


def _flattens_map(p: Pass, node: fx.Node) -> bool:
    """``node`` is ``(N, C, H*W)``, a flatten of a canonical ``(N, C, H, W)`` map."""
    base = node.all_input_nodes[0] if node.all_input_nodes else None
    base_shape = p.shapes.get(base) if base is not None else None
    return (is_flatten_like(node, p.gm) and isinstance(base_shape, tuple) and base is not None
            and len(base_shape) == p.ndim + 2 and base_shape[:2] == p.shape(node)[:2]
            and not permuted_dims(p.descs.get(base)))


def _canonical(p: Pass, node: fx.Node, desc: tuple[object, ...]) -> fx.Node:
    """``node`` if its dims are ``(N, C, *spatial)``, else a permuted copy that is."""
    if not permuted_dims(desc):  # type: ignore[arg-type]
        return node
    spatial_at = sorted((e.k, i) for i, e in enumerate(desc) if isinstance(e, Spatial))
    channel = next(i for i in range(1, len(desc)) if i not in {i for _, i in spatial_at})
    order = (0, channel, *(i for _, i in spatial_at))
    with p.gm.graph.inserting_after(node):
        canonical = p.gm.graph.call_method("permute", (node, *order))
    shape = p.shape(node)
    p.shapes[canonical] = tuple(shape[i] for i in order)
    return canonical


def _permuting_node(p: Pass, src: fx.Node) -> fx.Node:
    """The first node of the chain ending at ``src`` whose output has permuted spatial dims."""
    node = src
    while True:
        before = [i for i in data_inputs(node)
                  if isinstance(p.descs.get(i), tuple) and permuted_dims(p.descs[i])]
        if not before:
            return node
        node = before[0]


def permuted_map_error(p: Pass, node: fx.Node, permuted_by: fx.Node, shape: tuple[int, ...],
                        labels: tuple[str, ...] | None) -> NotEquivalentError:
    """A flatten (or fixed pooling) of a map whose dims are not in (N, C, *spatial) order."""
    canonical = dim_labels(p.ndim)
    order = f"({', '.join(labels)})" if labels else "a permuted order"
    linear = next((f"model.{n.target}" for n in downstream(node)
                   if n.op == "call_module" and isinstance(p.module(n), nn.Linear)), "linear")
    todo = (f"Flatten the {''.join(canonical)} map instead (x.flatten(1) before any permute), or "
            f"permute the Linear's weight columns to {''.join(canonical)} order before converting "
            "(both, to keep the model's function)")
    if labels and labels[0] == "N":
        to_canonical = tuple(labels.index(c) for c in canonical)
        view = ", ".join(map(str, shape[1:]))
        todo += (f": {linear}.weight.data = {linear}.weight.data.view(-1, {view})"
                 f".permute{to_canonical}.reshape({linear}.out_features, -1)")
    what = "flattens" if is_flatten_like(node, p.gm) else "pools"
    return p.fail(
        node, f"it {what} a {format_shape(shape[1:])} map whose dims {describe(permuted_by, p.gm)} "
        f"put in the order {order} instead of ({', '.join(canonical)}); a flatten of a permuted "
        "(e.g. NHWC, channels-last) map is not supported: fcconv turns the Linear after the flatten "
        f"into a conv over the {''.join(canonical)} map, which expects the features in "
        f"{''.join(canonical)} order", todo)


def downstream(node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``, directly or not, breadth first."""
    seen: dict[fx.Node, None] = {}
    frontier = list(node.users)
    while frontier:
        n = frontier.pop(0)
        if n not in seen:
            seen[n] = None
            frontier.extend(n.users)
    return list(seen)


def _replace_by_pool(p: Pass, node: fx.Node, src: fx.Node, kind: str, kernel: tuple[int, ...], *,
                     keep: bool, layout_spatial: tuple[int, ...],
                     stride: tuple[int, ...] | None = None) -> Layout:
    """Replace ``node`` by a pooling of ``src`` (stride 1 unless given); a ``'sum'`` is an average
    pooling times the kernel's volume."""
    channels = p.shape(src)[1]
    pool = pool_module("avg" if kind == "sum" else kind, kernel)
    if stride is not None:
        pool.stride = stride  # type: ignore[assignment]
    if all(k == 1 for k in kernel):
        p.remove(node, src)
    elif node.op == "call_module" and kind != "sum":
        p.set_module(str(node.target), pool, ("pool", kernel))
    else:
        target = p.new_module("head_pool", pool)
        with p.gm.graph.inserting_after(node):
            new = p.gm.graph.call_module(target, (src,))
        if kind == "sum":
            with p.gm.graph.inserting_after(new):
                new = p.gm.graph.call_function(operator.mul, (new, math.prod(kernel)))
        p.remove(node, new)
    if keep:
        return Layout("map", channels, layout_spatial, tuple(range(p.ndim + 2)))
    return Layout("channels", channels, (1,) * p.ndim)

