"""What the graph's ops are: convolutions and poolings with their size arithmetic, adaptive poolings,
reductions, permutations, flattens and the element-wise ops a classifier head may hold."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd

from fcconv._shapes import broadcast, conv_rank
from fcconv.models.shapes import NodeValue
from fcconv.models.tracing import arg


@dataclass
class SlidingOp:
    """The size arithmetic of a convolution or pooling along its spatial dims."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    ceil_mode: bool = False


def _conv_sizes(module: nn.Module) -> SlidingOp | None:
    if isinstance(module, _ConvNd) and not isinstance(module, _ConvTransposeNd):
        n = len(module.kernel_size)
        padding = module.padding if isinstance(module.padding, str) else broadcast(module.padding, n)
        if padding is None:
            return None
        return SlidingOp(tuple(module.kernel_size), tuple(module.stride), padding,
                         tuple(module.dilation))
    if isinstance(module, (_MaxPoolNd, _AvgPoolNd)):
        pool_ndim = conv_rank(module)
        if pool_ndim is None:
            return None
        return _pool_sizes(pool_ndim, module.kernel_size, module.stride, module.padding,
                           getattr(module, "dilation", 1), bool(module.ceil_mode))
    return None


def _pool_sizes(n: int, kernel: Any, stride: Any, padding: Any, dilation: Any,
                ceil_mode: Any) -> SlidingOp | None:
    k = broadcast(kernel, n)
    if k is None:
        return None
    s = broadcast(stride, n) if stride is not None and stride != [] and stride != () else k
    p = broadcast(padding, n)
    d = broadcast(dilation, n)
    if s is None or p is None or d is None or not isinstance(ceil_mode, bool):
        return None
    values = (*k, *s, *p, *d)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    return SlidingOp(k, s, p, d, ceil_mode)


_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_POOL_FUNCTIONS: dict[Any, tuple[int, bool]] = {
    F.max_pool1d: (1, True), F.max_pool2d: (2, True), F.max_pool3d: (3, True),
    F.avg_pool1d: (1, False), F.avg_pool2d: (2, False), F.avg_pool3d: (3, False),
    torch.max_pool1d: (1, True), torch.max_pool2d: (2, True), torch.max_pool3d: (3, True),
    torch.avg_pool1d: (1, False),
}
ADAPTIVE_FUNCTIONS: dict[Any, tuple[int, str]] = {
    F.adaptive_avg_pool1d: (1, "avg"), F.adaptive_avg_pool2d: (2, "avg"),
    F.adaptive_avg_pool3d: (3, "avg"), F.adaptive_max_pool1d: (1, "max"),
    F.adaptive_max_pool2d: (2, "max"), F.adaptive_max_pool3d: (3, "max"),
    torch.adaptive_avg_pool1d: (1, "avg"), torch.adaptive_max_pool1d: (1, "max"),
}
REDUCTIONS = {"mean": "avg", "amax": "max"}


def _functional_sliding_op(node: fx.Node, gm: fx.GraphModule,
                           shapes: dict[fx.Node, NodeValue]) -> tuple[int, SlidingOp | None] | None:
    """``(ndim, op)`` for a functional conv or pooling call, op None if its arguments are dynamic."""
    if node.op != "call_function":
        return None
    if node.target in _CONV_FUNCTIONS:
        n = _CONV_FUNCTIONS[node.target]
        weight = arg(node, 1, "weight")
        wshape = shapes.get(weight) if isinstance(weight, fx.Node) else None
        if not isinstance(wshape, tuple):
            return n, None
        padding = arg(node, 4, "padding", 0)
        if not isinstance(padding, str):
            padding = broadcast(padding, n)
        stride, dilation = broadcast(arg(node, 3, "stride", 1), n), broadcast(arg(node, 5, "dilation", 1), n)
        if padding is None or stride is None or dilation is None:
            return n, None
        return n, SlidingOp(tuple(wshape[2:]), stride, padding, dilation)
    if node.target in _POOL_FUNCTIONS:
        n, is_max = _POOL_FUNCTIONS[node.target]
        if pools_whole_input(node, n):
            return None  # F.avg_pool2d(x, x.size()[2:]): a global pooling, see adaptive_output_size
        pair = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        if pair is None:
            return n, None
        kw = pair.kwargs
        if kw.get("return_indices"):
            return n, None
        return n, _pool_sizes(n, kw.get("kernel_size"), kw.get("stride"), kw.get("padding", 0),
                              kw.get("dilation", 1) if is_max else 1, kw.get("ceil_mode", False))
    return None


# Modules that pad "same" the TensorFlow way, from the input size at run time: output ceil(S / s).
TF_SAME_MODULES = {
    "timm.layers.conv2d_same.Conv2dSame", "timm.layers.pool2d_same.MaxPool2dSame",
    "timm.layers.pool2d_same.AvgPool2dSame",
}


