"""The head rewrite: the flatten (or global pooling) and the Linear layers after it become convs.

* the first ``Linear`` after a flatten of a ``(C, h, w)`` map becomes a conv with kernel ``(h, w)``
  (:func:`fcconv.layers.linear_to_conv`), later ``Linear`` layers become pointwise convs
  (:func:`fcconv.layers.linear_to_pointwise`);
* element-wise modules and functions of the head carry over; ``BatchNorm1d`` becomes
  ``BatchNorm{n}d`` and ``LayerNorm`` over the features a layer norm over channels;
* an adaptive pooling that is the identity at training size is dropped; the global pooling that
  feeds the head becomes a stride-1 pooling whose kernel is the training feature size;
* global poolings inside the feature extractor (squeeze-and-excitation blocks) stay global.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fcconv._shapes import dim_labels, format_shape
from fcconv.errors import NotEquivalentError
from fcconv.layers import linear_to_conv, linear_to_pointwise
from fcconv.models.descriptors import Descriptors, depends_on_input_size, desc_labels, permuted_dims
from fcconv.models.modules import (
    as_unfold_conv,
    batchnorm_nd,
    channel_layer_norm,
    channel_layer_norm_module,
    pool_module,
)
from fcconv.models.ops import (
    DIM_FUNCTIONS,
    DIM_METHODS,
    DIM_MODULES,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    adaptive_output_size,
    is_flatten_like,
    permutation_of,
    reduction_of,
)
from fcconv.models.shapes import NodeValue
from fcconv.models.tracing import arg, data_inputs, describe

__all__ = ["Pass", "convert_head"]

@dataclass(frozen=True)
class _Layout:
    """What a head tensor holds; in the converted graph it is a map ``(N, channels, *grid)``.

    ``kind``: "channels" (a flat ``(N, F)`` of features at training size), "window" (a flat
    ``(N, C*h*w)`` that flattens a ``(C, *spatial)`` map) or "map" (a ``(N, C, *spatial)`` map of
    fixed training size, dims possibly permuted: ``order[i]`` is the canonical dim at position i).
    """

    kind: str
    channels: int
    spatial: tuple[int, ...]
    order: tuple[int, ...] = ()

    @property
    def point(self) -> bool:
        return all(s == 1 for s in self.spatial)

    @property
    def channel_position(self) -> int:
        return self.order.index(1) if self.order else 1


@dataclass
class Pass:
    """State of one conversion."""

    gm: fx.GraphModule
    source: nn.Module
    inplace: bool
    ndim: int
    head_impl: str
    shapes: dict[fx.Node, NodeValue]
    # per node, how its dims depend on the input size (from spatial_descriptors)
    descs: dict[fx.Node, Any] = field(default_factory=dict)
    layouts: dict[fx.Node, _Layout] = field(default_factory=dict)
    converted: dict[str, tuple[Any, nn.Module]] = field(default_factory=dict)
    # Nodes to drop, and what replaces them; applied at the end so that layouts stay keyed by
    # the original nodes while the head is walked.
    replaced: dict[fx.Node, fx.Node] = field(default_factory=dict)

    # -- helpers ---------------------------------------------------------------------------
    def shape(self, node: fx.Node) -> tuple[int, ...]:
        s = self.shapes.get(node)
        assert isinstance(s, tuple)
        return s

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))

    def fail(self, node: fx.Node, why: str, todo: str) -> NotEquivalentError:
        return NotEquivalentError(f"Cannot convolutionalize {describe(node, self.gm)}: {why}. {todo}.")

    def set_module(self, target: str, module: nn.Module, key: Any) -> None:
        """Put ``module`` at ``target`` (and on the source model when converting in place)."""
        previous = self.converted.get(target)
        if previous is not None:
            if previous[0] != key:
                raise NotEquivalentError(
                    f"Module '{target}' is called twice in the head with different inputs "
                    f"({previous[0]} and {key}); it cannot become one conv. Give each call its "
                    "own module."
                )
            return
        self.converted[target] = (key, module)
        roots = [self.gm, self.source] if self.inplace else [self.gm]
        for root in roots:
            parent_name, _, name = target.rpartition(".")
            try:
                parent = root.get_submodule(parent_name) if parent_name else root
            except AttributeError:
                continue
            setattr(parent, name, module)

    def new_module(self, base: str, module: nn.Module) -> str:
        name, i = base, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        self.gm.add_submodule(name, module)
        return name

    def remove(self, node: fx.Node, replacement: fx.Node) -> None:
        self.replaced[node] = replacement

    def apply_removals(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node not in self.replaced:
                continue
            replacement = self.replaced[node]
            while replacement in self.replaced:
                replacement = self.replaced[replacement]
            node.replace_all_uses_with(replacement)
            self.gm.graph.erase_node(node)


_TODO_HEAD = (
    "Only Linear, element-wise ops, Dropout, BatchNorm1d, LayerNorm, softmax, flatten/view and "
    "concatenation over features can follow the flatten. Apply this op to the score map "
    "yourself, after the converted model, or pass the module in leaf_modules if it lies in the "
    "feature extractor"
)


def _collapse(p: Pass, node: fx.Node, src: fx.Node) -> _Layout:
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
        raise _permuted_map_error(p, node, _permuting_node(p, src), src_shape, desc_labels(src_desc, ndim))
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
    if is_flatten_like(node, gm) and len(out_shape) == 2 and len(src_shape) == ndim + 2:
        p.remove(node, src)
        if all(s == 1 for s in spatial):
            return _Layout("channels", channels, spatial)
        return _Layout("window", channels, spatial)
    raise p.fail(
        node, f"it turns the feature map {format_shape(src_shape[1:])} into "
        f"{format_shape(out_shape[1:]) if out_shape else 'a value'} of a size fixed by the training "
        "input, which fcconv cannot slide",
        "Only a flatten (torch.flatten, view, reshape, nn.Flatten), an adaptive pooling that is "
        "the identity or global, or a mean/amax over all spatial dims can feed the head",
    )


def _permuting_node(p: Pass, src: fx.Node) -> fx.Node:
    """The first node of the chain ending at ``src`` whose output has permuted spatial dims."""
    node = src
    while True:
        before = [i for i in data_inputs(node)
                  if isinstance(p.descs.get(i), tuple) and permuted_dims(p.descs[i])]
        if not before:
            return node
        node = before[0]


def _permuted_map_error(p: Pass, node: fx.Node, permuted_by: fx.Node, shape: tuple[int, ...],
                        labels: tuple[str, ...] | None) -> NotEquivalentError:
    """A flatten (or fixed pooling) of a map whose dims are not in (N, C, *spatial) order."""
    canonical = dim_labels(p.ndim)
    order = f"({', '.join(labels)})" if labels else "a permuted order"
    linear = next((f"model.{n.target}" for n in _downstream(node)
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


def _downstream(node: fx.Node) -> list[fx.Node]:
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
                     keep: bool, layout_spatial: tuple[int, ...]) -> _Layout:
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
        return _Layout("map", channels, layout_spatial, tuple(range(p.ndim + 2)))
    return _Layout("channels", channels, (1,) * p.ndim)


def _head_inputs(p: Pass, node: fx.Node) -> list[fx.Node]:
    """The head tensors a head node reads; raises on other tensors that would not broadcast."""
    inputs = []
    for i in data_inputs(node):
        if i in p.layouts:
            inputs.append(i)
            continue
        s = p.shapes.get(i)
        if not isinstance(s, tuple) or math.prod(s) == 1:
            continue
        if i.op != "get_attr":
            raise p.fail(node, f"it combines the head with '{i.name}' of shape {format_shape(s)} from "
                         "outside the head", _TODO_HEAD)
        if not (node.op == "call_function" and node.target is F.layer_norm):
            raise p.fail(node, f"it combines the features with the tensor '{i.target}' of shape "
                         f"{format_shape(s)}, which would not broadcast over a map", _TODO_HEAD)
    return inputs


def _set_dim(node: fx.Node, position: int, name: str, value: int) -> None:
    if name in node.kwargs or position >= len(node.args):
        node.update_kwarg(name, value)
    else:
        node.update_arg(position, value)


def _convert_head_node(p: Pass, node: fx.Node) -> _Layout | None:
    """Rewrite one node downstream of the head entry; returns its layout."""
    inputs = _head_inputs(p, node)
    layouts = {p.layouts[i] for i in inputs}
    if len(layouts) != 1:
        raise p.fail(node, "it combines head tensors of different layouts "
                     f"({', '.join(sorted(repr(lay) for lay in layouts))})", _TODO_HEAD)
    layout = layouts.pop()
    if node.op == "call_module":
        return _module_node(p, node, inputs[0], layout)
    return _function_node(p, node, inputs[0], layout)


def _names_features(p: Pass, layout: _Layout, dim: Any) -> bool:
    """Does ``dim`` (of the training-size tensor) name the channels/features dim?"""
    if layout.kind == "channels":
        return dim in (1, -1, None)
    if layout.kind == "map":
        return isinstance(dim, int) and dim % (p.ndim + 2) == layout.channel_position
    return False


def _linear_node(p: Pass, node: fx.Node, src: fx.Node, layout: _Layout, module: nn.Linear) -> _Layout:
    """A Linear of the head becomes a conv over the window, or a pointwise conv."""
    target = str(node.target)
    if layout.kind == "window":
        conv: nn.Module = linear_to_conv(module, (layout.channels, *layout.spatial), share_weights=True)
        if p.head_impl != "conv":
            conv = as_unfold_conv(conv, p.head_impl)  # type: ignore[arg-type]
        p.set_module(target, conv, ("window", layout))
    elif layout.kind == "channels":
        pointwise: nn.Module = linear_to_pointwise(module, ndim=p.ndim, share_weights=True)
        if p.head_impl != "conv":
            pointwise = as_unfold_conv(pointwise, p.head_impl)  # type: ignore[arg-type]
        p.set_module(target, pointwise, ("channels", layout))
    elif layout.kind == "map" and layout.point and layout.channel_position == p.ndim + 1:
        return _Layout("map", module.out_features, layout.spatial, layout.order)
    else:
        raise p.fail(node, f"it acts on the last dim of a {format_shape(p.shape(src)[1:])} map",
                     "Flatten the map before the Linear, or pool it globally")
    return _Layout("channels", module.out_features, (1,) * p.ndim)


def _module_node(p: Pass, node: fx.Node, src: fx.Node, layout: _Layout) -> _Layout:
    """A module call of the head."""
    module = p.module(node)
    target, kind = str(node.target), layout.kind
    if isinstance(module, nn.Linear):
        return _linear_node(p, node, src, layout, module)
    if isinstance(module, ELEMENTWISE_MODULES):
        return layout
    if isinstance(module, nn.Flatten):
        return _reshape_node(p, node, src, layout)
    if isinstance(module, DIM_MODULES) and kind in ("channels", "map"):
        if not _names_features(p, layout, module.dim):
            raise p.fail(node, f"dim={module.dim} is not the feature dim", _TODO_HEAD)
        if kind == "channels":
            new = copy.copy(module)
            new.dim = 1
            p.set_module(target, new, ("dim", 1))
        return layout
    if isinstance(module, nn.BatchNorm1d) and kind == "channels":
        p.set_module(target, batchnorm_nd(module, p.ndim), ("bn", layout.channels))
        return layout
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and kind == "map" and (
            layout.channel_position == 1):
        return layout
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and (
            module.normalized_shape[0] == layout.channels):
        if kind == "channels":
            p.set_module(target, channel_layer_norm_module(module), ("ln", layout.channels))
            return layout
        if kind == "map" and layout.channel_position == p.ndim + 1:
            return layout
    if isinstance(module, nn.modules.conv._ConvNd) and kind == "map" and layout.point and (
            layout.channel_position == 1 and all(k == 1 for k in module.kernel_size)):
        return _Layout("map", module.out_channels, layout.spatial, layout.order)
    if isinstance(module, nn.BatchNorm1d) and kind == "window":
        raise p.fail(node, f"it normalises each of the {layout.channels}x"
                     f"{'x'.join(map(str, layout.spatial))} flattened features separately",
                     "Fold it into the following Linear first (eval mode), then convert")
    raise p.fail(node, f"fcconv does not know how {type(module).__name__} acts on the "
                 f"{kind} features of the head", _TODO_HEAD)


def _function_node(p: Pass, node: fx.Node, src: fx.Node, layout: _Layout) -> _Layout:
    """A function or method call of the head."""
    target: Any = node.target
    kind = layout.kind
    is_fn, is_method = node.op == "call_function", node.op == "call_method"
    if (is_fn and target in ELEMENTWISE_FUNCTIONS) or (is_method and target in ELEMENTWISE_METHODS):
        return layout
    if is_flatten_like(node, p.gm):
        return _reshape_node(p, node, src, layout)
    if (is_fn and target in DIM_FUNCTIONS) or (is_method and target in DIM_METHODS):
        position, name = DIM_FUNCTIONS[target] if is_fn else (DIM_METHODS[str(target)] + 1, "dim")
        dim = arg(node, position, name, 1 if target is F.normalize else None)
        if kind not in ("channels", "map") or not _names_features(p, layout, dim):
            raise p.fail(node, f"dim={dim} is not the feature dim", _TODO_HEAD)
        if kind == "channels":
            _set_dim(node, position, name, 1)
        return layout
    if is_fn and target in (torch.cat, torch.concat, torch.concatenate):
        dim = arg(node, 1, "dim", 0)
        if kind not in ("channels", "map") or dim is None or not _names_features(p, layout, dim):
            raise p.fail(node, f"it concatenates along dim {dim}, not the features", _TODO_HEAD)
        if kind == "channels":
            _set_dim(node, 1, "dim", 1)
        out_shape = p.shape(node)
        channels = out_shape[1] if kind == "channels" else out_shape[layout.channel_position]
        return _Layout(kind, channels, layout.spatial, layout.order)
    is_layer_norm = (is_fn and target is F.layer_norm) or (is_method and target == "layer_norm")
    if is_layer_norm and tuple(arg(node, 1, "normalized_shape", ())) == (layout.channels,):
        if kind == "channels":
            node.target = channel_layer_norm
            return layout
        if kind == "map" and layout.channel_position == p.ndim + 1:
            return layout
    if kind == "map":
        perm = permutation_of(node, p.ndim + 2)
        if perm is not None:
            return _Layout("map", layout.channels, layout.spatial, tuple(layout.order[d] for d in perm))
    raise p.fail(node, f"fcconv does not know how it acts on the {kind} features of the head",
                 _TODO_HEAD)


def _reshape_node(p: Pass, node: fx.Node, src: fx.Node, layout: _Layout) -> _Layout:
    """A flatten/view/reshape in the head: dropped, the map keeps its shape."""
    out = p.shapes.get(node)
    src_shape = p.shape(src)
    if not isinstance(out, tuple):
        raise p.fail(node, "it does not return a tensor", _TODO_HEAD)
    if layout.kind == "map" and len(out) == 2 and (
            layout.point or layout.order == tuple(range(p.ndim + 2))):
        p.remove(node, src)
        kind = "channels" if layout.point else "window"
        return _Layout(kind, layout.channels, layout.spatial)
    if layout.kind in ("channels", "window") and out == src_shape:
        p.remove(node, src)
        return layout
    if layout.kind == "map" and len(out) == 2:
        canonical = dim_labels(p.ndim)
        labels = tuple(canonical[d] for d in layout.order)
        permuted_by = src
        while True:  # back to the first permuting node of the head
            before = [i for i in data_inputs(permuted_by)
                      if i in p.layouts and p.layouts[i].order not in ((), tuple(range(p.ndim + 2)))]
            if not before:
                break
            permuted_by = before[0]
        raise _permuted_map_error(p, node, permuted_by, src_shape, labels)
    if layout.kind == "channels" and len(out) == p.ndim + 2 and out[:2] == src_shape and all(
            s == 1 for s in out[2:]):
        p.remove(node, src)
        return _Layout("map", layout.channels, (1,) * p.ndim, tuple(range(p.ndim + 2)))
    raise p.fail(node, f"it reshapes the head's {format_shape(src_shape[1:])} into "
                 f"{format_shape(out[1:])}", _TODO_HEAD)


def _find_head(gm: fx.GraphModule, shapes: dict[fx.Node, NodeValue],
               desc: Descriptors) -> list[tuple[fx.Node, fx.Node]]:
    """The ``(node, varying input)`` pairs where the feature map becomes the fixed head input.

    A node collapses the map when its input changes with the input size and its output does not;
    it enters the head when nothing downstream changes with the input size either (a
    squeeze-and-excitation pooling does not: its output multiplies the map again).
    """
    varying = {n for n, d in desc.desc.items() if depends_on_input_size(d)}
    downstream_varying: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        if any(u in varying or u in downstream_varying for u in node.users if u.op != "output"):
            downstream_varying.add(node)
    entries = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or node in varying:
            continue
        if not isinstance(shapes.get(node), tuple) or node in downstream_varying:
            continue
        srcs = [i for i in data_inputs(node) if i in varying and isinstance(shapes.get(i), tuple)]
        if srcs:
            entries.append((node, srcs[0]))
    return entries


def convert_head(p: Pass, desc: Descriptors) -> None:
    gm = p.gm
    entries = _find_head(gm, p.shapes, desc)
    entry_nodes = {e for e, _ in entries}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    head: set[fx.Node] = set(entry_nodes)
    for node in gm.graph.nodes:
        if node not in head and any(i in head for i in node.all_input_nodes) and node.op != "output":
            head.add(node)
    sources = dict(entries)
    for node in sorted(head, key=order.__getitem__):
        if node in sources:
            p.layouts[node] = _collapse(p, node, sources[node])
            continue
        if not isinstance(p.shapes.get(node), tuple):
            # sizes and other non-tensor values computed from head tensors (x.size(0), ...)
            continue
        layout = _convert_head_node(p, node)
        if layout is not None:
            p.layouts[node] = layout
    p.apply_removals()
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
