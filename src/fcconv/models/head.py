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
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fcconv._shapes import dim_labels, format_shape
from fcconv.errors import FcconvError
from fcconv.layers import linear_to_conv, linear_to_pointwise
from fcconv.models.descriptors import Descriptors, depends_on_input_size
from fcconv.models.head_entry import collapse, permuted_map_error
from fcconv.models.head_state import TODO_HEAD, Layout, Pass
from fcconv.models.modules import (
    as_unfold_conv,
    batchnorm_nd,
    channel_layer_norm,
    channel_layer_norm_module,
)
from fcconv.models.ops import (
    DIM_FUNCTIONS,
    DIM_METHODS,
    DIM_MODULES,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    STAT_FUNCTIONS,
    STAT_METHODS,
    is_flatten_like,
    permutation_of,
)
from fcconv.models.shapes import NodeFailure, NodeValue, node_failure, record_sizes
from fcconv.models.tracing import arg, data_inputs

__all__ = ["Pass", "convert_head"]


def _head_inputs(p: Pass, node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The head tensors a head node reads, and the parameters it combines them with; raises on
    other tensors that would not broadcast."""
    inputs, params = [], []
    for i in data_inputs(node):
        if i in p.layouts:
            inputs.append(i)
            continue
        s = p.shapes.get(i)
        if not isinstance(s, tuple) or math.prod(s) == 1:
            continue
        if i.op != "get_attr":
            raise p.fail(node, f"it combines the head with '{i.name}' of shape {format_shape(s)} from "
                         "outside the head", TODO_HEAD)
        if not (node.op == "call_function" and node.target is F.layer_norm):
            params.append(i)
    return inputs, params


def _common_layout(p: Pass, node: fx.Node, inputs: list[fx.Node]) -> Layout:
    """The layout of the result of combining ``inputs``: one layout, or one layout and others that
    differ only by one channel (a statistic over the features, broadcast back over them)."""
    layouts = {p.layouts[i] for i in inputs}
    widest = max(layouts, key=lambda lay: lay.channels)
    if all(lay == widest or (lay.channels == 1 and lay.kind == widest.kind
                             and lay.spatial == widest.spatial and lay.order == widest.order)
           for lay in layouts):
        return widest
    raise p.fail(node, "it combines head tensors of different layouts "
                 f"({', '.join(sorted(repr(lay) for lay in layouts))})", TODO_HEAD)


def _is_elementwise(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS) or (
        node.op == "call_method" and node.target in ELEMENTWISE_METHODS)


def _broadcast_param(p: Pass, node: fx.Node, param: fx.Node, layout: Layout) -> None:
    """A parameter combined element-wise with the head (a per-class scale or bias): kept if it
    broadcasts over the map as it did over the features, reshaped to ``(F, 1, ...)`` for flat
    features; refused otherwise."""
    s = p.shape(param)
    rank = p.ndim + 2
    flat = ((layout.channels,), (1, layout.channels))
    if _is_elementwise(node) and layout.kind == "channels" and s in flat:
        with p.gm.graph.inserting_before(node):
            column = p.gm.graph.call_method("reshape", (param, (-1, *(1,) * p.ndim)))
        node.replace_input_with(param, column)
        return
    if _is_elementwise(node) and layout.kind == "map" and len(s) <= rank and all(
            size == 1 or layout.order[rank - len(s) + j] == 1 for j, size in enumerate(s)):
        return
    raise p.fail(node, f"it combines the features with the tensor '{param.target}' of shape "
                 f"{format_shape(s)}, which would not broadcast over a map", TODO_HEAD)


def _set_dim(node: fx.Node, position: int, name: str, value: int) -> None:
    if name in node.kwargs or position >= len(node.args):
        node.update_kwarg(name, value)
    else:
        node.update_arg(position, value)


def _as_linear_module(p: Pass, node: fx.Node) -> fx.Node:
    """``F.linear(x, self.weight, self.bias)`` with parameters becomes a call of an ``nn.Linear``
    holding them (the same Parameters), so that it converts like one."""
    weight, bias = arg(node, 1, "weight"), arg(node, 2, "bias")
    if not (node.op == "call_function" and node.target is F.linear and isinstance(weight, fx.Node)
            and weight.op == "get_attr" and (bias is None or (isinstance(bias, fx.Node)
                                                               and bias.op == "get_attr"))):
        return node
    w = p.gm.get_parameter(str(weight.target))
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    linear.weight = w
    if isinstance(bias, fx.Node):
        linear.bias = p.gm.get_parameter(str(bias.target))
    target = p.new_module("head_linear", linear)
    with p.gm.graph.inserting_after(node):
        new = p.gm.graph.call_module(target, (node.args[0],))
    p.shapes[new] = p.shapes[node]
    p.remove(node, new)
    return new


def _attr(p: Pass, value: object) -> Any:
    """The tensor a ``get_attr`` node reads; None for None; False for anything else."""
    if value is None:
        return None
    if isinstance(value, fx.Node) and value.op == "get_attr":
        return p.gm.get_parameter(str(value.target)) if str(value.target) in dict(
            p.gm.named_parameters()) else p.gm.get_buffer(str(value.target))
    return False


def _as_batchnorm_module(p: Pass, node: fx.Node) -> fx.Node:
    """An eval-mode ``F.batch_norm(x, self.mean, self.var, self.w, self.b)`` becomes a call of an
    ``nn.BatchNorm1d`` holding the same tensors, so that it converts like one."""
    if not (node.op == "call_function" and node.target is F.batch_norm
            and arg(node, 5, "training", False) is False):
        return node
    mean, var, weight, bias = (_attr(p, arg(node, i, name)) for i, name in
                               enumerate(("running_mean", "running_var", "weight", "bias"), 1))
    if mean is None or var is None or any(t is False for t in (mean, var, weight, bias)) or (
            (weight is None) != (bias is None)):
        return node
    bn = nn.BatchNorm1d(mean.shape[0], eps=arg(node, 7, "eps", 1e-5), affine=weight is not None,
                        device=mean.device, dtype=mean.dtype)
    bn.running_mean, bn.running_var = mean, var
    if weight is not None:
        bn.weight, bn.bias = weight, bias
    target = p.new_module("head_batch_norm", bn.eval())
    with p.gm.graph.inserting_after(node):
        new = p.gm.graph.call_module(target, (node.args[0],))
    p.shapes[new] = p.shapes[node]
    p.remove(node, new)
    return new


def _convert_head_node(p: Pass, node: fx.Node) -> Layout | None:
    """Rewrite one node downstream of the head entry; returns its layout."""
    node = _as_batchnorm_module(p, _as_linear_module(p, node))
    inputs, params = _head_inputs(p, node)
    layout = _common_layout(p, node, inputs)
    for param in params:
        _broadcast_param(p, node, param, layout)
    src = next(i for i in inputs if p.layouts[i] == layout)
    if node.op == "call_module":
        return _module_node(p, node, src, layout)
    return _function_node(p, node, src, layout)


def _names_features(p: Pass, layout: Layout, dim: Any) -> bool:
    """Does ``dim`` (of the training-size tensor) name the channels/features dim?"""
    if layout.kind == "channels":
        return dim in (1, -1, None)
    if layout.kind == "map":
        return isinstance(dim, int) and dim % (p.ndim + 2) == layout.channel_position
    return False


def _linear_node(p: Pass, node: fx.Node, src: fx.Node, layout: Layout, module: nn.Linear) -> Layout:
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
        return Layout("map", module.out_features, layout.spatial, layout.order)
    else:
        raise p.fail(node, f"it acts on the last dim of a {format_shape(p.shape(src)[1:])} map",
                     "Flatten the map before the Linear, or pool it globally")
    return Layout("channels", module.out_features, (1,) * p.ndim)


def _module_node(p: Pass, node: fx.Node, src: fx.Node, layout: Layout) -> Layout:
    """A module call of the head."""
    module = p.module(node)
    target, kind = str(node.target), layout.kind
    if isinstance(module, nn.Linear):
        return _linear_node(p, node, src, layout, module)
    if isinstance(module, ELEMENTWISE_MODULES):
        return layout
    if isinstance(module, nn.PReLU) and (module.num_parameters == 1 or kind == "channels" or (
            kind == "map" and layout.channel_position == 1)):
        return layout
    if isinstance(module, nn.Flatten):
        return _reshape_node(p, node, src, layout)
    if isinstance(module, DIM_MODULES) and kind in ("channels", "map"):
        if not _names_features(p, layout, module.dim):
            raise p.fail(node, f"dim={module.dim} is not the feature dim", TODO_HEAD)
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
        if isinstance(module, nn.BatchNorm1d) and p.ndim > 1:  # an F.batch_norm on a pooled (N, C, 1, 1)
            p.set_module(target, batchnorm_nd(module, p.ndim), ("bn", layout.channels))
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
        return Layout("map", module.out_channels, layout.spatial, layout.order)
    if isinstance(module, nn.BatchNorm1d) and kind == "window":
        raise p.fail(node, f"it normalises each of the {layout.channels}x"
                     f"{'x'.join(map(str, layout.spatial))} flattened features separately",
                     "Fold it into the following Linear first (eval mode), then convert")
    raise p.fail(node, f"fcconv does not know how {type(module).__name__} acts on the "
                 f"{kind} features of the head", TODO_HEAD)


def _function_node(p: Pass, node: fx.Node, src: fx.Node, layout: Layout) -> Layout:
    """A function or method call of the head."""
    target: Any = node.target
    kind = layout.kind
    is_fn, is_method = node.op == "call_function", node.op == "call_method"
    if (is_fn and target in ELEMENTWISE_FUNCTIONS) or (is_method and target in ELEMENTWISE_METHODS):
        return layout
    if is_flatten_like(node, p.gm):
        return _reshape_node(p, node, src, layout)
    if is_fn and target is operator.getitem and _indexes_point(p, node, layout):
        p.remove(node, src)  # x[:, :, 0, 0] of a pooled (N, C, 1, 1)
        return Layout("channels", layout.channels, layout.spatial)
    if (is_fn and target in STAT_FUNCTIONS) or (is_method and target in STAT_METHODS):
        return _feature_statistic(p, node, src, layout)
    if (is_fn and target in DIM_FUNCTIONS) or (is_method and target in DIM_METHODS):
        position, name = DIM_FUNCTIONS[target] if is_fn else (DIM_METHODS[str(target)] + 1, "dim")
        dim = arg(node, position, name, 1 if target is F.normalize else None)
        if kind not in ("channels", "map") or not _names_features(p, layout, dim):
            raise p.fail(node, f"dim={dim} is not the feature dim", TODO_HEAD)
        if kind == "channels":
            _set_dim(node, position, name, 1)
        return layout
    if is_fn and target in (torch.cat, torch.concat, torch.concatenate):
        dim = arg(node, 1, "dim", 0)
        if kind not in ("channels", "map") or dim is None or not _names_features(p, layout, dim):
            raise p.fail(node, f"it concatenates along dim {dim}, not the features", TODO_HEAD)
        if kind == "channels":
            _set_dim(node, 1, "dim", 1)
        out_shape = p.shape(node)
        channels = out_shape[1] if kind == "channels" else out_shape[layout.channel_position]
        return Layout(kind, channels, layout.spatial, layout.order)
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
            return Layout("map", layout.channels, layout.spatial, tuple(layout.order[d] for d in perm))
    raise p.fail(node, f"fcconv does not know how it acts on the {kind} features of the head",
                 TODO_HEAD)


def _indexes_point(p: Pass, node: fx.Node, layout: Layout) -> bool:
    """``x[:, :, 0, 0]`` (or ``x[..., 0, 0]``) of a canonical ``(N, C, 1, 1)`` map."""
    index = node.args[1]
    if not (layout.kind == "map" and layout.point and layout.order == tuple(range(p.ndim + 2))
            and isinstance(index, tuple)):
        return False
    every = slice(None)
    return index in ((every, every, *(0,) * p.ndim), (Ellipsis, *(0,) * p.ndim))


def _feature_statistic(p: Pass, node: fx.Node, src: fx.Node, layout: Layout) -> Layout:
    """A mean, variance, sum... over the features with ``keepdim=True`` (a norm written out):
    one channel, broadcast back over the features by the ops that follow."""
    dim = arg(node, 1, "dim")
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    if not (len(dims) == 1 and layout.kind in ("channels", "map") and _names_features(p, layout, dims[0])
            and len(p.shape(node)) == len(p.shape(src))):
        raise p.fail(node, "it reduces other dims than the features (or drops the reduced dim)",
                     TODO_HEAD)
    if layout.kind == "channels":
        _set_dim(node, 1, "dim", 1)
    return Layout(layout.kind, 1, layout.spatial, layout.order)


def _reshape_node(p: Pass, node: fx.Node, src: fx.Node, layout: Layout) -> Layout:
    """A flatten/view/reshape in the head: dropped, the map keeps its shape."""
    out = p.shapes.get(node)
    src_shape = p.shape(src)
    if not isinstance(out, tuple):
        raise p.fail(node, "it does not return a tensor", TODO_HEAD)
    if layout.kind == "map" and len(out) == 2 and (
            layout.point or layout.order == tuple(range(p.ndim + 2))):
        p.remove(node, src)
        kind = "channels" if layout.point else "window"
        return Layout(kind, layout.channels, layout.spatial)
    if layout.kind in ("channels", "window") and out == src_shape:
        p.remove(node, src)
        return layout
    if layout.kind == "map" and layout.point and layout.order == tuple(range(p.ndim + 2)) and (
            2 < len(out) < p.ndim + 2 and out[:2] == src_shape[:2] and math.prod(out[2:]) == 1):
        p.remove(node, src)  # x.squeeze(-1) of a pooled (N, C, 1, 1): the next squeeze flattens
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
        raise permuted_map_error(p, node, permuted_by, src_shape, labels)
    if layout.kind == "channels" and len(out) == p.ndim + 2 and out[:2] == src_shape and all(
            s == 1 for s in out[2:]):
        p.remove(node, src)
        return Layout("map", layout.channels, (1,) * p.ndim, tuple(range(p.ndim + 2)))
    raise p.fail(node, f"it reshapes the head's {format_shape(src_shape[1:])} into "
                 f"{format_shape(out[1:])}", TODO_HEAD)


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
        srcs = [i for i in data_inputs(node) if i in varying and isinstance(shapes.get(i), (tuple, list))]
        if srcs:
            entries.append((node, srcs[0]))
    return entries


def _varying_sizes(p: Pass) -> set[fx.Node]:
    """Non-tensor nodes whose value changes with the input's spatial size: ``x.size(2)``,
    ``h * w`` from ``n, c, h, w = x.shape``..."""
    varying: set[fx.Node] = set()
    whole: dict[fx.Node, tuple[Any, ...]] = {}  # x.size() / x.shape -> the descriptor of x
    for node in p.gm.graph.nodes:
        if isinstance(p.shapes.get(node), (tuple, list)) or node.op in ("placeholder", "output"):
            continue
        x = node.args[0] if node.args else None
        x_desc = p.descs.get(x) if isinstance(x, fx.Node) else None
        if isinstance(x_desc, tuple) and ((node.op == "call_method" and node.target == "size") or (
                node.target is getattr and node.args[1:] == ("shape",))):
            dim = node.args[1] if len(node.args) > 1 else None
            if isinstance(dim, int):
                entries: tuple[Any, ...] = (x_desc[dim],)
            else:
                entries = whole[node] = x_desc
        elif node.target is operator.getitem and x in whole:
            picked = whole[x][node.args[1]] if isinstance(node.args[1], (int, slice)) else whole[x]
            entries = picked if isinstance(picked, tuple) else (picked,)
        else:
            if any(i in varying for i in node.all_input_nodes):
                varying.add(node)
            continue
        if depends_on_input_size(entries):
            varying.add(node)
    return varying


def _freeze_sizes(p: Pass, head: set[fx.Node], entries: set[fx.Node]) -> None:
    """Sizes read from the feature map and used in the head (``x.sum((2, 3)) / (h * w)``) keep
    their values at the training size."""
    varying = _varying_sizes(p)
    used = {i for n in head for i in n.all_input_nodes if i in varying}
    if not used:
        return
    placeholder = next(n for n in p.gm.graph.nodes if n.op == "placeholder")
    try:
        _, sizes = record_sizes(p.gm, p.shape(placeholder)[1:])
    except NodeFailure as error:
        raise node_failure(error, p.gm, p.shape(placeholder)[1:], "The model on its training input",
                           "This is a bug in fcconv; please report it with the model") from None
    for node in head - entries:  # entries are replaced whole (F.avg_pool2d(x, x.size()[2:]))
        if any(i in used for i in node.all_input_nodes):
            node.args = fx.node.map_arg(node.args, lambda i: sizes.get(i, i) if i in used else i)
            node.kwargs = fx.node.map_arg(node.kwargs, lambda i: sizes.get(i, i) if i in used else i)


def _convert_node_or_fail(p: Pass, node: fx.Node) -> Layout | None:
    """:func:`_convert_head_node`, with any error that is not fcconv's own named by the node."""
    try:
        return _convert_head_node(p, node)
    except FcconvError:
        raise
    except Exception as error:  # noqa: BLE001 - a raw PyTorch error never leaves convolutionalize
        raise p.fail(node, f"{type(error).__name__}: {' '.join(str(error).split())}",
                     "This is a bug in fcconv; please report it with the model") from error


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
    _freeze_sizes(p, head, entry_nodes)
    for node in sorted(head, key=order.__getitem__):
        if node in sources:
            p.layouts[node] = collapse(p, node, sources[node])
            continue
        if not isinstance(p.shapes.get(node), tuple):
            # sizes and other non-tensor values computed from head tensors (x.size(0), ...)
            continue
        layout = _convert_node_or_fail(p, node)
        if layout is not None:
            p.layouts[node] = layout
    p.apply_removals()
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