def _tf_same_op(module: nn.Module) -> tuple[int, SlidingOp | None] | None:
    """``(2, op)`` with padding ``"tf_same"`` for a module of :data:`TF_SAME_MODULES`."""
    if f"{type(module).__module__}.{type(module).__qualname__}" not in TF_SAME_MODULES:
        return None
    op = _conv_sizes(module)
    if op is None or op.ceil_mode:
        return 2, None
    op.padding = "tf_same"
    return 2, op


def sliding_op_of(node: fx.Node, gm: fx.GraphModule,
                  shapes: dict[fx.Node, NodeValue]) -> tuple[int, SlidingOp | None] | None:
    """``(ndim, op)`` if ``node`` is a conv or a pooling (module or function), else None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        tf_same = _tf_same_op(module)
        if tf_same is not None:
            return tf_same
        if isinstance(module, _ConvTransposeNd):
            return None
        if isinstance(module, _ConvNd):
            return len(module.kernel_size), _conv_sizes(module)
        if isinstance(module, (_MaxPoolNd, _AvgPoolNd)):
            op = _conv_sizes(module)
            n = (conv_rank(module) or 0)
            if getattr(module, "return_indices", False):
                return None
            return n, op
        return None
    return _functional_sliding_op(node, gm, shapes)


def adaptive_output_size(node: fx.Node, gm: fx.GraphModule) -> tuple[int, str, tuple[Any, ...]] | None:
    """``(ndim, 'avg'|'max', output_size)`` for an adaptive pooling node, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, (_AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd)):
            if getattr(module, "return_indices", False):
                return None
            n = conv_rank(module) or 0
            size = broadcast(module.output_size, n)
            kind = "avg" if isinstance(module, _AdaptiveAvgPoolNd) else "max"
            return (n, kind, size) if size is not None else None
    elif node.op == "call_function" and node.target in _POOL_FUNCTIONS:
        n, is_max = _POOL_FUNCTIONS[node.target]
        if pools_whole_input(node, n):
            return n, "max" if is_max else "avg", (1,) * n
    elif node.op == "call_function" and node.target in ADAPTIVE_FUNCTIONS:
        n, kind = ADAPTIVE_FUNCTIONS[node.target]
        if arg(node, 2, "return_indices", False):
            return None
        size = broadcast(arg(node, 1, "output_size"), n)
        if size is None or any(isinstance(s, fx.Node) for s in size):
            return None
        return n, kind, size
    return None


