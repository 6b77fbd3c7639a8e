"""torch.fx helpers for :mod:`fcconv.fcn`: tracing, shapes on the meta device, spatial geometry.

Three pieces, each usable alone:

* :func:`trace` symbolically traces a model with user-chosen leaf modules and turns every tracing
  failure into a :class:`~fcconv.errors.NotEquivalentError` that names the module being traced;
* :func:`record_shapes` runs a graph once on shape-only ``meta`` tensors (falling back to real zeros
  in eval mode when an op has no meta kernel) and returns the shape of every node;
* :func:`spatial_descriptors` is an abstract interpretation of the graph: for every tensor it tells,
  dim by dim, how the size depends on the input's spatial size ``S``. A dim that follows the input
  is ``Spatial(k, T, C)``: its size is ``floor((S_k + C) / T)``, the closed form of any chain of
  convolutions and poolings (``floor((floor((S + C)/T) + a)/s) == floor((S + C + aT)/(Ts))``).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.pooling import (
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _AvgPoolNd,
    _MaxPoolNd,
)

from fcconv.errors import NotEquivalentError

__all__ = [
    "FLAT",
    "UNKNOWN",
    "Spatial",
    "arg",
    "data_inputs",
    "describe",
    "dim_labels",
    "permutation_of",
    "permuted_dims",
    "record_shapes",
    "spatial_descriptors",
    "trace",
]

# ----------------------------------------------------------------------------------------------
# Tracing


def leaf_matchers(model: nn.Module, leaf_modules: object) -> tuple[tuple[type, ...], set[str]]:
    """Split ``leaf_modules`` into module types and qualified names (instances become names)."""
    if isinstance(leaf_modules, (type, nn.Module, str)):
        leaf_modules = (leaf_modules,)
    try:
        items = list(leaf_modules)  # type: ignore[call-overload]
    except TypeError:
        raise NotEquivalentError(
            f"leaf_modules must be a sequence of module types, module instances or qualified names; "
            f"got {leaf_modules!r}. Pass e.g. leaf_modules=[MyBlock] or leaf_modules=['layer1.0']."
        ) from None
    names_of = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    types: list[type] = []
    names: set[str] = set()
    for item in items:
        if isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        elif isinstance(item, nn.Module):
            if id(item) not in names_of:
                raise NotEquivalentError(
                    f"leaf_modules holds a {type(item).__name__} that is not a submodule of the "
                    "model. Pass the model's own submodule, its type or its qualified name."
                )
            names.add(names_of[id(item)])
        elif isinstance(item, str):
            names.add(item)
        else:
            raise NotEquivalentError(
                f"leaf_modules must hold module types, module instances or qualified names; got "
                f"{item!r}. Pass e.g. leaf_modules=[MyBlock]."
            )
    return tuple(types), names


class _LeafTracer(fx.Tracer):
    """An fx tracer that keeps chosen modules whole and remembers where tracing failed."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: set[str]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.stack: list[tuple[str, nn.Module]] = []
        self.failed_in: tuple[str, nn.Module] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, self.leaf_types)
            or module_qualified_name in self.leaf_names
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        name = self.path_of_module(m)
        self.stack.append((name, m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (name, m)
            raise
        finally:
            self.stack.pop()


def trace(model: nn.Module, leaf_modules: object = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; modules in ``leaf_modules`` stay single graph nodes.

    Raises:
        NotEquivalentError: if tracing fails (data-dependent control flow, unsupported Python on
            proxies...); the message names the module being traced and suggests ``leaf_modules``.
    """
    types, names = leaf_matchers(model, leaf_modules)
    tracer = _LeafTracer(types, names)
    try:
        graph = tracer.trace(model)
    except Exception as error:  # TraceError, TypeError, RuntimeError...: all tracing failures
        where = "in the model's own forward"
        advice = (
            "make that forward free of data-dependent control flow, or wrap the offending code "
            "in a submodule and pass it in leaf_modules"
        )
        if tracer.failed_in is not None:
            qualname, module = tracer.failed_in
            where = f"inside module '{qualname}' ({type(module).__name__})"
            advice = (
                f"pass leaf_modules=[{type(module).__name__}] (or leaf_modules=['{qualname}']) so "
                "that it is called as one opaque module, which must then work on larger inputs "
                "itself, or make its forward free of data-dependent control flow"
            )
        raise NotEquivalentError(
            f"Cannot trace {type(model).__name__} with torch.fx {where}: "
            f"{type(error).__name__}: {error}. To convolutionalize it, {advice}."
        ) from None
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


# ----------------------------------------------------------------------------------------------
# Shapes

Shape = tuple[int, ...]
NodeValue = Shape | list[Shape | None] | None


class NodeFailure(Exception):
    """A node raised while the graph ran on an example input."""

    def __init__(self, node: fx.Node, error: BaseException) -> None:
        super().__init__(f"{node.name}: {error}")
        self.node = node
        self.error = error


def _value_shape(value: object) -> NodeValue:
    if isinstance(value, Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, Tensor) for v in value):
        return [tuple(v.shape) for v in value]
    return None


# Modules whose output has the shape of their input: on meta tensors they are skipped (batch_norm
# on meta runs a Python decomposition, the bulk of the cost of a meta run).
_SAME_SHAPE_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.LeakyReLU, nn.Mish,
)


class _ShapeRecorder(fx.Interpreter):
    """Runs a graph and records the shape of every node; a failing node is reported by name."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.shapes: dict[fx.Node, NodeValue] = {}

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if len(args) == 1 and not kwargs and isinstance(args[0], Tensor) and args[0].is_meta:
            module = self.fetch_attr(target)
            if type(module) in _SAME_SHAPE_MODULES or (
                    isinstance(module, nn.modules.batchnorm._BatchNorm)
                    and args[0].dim() in (2, 3, 4, 5)):
                return args[0]
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except NodeFailure:
            raise
        except Exception as error:
            raise NodeFailure(n, error) from error
        self.shapes[n] = _value_shape(result)
        return result


class _Runner(nn.Module):
    """Holds the graph module so that ``functional_call`` can swap in meta parameters."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, x: Tensor) -> dict[fx.Node, NodeValue]:
        recorder = _ShapeRecorder(self.gm)
        recorder.run(x)
        return recorder.shapes


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def example_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the module's first floating tensor (float32 on CPU if none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def record_shapes(gm: fx.GraphModule, input_shape: Sequence[int], *, batch: int = 2,
                  meta_only: bool = False) -> dict[fx.Node, NodeValue]:
    """The shape of every node of ``gm`` on an input of per-sample shape ``input_shape``.

    Runs on ``meta`` tensors (no computation); where an op has no meta kernel, runs again on real
    zeros, in eval mode, without gradients, leaving every module's mode as it was.

    Raises:
        NodeFailure: if a node fails on real tensors too (or on meta with ``meta_only``).
    """
    dtype, device = example_dtype_device(gm)
    state = {**dict(gm.named_parameters(remove_duplicate=False)),
             **dict(gm.named_buffers(remove_duplicate=False))}
    meta = {f"gm.{k}": v.detach().to("meta") for k, v in state.items()}
    runner = _Runner(gm)
    x = torch.empty((batch, *input_shape), dtype=dtype, device="meta")
    try:
        with torch.no_grad(), _eval_mode(gm):
            result: dict[fx.Node, NodeValue] = torch.func.functional_call(runner, meta, (x,))
        return result
    except NodeFailure:
        if meta_only:
            raise
    with torch.no_grad(), _eval_mode(gm):
        result = runner(torch.zeros((batch, *input_shape), dtype=dtype, device=device))
    return result


# ----------------------------------------------------------------------------------------------
# Reading nodes


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given by keyword or at position ``index``."""
    if name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    return default


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes a node reads, in order, without duplicates (nested in lists and dicts too)."""
    return list(dict.fromkeys(node.all_input_nodes))


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    """``node 'fc' (Linear(in_features=512, out_features=10, bias=True))`` for messages."""
    if node.op == "call_module":
        return f"node '{node.name}' (module '{node.target}': {gm.get_submodule(str(node.target))})"
    if node.op == "call_function":
        fn = node.target
        fname = getattr(fn, "__name__", str(fn))
        module = getattr(fn, "__module__", None)
        if fname == "fn" and "boolean_dispatch" in getattr(fn, "__qualname__", ""):
            fname = "pooling function"
        qual = f"{module}.{fname}" if module and module != "_operator" else f"operator.{fname}"
        return f"node '{node.name}' (call to {qual})"
    if node.op == "call_method":
        return f"node '{node.name}' (method Tensor.{node.target})"
    return f"node '{node.name}' ({node.op} {node.target})"


# ----------------------------------------------------------------------------------------------
# Spatial descriptors


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


def _ntuple(value: Any, n: int) -> tuple[Any, ...] | None:
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == n:
        return tuple(value)
    if isinstance(value, (tuple, list)) and len(value) == 1:
        return (value[0],) * n
    return None


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
        padding = module.padding if isinstance(module.padding, str) else _ntuple(module.padding, n)
        if padding is None:
            return None
        return SlidingOp(tuple(module.kernel_size), tuple(module.stride), padding,
                         tuple(module.dilation))
    if isinstance(module, (_MaxPoolNd, _AvgPoolNd)):
        pool_ndim = {"1d": 1, "2d": 2, "3d": 3}.get(type(module).__name__[-2:].lower())
        if pool_ndim is None:
            return None
        return _pool_sizes(pool_ndim, module.kernel_size, module.stride, module.padding,
                           getattr(module, "dilation", 1), bool(module.ceil_mode))
    return None


def _pool_sizes(n: int, kernel: Any, stride: Any, padding: Any, dilation: Any,
                ceil_mode: Any) -> SlidingOp | None:
    k = _ntuple(kernel, n)
    if k is None:
        return None
    s = _ntuple(stride, n) if stride is not None and stride != [] and stride != () else k
    p = _ntuple(padding, n)
    d = _ntuple(dilation, n)
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
            padding = _ntuple(padding, n)
        stride, dilation = _ntuple(arg(node, 3, "stride", 1), n), _ntuple(arg(node, 5, "dilation", 1), n)
        if padding is None or stride is None or dilation is None:
            return n, None
        return n, SlidingOp(tuple(wshape[2:]), stride, padding, dilation)
    if node.target in _POOL_FUNCTIONS:
        n, is_max = _POOL_FUNCTIONS[node.target]
        pair = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        if pair is None:
            return n, None
        kw = pair.kwargs
        if kw.get("return_indices"):
            return n, None
        return n, _pool_sizes(n, kw.get("kernel_size"), kw.get("stride"), kw.get("padding", 0),
                              kw.get("dilation", 1) if is_max else 1, kw.get("ceil_mode", False))
    return None


def sliding_op_of(node: fx.Node, gm: fx.GraphModule,
                  shapes: dict[fx.Node, NodeValue]) -> tuple[int, SlidingOp | None] | None:
    """``(ndim, op)`` if ``node`` is a conv or a pooling (module or function), else None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _ConvTransposeNd):
            return None
        if isinstance(module, _ConvNd):
            return len(module.kernel_size), _conv_sizes(module)
        if isinstance(module, (_MaxPoolNd, _AvgPoolNd)):
            op = _conv_sizes(module)
            n = {"1d": 1, "2d": 2, "3d": 3}.get(type(module).__name__[-2:].lower(), 0)
            if getattr(module, "return_indices", False):
                return None
            return n, op
        return None
    return _functional_sliding_op(node, gm, shapes)


def _slide(entry: Entry, kernel: int, stride: int, padding: int | str, dilation: int,
           ceil_mode: bool) -> Entry:
    """The descriptor of a dim after a sliding op (conv or pooling)."""
    if not isinstance(entry, Spatial):
        return entry  # a constant dim stays constant, an unknown one unknown
    if padding == "same":
        return entry if stride == 1 else UNKNOWN
    p = 0 if padding == "valid" else int(padding)
    a = 2 * p - dilation * (kernel - 1) - 1 + stride
    if ceil_mode:
        a += stride - 1
    return Spatial(entry.k, entry.T * stride, entry.C + a * entry.T)


def adaptive_output_size(node: fx.Node, gm: fx.GraphModule) -> tuple[int, str, tuple[Any, ...]] | None:
    """``(ndim, 'avg'|'max', output_size)`` for an adaptive pooling node, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, (_AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd)):
            if getattr(module, "return_indices", False):
                return None
            n = {"1d": 1, "2d": 2, "3d": 3}[type(module).__name__[-2:].lower()]
            size = _ntuple(module.output_size, n)
            kind = "avg" if isinstance(module, _AdaptiveAvgPoolNd) else "max"
            return (n, kind, size) if size is not None else None
    elif node.op == "call_function" and node.target in ADAPTIVE_FUNCTIONS:
        n, kind = ADAPTIVE_FUNCTIONS[node.target]
        if arg(node, 2, "return_indices", False):
            return None
        size = _ntuple(arg(node, 1, "output_size"), n)
        if size is None or any(isinstance(s, fx.Node) for s in size):
            return None
        return n, kind, size
    return None


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


def permuted_dims(desc: Desc | None) -> bool:
    """True if a spatial dim of a map sits elsewhere than at position ``2 + k`` (NHWC, H/W swapped)."""
    return desc is not None and any(
        isinstance(e, Spatial) and e.k != i - 2 for i, e in enumerate(desc))


def dim_labels(desc: Desc, ndim: int) -> tuple[str, ...] | None:
    """``('N', 'H', 'W', 'C')`` for the descriptor of a channels-last map; None if unreadable."""
    names = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}[ndim]
    labels = []
    for i, e in enumerate(desc):
        if isinstance(e, Spatial):
            labels.append(names[e.k])
        elif e is None:
            labels.append("N" if i == 0 else "C")
        else:
            return None
    if sorted(labels) != sorted(("N", "C", *names)):
        return None
    return tuple(labels)


def spatial_descriptors(gm: fx.GraphModule, shapes: dict[fx.Node, NodeValue], ndim: int,
                        flatten_points: set[fx.Node] | None = None) -> Descriptors:
    """Per node and per dim, how the size depends on the input's spatial size (see module doc).

    Args:
        gm: the traced graph.
        shapes: the node shapes at the training input, from :func:`record_shapes`.
        ndim: number of spatial dims of the input.
        flatten_points: nodes that flatten a map into ``(N, features)``; their output is marked
            ``FLAT`` rather than ``UNKNOWN``.
    """
    flatten_points = flatten_points or set()
    out: dict[fx.Node, Desc | list[Desc] | None] = {}
    pads: list[fx.Node] = []
    unknown: list[fx.Node] = []
    linear_on_space: list[fx.Node] = []
    seen_input = False

    def primary(node: fx.Node) -> tuple[fx.Node | None, Shape | None, Desc | None]:
        """The input that best explains the output: same shape and varying with the input size,
        else same shape, else varying, else the first tensor."""
        shape = shapes.get(node)
        best: tuple[fx.Node | None, Shape | None, Desc | None] = (None, None, None)
        best_rank = -1
        for i in data_inputs(node):
            s, d = shapes.get(i), out.get(i)
            if not isinstance(s, tuple) or not isinstance(d, tuple):
                continue
            rank = 2 * (s == shape) + depends_on_input_size(d)
            if rank > best_rank:
                best, best_rank = (i, s, d), rank
        return best

    def merged(node: fx.Node, shape: Shape, base: Desc) -> Desc:
        """Inherit ``base``, filling constant dims from other same-shaped inputs that vary."""
        entries = list(base)
        for i in data_inputs(node):
            s, d = shapes.get(i), out.get(i)
            if s == shape and isinstance(d, tuple):
                for j, e in enumerate(d):
                    if entries[j] is None and e is not None:
                        entries[j] = e
        return tuple(entries)

    def generic(node: fx.Node, shape: Shape) -> Desc:
        src, src_shape, src_desc = primary(node)
        if src is None or src_shape is None or src_desc is None:
            return (None,) * len(shape)
        if src_shape == shape:
            return merged(node, shape, src_desc)
        if len(src_shape) == len(shape):
            entries: list[Entry] = []
            for a, b, e in zip(src_shape, shape, src_desc):
                if a == b or e is None or e is FLAT:
                    entries.append(e if a == b else None)
                else:
                    entries.append(UNKNOWN)
            return tuple(entries)
        return _align(src_shape, shape, src_desc)

    for node in gm.graph.nodes:
        shape = shapes.get(node)
        if node.op == "output":
            continue
        if node.op == "placeholder":
            if isinstance(shape, tuple) and not seen_input:
                seen_input = True
                out[node] = (None, None, *(Spatial(k, 1, 0) for k in range(ndim)))
            elif isinstance(shape, tuple):
                out[node] = (None,) * len(shape)
            continue
        if isinstance(shape, list):  # chunk, split, unbind: one descriptor per element
            src, src_shape, src_desc = primary(node)
            descs: list[Desc] = []
            for s in shape:
                if s is None:
                    continue
                if src_shape is not None and src_desc is not None and len(s) == len(src_shape):
                    descs.append(tuple(
                        e if a == b or e is None or e is FLAT else UNKNOWN
                        for a, b, e in zip(src_shape, s, src_desc)
                    ))
                else:
                    descs.append((UNKNOWN,) * len(s))
            out[node] = descs
            continue
        if not isinstance(shape, tuple):
            out[node] = None
            continue
        if node.op == "get_attr":
            out[node] = (None,) * len(shape)
            continue
        if node.op == "call_function" and node.target is operator.getitem:
            container = node.args[0]
            cdesc = out.get(container) if isinstance(container, fx.Node) else None
            if isinstance(cdesc, list) and isinstance(node.args[1], int):
                out[node] = cdesc[node.args[1]]
                continue
        if node in flatten_points:
            out[node] = (None, FLAT)
            continue
        sliding = sliding_op_of(node, gm, shapes)
        if sliding is not None:
            n, op = sliding
            src, src_shape, src_desc = primary(node)
            if op is None or src_desc is None or len(src_desc) != n + 2:
                unknown.append(node)
                out[node] = (None, None, *(UNKNOWN,) * (len(shape) - 2))
                continue
            entries = list(src_desc[:2])
            padding = op.padding
            for i in range(n):
                p = padding if isinstance(padding, str) else padding[i]
                e = src_desc[2 + i]
                pads_here = op.ceil_mode or (p == "same" and op.kernel[i] > 1) or (
                    not isinstance(p, str) and p > 0)
                if isinstance(e, Spatial) and pads_here:
                    pads.append(node)
                entries.append(_slide(e, op.kernel[i], op.stride[i], p, op.dilation[i], op.ceil_mode))
            entries[1] = None  # channels
            out[node] = tuple(entries)
            continue
        adaptive = adaptive_output_size(node, gm)
        if adaptive is not None:
            src, src_shape, src_desc = primary(node)
            n, _, size = adaptive
            if src_desc is not None and len(src_desc) == n + 2:
                out[node] = (*src_desc[:2], *(src_desc[2 + i] if size[i] is None else None
                                              for i in range(n)))
                continue
        reduction = reduction_of(node)
        if reduction is not None:
            src, src_shape, src_desc = primary(node)
            if src_desc is not None:
                rank = len(src_desc)
                reduced = {d % rank for d in reduction[1]}
                if reduction[2]:
                    out[node] = tuple(None if i in reduced else e for i, e in enumerate(src_desc))
                else:
                    out[node] = tuple(e for i, e in enumerate(src_desc) if i not in reduced)
                continue
        if node.op == "call_function" and node.target is F.pad:
            src, src_shape, src_desc = primary(node)
            pad = arg(node, 1, "pad")
            if src_desc is not None and isinstance(pad, (tuple, list)) and all(
                    isinstance(p, int) for p in pad):
                entries = list(src_desc)
                for j in range(len(pad) // 2):
                    dim = len(entries) - 1 - j
                    e = entries[dim]
                    total = pad[2 * j] + pad[2 * j + 1]
                    if isinstance(e, Spatial) and total:
                        entries[dim] = Spatial(e.k, e.T, e.C + total * e.T)
                        pads.append(node)
                out[node] = tuple(entries)
                continue
        src, src_shape, src_desc = primary(node)
        perm = permutation_of(node, len(src_desc)) if src_desc is not None else None
        if perm is not None and src_desc is not None:
            out[node] = tuple(src_desc[d] for d in perm)
            continue
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Linear):
            src, src_shape, src_desc = primary(node)
            if src_desc is not None and src_desc:
                last = src_desc[-1]
                if isinstance(last, Spatial) or last is UNKNOWN:
                    linear_on_space.append(node)
                    out[node] = (*src_desc[:-1], UNKNOWN)
                else:
                    out[node] = (*src_desc[:-1], None)
                continue
        desc = generic(node, shape)
        src, src_shape, src_desc = primary(node)
        if UNKNOWN in desc and not (src_desc is not None and UNKNOWN in src_desc):
            unknown.append(node)
        out[node] = desc
    result = Descriptors(out, pads, unknown, linear_on_space)
    for node, d in out.items():
        if isinstance(d, tuple) and not depends_on_input_size(d) and any(
                depends_on_input_size(out.get(i)) for i in data_inputs(node)):
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


def first_tensor_output(gm: fx.GraphModule) -> fx.Node | None:
    """The node returned by the graph, or the first node of a returned tuple, list or dict."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = output.args[0]
    while isinstance(value, (tuple, list, dict)) and value:
        value = next(iter(value.values())) if isinstance(value, dict) else value[0]
    return value if isinstance(value, fx.Node) else None

