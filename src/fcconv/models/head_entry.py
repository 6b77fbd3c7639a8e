"""Where the feature map enters the head: a flatten, or a global pooling in any of its forms,
becomes a stride-1 pooling over the training feature size."""

from __future__ import annotations

from torch import fx, nn

from fcconv._shapes import dim_labels, format_shape
from fcconv.errors import NotEquivalentError
from fcconv.models.descriptors import Spatial, desc_labels, permuted_dims
from fcconv.models.head_state import Layout, Pass
from fcconv.models.modules import pool_module
from fcconv.models.ops import adaptive_output_size, is_flatten_like, reduction_of
from fcconv.models.tracing import data_inputs, describe

__all__ = ["collapse", "downstream", "permuted_map_error"]


def collapse(p: Pass, node: fx.Node, src: fx.Node) -> Layout:
    """Rewrite a node that turns the varying feature map into the fixed head input."""
    gm, ndim = p.gm, p.ndim
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
        kernel = []
        for s, o in zip(spatial, size):
            if o is None or o == s:
                kernel.append(1)
            elif o == 1:
                kernel.append(s)
            else:
                raise p.fail(
                    node, f"it pools the {format_shape(src_shape[1:])} feature map to "
                    f"{format_shape(out_shape[1:])}, neither the identity nor a global pool, so it "
                    "has no convolutional equivalent",
                    "Convert at the training resolution where it is the identity (e.g. "
                    "input_shape=(3, 224, 224) for torchvision's vgg and alexnet) or global",
                )
        return _replace_by_pool(p, node, src, kind, tuple(kernel), keep=True,
                                layout_spatial=tuple(out_shape[2:]))
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


def _global_reduction(p: Pass, node: fx.Node, src: fx.Node) -> tuple[str, fx.Node] | None:
    """``(kind, map)`` if ``node`` pools ``src`` over all its spatial dims into ``(N, C)``, written
    another way: a mean over the spatial dims of a channels-last map (a canonical ``(N, C, *spatial)``
    copy is inserted), or a mean/amax over the last dim of a ``(N, C, H*W)`` flatten of the map."""
    reduction = reduction_of(node)
    if reduction is None or reduction[2]:
        return None
    kind, dims = reduction[0], reduction[1]
    src_shape, src_desc = p.shape(src), p.descs.get(src)
    rank = len(src_shape)
    if not isinstance(src_desc, tuple) or len(src_desc) != rank:
        return None
    if rank == p.ndim + 2 and desc_labels(src_desc, p.ndim) is not None:
        spatial_at = {i for i, e in enumerate(src_desc) if isinstance(e, Spatial)}
        if {d % rank for d in dims} != spatial_at:
            return None
        order = [0, next(i for i in range(1, rank) if i not in spatial_at)]
        order += sorted(spatial_at, key=lambda i: src_desc[i].k)
        with p.gm.graph.inserting_after(src):
            canonical = p.gm.graph.call_method("permute", (src, *order))
        p.shapes[canonical] = tuple(src_shape[i] for i in order)
        return kind, canonical
    if not src.all_input_nodes:
        return None
    base = src.all_input_nodes[0]
    base_shape = p.shapes.get(base)
    if (rank == 3 and is_flatten_like(src, p.gm) and {d % rank for d in dims} == {2}
            and isinstance(base_shape, tuple) and len(base_shape) == p.ndim + 2
            and base_shape[:2] == src_shape[:2] and not permuted_dims(p.descs.get(base))):
        return kind, base
    return None


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
                     keep: bool, layout_spatial: tuple[int, ...]) -> Layout:
    channels = p.shape(src)[1]
    if all(k == 1 for k in kernel):
        p.remove(node, src)
    elif node.op == "call_module":
        p.set_module(str(node.target), pool_module(kind, kernel), ("pool", kernel))
    else:
        target = p.new_module("head_pool", pool_module(kind, kernel))
        with p.gm.graph.inserting_after(node):
            new = p.gm.graph.call_module(target, (src,))
        p.remove(node, new)
    if keep:
        return Layout("map", channels, layout_spatial, tuple(range(p.ndim + 2)))
    return Layout("channels", channels, (1,) * p.ndim)