def _size_of(value: Any, x: fx.Node, dim: int, ndim: int) -> bool:
    """``value`` is ``x.size(dim)``, ``x.shape[dim]`` or ``x.size()[dim]`` (dim counted from 0 or -ndim-2)."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method" and value.target == "size" and value.args[0] is x and len(value.args) == 2:
        return value.args[1] in (dim, dim - ndim - 2)
    if value.op == "call_function" and value.target is operator.getitem:
        return _whole_size(value.args[0], x) and value.args[1] in (dim, dim - ndim - 2)
    return False


def _whole_size(value: Any, x: fx.Node) -> bool:
    """``value`` is ``x.size()`` or ``x.shape``."""
    return isinstance(value, fx.Node) and value.args[:1] == (x,) and (
        (value.op == "call_method" and value.target == "size" and len(value.args) == 1)
        or (value.op == "call_function" and value.target is getattr and value.args[1:] == ("shape",)))


def pools_whole_input(node: fx.Node, n: int) -> bool:
    """A pooling call whose kernel is its input's spatial size and stride the default:
    ``F.avg_pool2d(x, x.size()[2:])``, ``F.max_pool2d(x, (x.size(2), x.size(3)))``."""
    x, kernel = node.args[0] if node.args else None, arg(node, 1, "kernel_size")
    if not isinstance(x, fx.Node) or arg(node, 2, "stride") not in (None, (), []):
        return False
    if isinstance(kernel, fx.Node) and kernel.op == "call_function" and kernel.target is operator.getitem:
        return _whole_size(kernel.args[0], x) and kernel.args[1] in (slice(2, None), slice(-n, None))
    return isinstance(kernel, (tuple, list)) and len(kernel) == n and all(
        _size_of(v, x, 2 + k, n) for k, v in enumerate(kernel))


def reduction_of(node: fx.Node) -> tuple[str, tuple[int, ...], bool] | None:
    """``('avg'|'max', dims, keepdim)`` for ``mean``/``amax`` over explicit dims, else None."""
    if node.op == "call_method" and node.target in REDUCTIONS:
        kind = REDUCTIONS[str(node.target)]
    elif node.op == "call_function" and node.target in (torch.mean, torch.amax):
        kind = "avg" if node.target is torch.mean else "max"
    else:
        return None
    dims = arg(node, 1, "dim")
    keepdim = arg(node, 2, "keepdim", False)
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        return None
    if not isinstance(keepdim, bool) or arg(node, 3, "dtype") is not None:
        return None
    return kind, tuple(dims), keepdim



_PERMUTE_METHODS = {"permute"}
_SWAP_METHODS = {"transpose", "swapaxes", "swapdims"}
_MOVE_METHODS = {"movedim", "moveaxis"}


def _dims(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (tuple, list, torch.Size)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    return None


def permutation_of(node: fx.Node, rank: int) -> tuple[int, ...] | None:
    """The dim order of a ``permute``/``transpose``/``swapaxes``/``movedim`` node, else None.

    ``result[i]`` is the input dim found at position ``i`` of the output (``rank`` is the input's
    number of dims). None when the node is none of these, or its dims are not constant ints.
    """
    is_method, is_fn = node.op == "call_method", node.op == "call_function"
    target = node.target
    name = target if is_method else getattr(target, "__name__", None) if is_fn else None
    if is_fn and getattr(torch, str(name), None) is not target:
        return None  # only torch.permute, torch.transpose, ... (not same-named functions elsewhere)
    if name in _PERMUTE_METHODS:
        order = _dims(node.args[1:] if is_method and len(node.args) > 2 else arg(node, 1, "dims"))
        if order is None or len(order) != rank or sorted(d % rank for d in order) != list(range(rank)):
            return None
        return tuple(d % rank for d in order)
    if name in _SWAP_METHODS:
        d0, d1 = _dims(arg(node, 1, "dim0")), _dims(arg(node, 2, "dim1"))
        if d0 is None or d1 is None or len(d0) != 1 or len(d1) != 1 or rank == 0:
            return None
        swapped = list(range(rank))
        a, b = d0[0] % rank, d1[0] % rank
        swapped[a], swapped[b] = swapped[b], swapped[a]
        return tuple(swapped)
    if name in _MOVE_METHODS:
        source = _dims(arg(node, 1, "source"))
        destination = _dims(arg(node, 2, "destination"))
        if source is None or destination is None or len(source) != len(destination) or rank == 0:
            return None
        moved: list[int | None] = [None] * rank
        for s, d in zip(source, destination):
            moved[d % rank] = s % rank
        rest = iter(i for i in range(rank) if i not in {s % rank for s in source})
        return tuple(next(rest) if m is None else m for m in moved)
    return None


FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
FLATTEN_METHODS = {"flatten", "view", "reshape", "squeeze"}

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.AlphaDropout,
    nn.Hardshrink, nn.Softshrink, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout,
)
ELEMENTWISE_FUNCTIONS: set[Any] = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, F.sigmoid,
    torch.tanh, F.tanh, F.softplus, F.logsigmoid, F.softsign, torch.clamp, torch.clip,
    F.dropout, F.alpha_dropout, torch.dropout, torch.abs, torch.exp, torch.log, torch.sqrt,
    torch.square, torch.neg, operator.add, operator.sub, operator.mul, operator.truediv,
    operator.neg, operator.pow, operator.iadd, operator.imul, torch.add, torch.mul, torch.sub,
    torch.div, torch.pow, torch.rsqrt, torch.reciprocal, F.dropout1d, F.dropout2d, F.dropout3d,
    F.feature_alpha_dropout,
}
ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "abs",
    "exp", "log", "sqrt", "square", "neg", "add", "add_", "sub", "sub_", "mul", "mul_", "div",
    "div_", "pow", "contiguous", "float", "double", "half", "bfloat16", "to", "type_as", "clone",
    "detach", "rsqrt", "reciprocal",
}
# Statistics over one dim; in a head, over the features with keepdim=True (norms written out).
STAT_FUNCTIONS: set[Any] = {torch.mean, torch.var, torch.std, torch.sum, torch.amax, torch.amin}
STAT_METHODS = {"mean", "var", "std", "sum", "amax", "amin"}
DIM_FUNCTIONS: dict[Any, tuple[int, str]] = {  # function -> (position of dim, name of dim)
    F.softmax: (1, "dim"), F.log_softmax: (1, "dim"), F.softmin: (1, "dim"),
    torch.softmax: (1, "dim"), torch.log_softmax: (1, "dim"), F.normalize: (2, "dim"),
}
DIM_METHODS = {"softmax": 0, "log_softmax": 0}
DIM_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)


def is_flatten_like(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A flatten, view, reshape or squeeze (function, method or ``nn.Flatten``)."""
    if node.op == "call_function":
        return node.target in FLATTEN_FUNCTIONS
    if node.op == "call_method":
        return node.target in FLATTEN_METHODS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.Flatten)
    return False


def flatten_points(gm: fx.GraphModule, shapes: dict[fx.Node, NodeValue], ndim: int) -> set[fx.Node]:
    """Nodes that flatten an ``(N, C, *spatial)`` map into ``(N, C*prod(spatial))``."""
    points = set()
    for node in gm.graph.nodes:
        out = shapes.get(node)
        if not isinstance(out, tuple) or len(out) != 2 or not is_flatten_like(node, gm):
            continue
        inputs = node.all_input_nodes
        src = shapes.get(inputs[0]) if inputs else None
        if isinstance(src, tuple) and len(src) == ndim + 2 and out == (src[0], math.prod(src[1:])):
            points.add(node)
    return points
