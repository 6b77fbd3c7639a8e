"""Row streaming of a converted model's graph: each node keeps only the rows its consumers still need.

The rows are those of the first spatial dim. The graph runs once on fake tensors at the block's size
(``fcconv.models.receptive``), which gives every tensor node its row geometry: row ``j`` of the node
depends on input rows ``[offset + stride*j, ... + extent)``. A node with one tensor input ``I`` then
needs, for its row ``j``, the rows ``[j*s - p, j*s - p + k)`` of ``I`` with

    s = stride_N / stride_I,  p = (offset_I - offset_N) / stride_I,  k = (extent_N - extent_I) / stride_I + 1.

Every op is called as it is (its own padding, ``ceil_mode``, ``F.pad`` amounts fixed at the block's
size) on a band of its input rows ``[a, e)`` with ``a`` a multiple of ``s``: band output ``j'`` is row
``j' + a/s``, and the outputs whose window reaches the band's own padding (past its top unless ``a``
is the image's top, past its bottom unless ``e`` is the image's bottom) are dropped. Convolutions and
pools of ``torch.nn`` are called with no row padding inside the image, so each of their rows is
computed once. An op of several tensor inputs (add, mul, cat over channels) makes row ``j`` from row
``j`` of each, once every input has it. Values that are not maps of the image (sizes, ``F.pad``
amounts computed from ``x.size()``, parameters) keep the values of the whole block.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from fcconv.errors import FcconvError

__all__ = ["GraphRows", "NotStreamable", "RowBuffer", "graph_rows", "stream_block"]


class NotStreamable(FcconvError):
    """The executor cannot stream this graph (the reason names the node); halo tiles still can."""


@dataclass(frozen=True)
class Step:
    """One node of the graph as the executor runs it.

    Attributes:
        node: the fx node.
        dim: the dim of its output that runs along the image's rows.
        size: rows of its output at the block's size.
        inputs: its tensor (map) inputs.
        stride, pad, kernel: for one input, row ``j`` needs input rows ``[j*stride - pad, + kernel)``.
        zipped: several inputs, row ``j`` from row ``j`` of each.
        inplace: the op writes into its (first) input, which must then be a copy.
        fast: the op with no row padding, for bands inside the image (each row computed once).
        call: the op with its padding fixed at the block's size (for ops that pad from their input's).
    """

    node: fx.Node
    dim: int
    size: int
    inputs: tuple[fx.Node, ...]
    stride: int = 1
    pad: int = 0
    kernel: int = 1
    zipped: bool = False
    inplace: bool = False
    fast: Callable[[Tensor], Tensor] | None = None
    call: Callable[[Tensor], Tensor] | None = None


@dataclass
class GraphRows:
    """The row plan of a graph at one block size: its steps in order and the values of the rest."""

    gm: fx.GraphModule
    source: fx.Node
    source_dim: int
    source_size: int
    steps: list[Step]
    result: fx.Node
    values: dict[fx.Node, Any]
    consumers: dict[fx.Node, list[Step]]
    rows: dict[fx.Node, tuple[int, int]]  # per tensor node: its rows and the bytes of one row

    @property
    def result_step(self) -> Step:
        return self.steps[-1]


class RowBuffer:
    """The rows ``[lo, hi)`` of one node's output (along ``dim``) that are kept."""

    def __init__(self, dim: int) -> None:
        self.dim, self.lo, self.hi = dim, 0, 0
        self.data: Tensor | None = None

    def push(self, values: Tensor) -> None:
        """Append the next rows."""
        n = values.shape[self.dim]
        if self.data is None or self.data.shape[self.dim] == 0:
            self.data = values
        elif n:
            self.data = torch.cat([self.data, values], self.dim)
        self.hi += n

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` (a view)."""
        if self.data is None or start < self.lo or stop > self.hi:
            raise FcconvError(f"rows [{start}, {stop}) asked of a buffer holding [{self.lo}, {self.hi}); "
                              "this is a bug in fcconv's row streaming, please report it.")
        return self.data.narrow(self.dim, start - self.lo, stop - start)

    def drop_before(self, start: int) -> int:
        """Forget the rows before ``start`` (their memory too: the rows kept are copied); returns the
        bytes freed."""
        start = min(max(start, self.lo), self.hi)
        if start <= self.lo or self.data is None:
            return 0
        before = self.nbytes
        kept = self.data.narrow(self.dim, start - self.lo, self.hi - start)
        self.data = kept.clone() if self.hi > start else None
        self.lo = start
        return before - self.nbytes

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


# ----------------------------------------------------------------------------------------------
# The plan: descriptors and values from one fake run at the block's size


def _recorded_run(gm: fx.GraphModule, shape: tuple[int, ...]) -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fcconv.models.receptive import _Prover

    class Recorder(_Prover):
        def __init__(self, module: fx.GraphModule) -> None:
            super().__init__(module)
            self.values: dict[fx.Node, Any] = {}

        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            self.values[n] = value
            return value

    param = next((p for p in gm.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    device = param.device if param is not None else torch.device("cpu")
    recorder = Recorder(gm)
    saved = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            recorder.run(torch.empty(1, *shape, dtype=dtype, device=device))
    except Exception as e:
        raise NotStreamable(f"the graph does not run on fake tensors ({type(e).__name__}: {e})") from None
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    return recorder


def _is_fake(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, FakeTensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_is_fake(v) for v in value)
    if isinstance(value, dict):
        return any(_is_fake(v) for v in value.values())
    return False


def _row_axis(desc: Any, node: fx.Node) -> tuple[int, Any]:
    from fcconv.models._descriptors import Map

    if not isinstance(desc, Map):
        raise NotStreamable(f"node {node.name!r} returns several maps or a value that is not a map")
    found = [(i, a) for i, a in enumerate(desc.dims) if a is not None and a.axis == 0]
    if len(found) != 1:
        raise NotStreamable(f"node {node.name!r} has no single dim along the image's rows")
    return found[0]


def _what(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    return str(getattr(node.target, "__name__", node.target))


def _inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    name = str(getattr(node.target, "__name__", node.target))
    return bool(node.kwargs.get("inplace")) or (name.endswith("_") and not name.endswith("__")) or (
        name.startswith("i") and getattr(operator, name, None) is node.target)


def _ints(value: Any, n: int) -> tuple[int, ...] | None:
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return tuple(value) * n if len(value) == 1 else tuple(value)
    return None


def _fast(module: nn.Module, n: int) -> Callable[[Tensor], Tensor] | None:
    """The module's op with no padding along the rows (dim 2), or None where that is not known."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and type(module).forward in (
            nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
        pads = _ints(module.padding, n)
        if module.padding_mode != "zeros" or pads is None or len(pads) != n:
            return None
        conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
        padding = (0, *pads[1:])
        return lambda x: conv(x, module.weight, module.bias, module.stride, padding, module.dilation,
                              module.groups)
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and type(module).forward in (
            nn.MaxPool1d.forward, nn.MaxPool2d.forward, nn.MaxPool3d.forward) and not module.return_indices:
        pads = _ints(module.padding, n)
        if pads is None or len(pads) != n:
            return None
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
        stride = module.stride if module.stride is not None else module.kernel_size
        rest = (0, *pads[1:])
        return lambda x: pool(x, module.kernel_size, stride, rest, module.dilation,
                              ceil_mode=module.ceil_mode)
    if isinstance(module, (nn.AvgPool2d, nn.AvgPool3d)) and type(module).forward in (
            nn.AvgPool2d.forward, nn.AvgPool3d.forward):
        pads = _ints(module.padding, n)
        if pads is None or len(pads) != n:
            return None
        avg = F.avg_pool2d if n == 2 else F.avg_pool3d
        stride = module.stride if module.stride is not None else module.kernel_size
        zero = (0, *pads[1:])
        return lambda x: avg(x, module.kernel_size, stride, zero, module.ceil_mode,
                             module.count_include_pad, module.divisor_override)
    return None


def _same_padded(module: Any, x: Any) -> Callable[[Tensor], Tensor] | None:
    """timm's ``Conv2dSame``, ``MaxPool2dSame``, ``AvgPool2dSame`` with the TF-"same" padding of the
    whole block ``x`` (they compute it from the size of what they are given, which a band is not)."""
    from fcconv.models._descriptors import same_pads

    name = type(module).__name__
    n = x.dim() - 2
    if name == "Conv2dSame" and isinstance(module, nn.Conv2d):
        k, s, d = tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)
        flat = [p for pair in reversed(same_pads(x, k, s, d)) for p in pair]
        pad = module.padding if isinstance(module.padding, tuple) else 0
        return lambda b: F.conv2d(F.pad(b, flat), module.weight, module.bias, module.stride, pad,
                                  module.dilation, module.groups)
    if name in ("MaxPool2dSame", "AvgPool2dSame"):
        k = tuple(_ints(module.kernel_size, n) or ())
        s = tuple(_ints(module.stride or module.kernel_size, n) or ())
        d = tuple(_ints(getattr(module, "dilation", 1), n) or ())
        flat = [p for pair in reversed(same_pads(x, k, s, d)) for p in pair]
        if name == "MaxPool2dSame":
            return lambda b: F.max_pool2d(F.pad(b, flat, value=-float("inf")), k, s, module.padding, d,
                                          module.ceil_mode)
        return lambda b: F.avg_pool2d(F.pad(b, flat), k, s, module.padding, module.ceil_mode,
                                      module.count_include_pad)
    return None


def _exact_div(a: int, b: int, node: fx.Node, what: str) -> int:
    if b <= 0 or a % b:
        raise NotStreamable(f"node {node.name!r}: its {what} is not a whole number of its input's rows")
    return a // b


def _step(node: fx.Node, gm: fx.GraphModule, rec: Any, axes: dict[fx.Node, Any]) -> Step:
    dim, axis = axes[node]
    size = int(rec.values[node].shape[dim])
    inputs = tuple(i for i in node.all_input_nodes if i in axes)
    inplace = _inplace(node, gm)
    if len(inputs) > 1:
        for i in inputs:
            d, a = axes[i]
            if a.stride != axis.stride or int(rec.values[i].shape[d]) != size:
                raise NotStreamable(f"node {node.name!r} ({_what(node, gm)}) combines maps of different "
                                    "rows (a concat along the rows, or different strides)")
        return Step(node, dim, size, inputs, zipped=True, inplace=inplace)
    (source,) = inputs
    a_in = axes[source][1]
    stride = _exact_div(axis.stride, a_in.stride, node, "stride")
    pad = _exact_div(a_in.offset - axis.offset, a_in.stride, node, "padding")
    kernel = _exact_div(axis.extent - a_in.extent, a_in.stride, node, "kernel") + 1
    fast = None
    if node.op == "call_module" and axes[source][0] == 2 and dim == 2:
        n = rec.values[node].dim() - 2
        fast = _fast(gm.get_submodule(str(node.target)), n)
    call = None
    if node in rec.sized and node.op == "call_module":
        call = _same_padded(gm.get_submodule(str(node.target)), rec.values[source])
        if call is None:
            raise NotStreamable(f"node {node.name!r} ({_what(node, gm)}) pads from the size of what it is "
                                "given, which a band of rows is not")
    return Step(node, dim, size, inputs, stride, pad, kernel, inplace=inplace, fast=fast, call=call)


def graph_rows(gm: fx.GraphModule, shape: tuple[int, ...]) -> GraphRows:
    """The row plan of ``gm`` on a block of per-sample shape ``shape`` ``(C, *spatial)``.

    Raises:
        NotStreamable: where an op cannot be streamed (the message names the node); such a model
            still tiles with halo tiles.
    """
    from fcconv.models._descriptors import Map
    from fcconv.models.receptive import _ancestors, _first_node

    rec = _recorded_run(gm, shape)
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    result = _first_node(out.args) if out is not None else None
    if result is None:
        raise NotStreamable("the graph returns no tensor")
    needed = _ancestors(result)
    order = [n for n in gm.graph.nodes if n in needed]
    source = next(n for n in order if n.op == "placeholder")
    axes: dict[fx.Node, Any] = {}
    values: dict[fx.Node, Any] = {}
    steps: list[Step] = []
    for node in order:
        desc = rec.descs[node]
        if node is source:
            axes[node] = _row_axis(desc, node)
        elif isinstance(desc, Map) or (isinstance(desc, list) and any(isinstance(d, Map) for d in desc)):
            axes[node] = _row_axis(desc, node)
            steps.append(_step(node, gm, rec, axes))
        elif not _is_fake(rec.values[node]):
            values[node] = rec.values[node]
        elif node.op != "placeholder" and not any(i in axes for i in node.all_input_nodes):
            values[node] = _run_node(gm, node, fx.node.map_arg((node.args, node.kwargs), values.__getitem__))
        else:
            raise NotStreamable(f"node {node.name!r} ({_what(node, gm)}) computes a tensor from the "
                                "input's size")
    if not steps or steps[-1].node is not result:
        raise NotStreamable("the graph's output is not a map computed from the image")
    consumers: dict[fx.Node, list[Step]] = {n: [] for n in axes}
    for s in steps:
        for i in s.inputs:
            consumers[i].append(s)
    dim = axes[source][0]
    rows = {n: _row_bytes(rec.values[n], d) for n, (d, _) in axes.items()}
    return GraphRows(gm, source, dim, int(rec.values[source].shape[dim]), steps, result, values, consumers,
                     rows)


def _row_bytes(value: Tensor, dim: int) -> tuple[int, int]:
    size = int(value.shape[dim])
    return size, value.numel() // max(1, size) * value.element_size()


def _run_node(gm: fx.GraphModule, node: fx.Node, arguments: Any) -> Any:
    args, kwargs = arguments
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    if node.op == "get_attr":
        target: Any = gm
        for part in str(node.target).split("."):
            target = getattr(target, part)
        return target
    raise NotStreamable(f"node {node.name!r} ({node.op}) cannot be evaluated")


_CACHE: weakref.WeakKeyDictionary[fx.GraphModule, dict[tuple[int, ...], GraphRows]] = (
    weakref.WeakKeyDictionary())


def cached_graph_rows(gm: fx.GraphModule, shape: tuple[int, ...]) -> GraphRows:
    """:func:`graph_rows`, computed once per graph and block shape in a process."""
    per_shape = _CACHE.setdefault(gm, {})
    if shape not in per_shape:
        if len(per_shape) > 16:
            per_shape.clear()
        per_shape[shape] = graph_rows(gm, shape)
    return per_shape[shape]


# ----------------------------------------------------------------------------------------------
# The run


class _Run:
    """The buffers of one streamed block, and the steps that fill them."""

    def __init__(self, plan: GraphRows) -> None:
        self.plan = plan
        self.buffers = {plan.source: RowBuffer(plan.source_dim)}
        self.sizes = {plan.source: plan.source_size}
        for s in plan.steps:
            self.buffers[s.node] = RowBuffer(s.dim)
            self.sizes[s.node] = s.size
        self.peak = self.total = 0
        self.last_use: dict[fx.Node, int] = {}
        for index, s in enumerate(plan.steps):
            for i in s.inputs:
                self.last_use[i] = index

    def complete(self, node: fx.Node) -> bool:
        return self.buffers[node].hi >= self.sizes[node]

    def advance(self, step: Step) -> None:
        out = self.buffers[step.node]
        j0 = out.hi
        if j0 >= step.size:
            return
        values = self._zipped(step, j0) if step.zipped else self._slid(step, j0)
        if values is not None:
            out.push(values)

    def _call(self, step: Step, bands: dict[fx.Node, Tensor]) -> Tensor:
        node = step.node
        if step.inplace:
            bands = {k: v.clone() for k, v in bands.items()}
        if step.call is not None:
            return step.call(bands[step.inputs[0]])

        def value(n: fx.Node) -> Any:
            return bands[n] if n in bands else self.plan.values[n]

        try:
            result = _run_node(self.plan.gm, node, fx.node.map_arg((node.args, node.kwargs), value))
        except RuntimeError as error:  # e.g. a reshape to sizes read from the whole block
            raise NotStreamable(f"node {node.name!r} ({_what(node, self.plan.gm)}) fails on a band of rows "
                                f"({error}); map this model with method='tiles' (--method tiles)") from None
        if not isinstance(result, Tensor):
            raise NotStreamable(f"node {node.name!r} did not return a tensor on a band of rows")
        return result

    def _zipped(self, step: Step, j0: int) -> Tensor | None:
        stop = min(step.size, *(self.buffers[i].hi for i in step.inputs))
        if stop <= j0:
            return None
        result = self._call(step, {i: self.buffers[i].rows(j0, stop) for i in step.inputs})
        return _rows_of(result, step, 0, stop - j0)

    def _slid(self, step: Step, j0: int) -> Tensor | None:
        (source,) = step.inputs
        have, size_in = self.buffers[source], self.sizes[source]
        s, p, k = step.stride, step.pad, step.kernel
        done = self.complete(source)
        stop = step.size if done else min(step.size, (have.hi + p - k) // s + 1)
        if stop <= j0:
            return None
        first, end = j0 * s - p, (stop - 1) * s - p + k
        if step.fast is not None and first > 0 and end <= size_in:
            return _rows_of(step.fast(have.rows(first, end)), step, 0, stop - j0)
        a = 0 if first <= 0 else first // s * s
        e = size_in if done else end
        if e <= a:  # the rows wanted so far read only the padding above the image: wait for one row
            return None
        result = self._call(step, {source: have.rows(a, e)})
        return _rows_of(result, step, j0 - a // s, stop - j0)

    def needed(self, node: fx.Node) -> int:
        """The first row of ``node`` that a consumer will still read."""
        buffer = self.buffers[node]
        need = buffer.hi
        for c in self.plan.consumers[node]:
            j = self.buffers[c.node].hi
            if j >= c.size:
                continue
            if c.zipped:
                need = min(need, j)
            else:
                first = j * c.stride - c.pad
                need = min(need, 0 if first <= 0 else first // c.stride * c.stride)
        return need

    def step(self, index: int, step: Step) -> None:
        """Run one step, then forget the rows of its inputs that no later consumer reads."""
        out = self.buffers[step.node]
        before = out.nbytes
        self.advance(step)
        self.total += out.nbytes - before
        self.peak = max(self.peak, self.total)
        for i in step.inputs:
            if self.last_use[i] == index:
                self.total -= self.buffers[i].drop_before(self.needed(i))

    def emit(self, start: int) -> None:
        self.total -= self.buffers[self.plan.result].drop_before(start)


def _rows_of(result: Tensor, step: Step, start: int, n: int) -> Tensor:
    if result.shape[step.dim] < start + n:
        raise NotStreamable(
            f"node {step.node.name!r} gave {result.shape[step.dim]} rows on a band where {start + n} were "
            "expected: its rows are not those of a sliding window")
    return result.narrow(step.dim, start, n)


@dataclass
class StreamStats:
    """What a streamed block measured: the most bytes its row buffers held at once."""

    peak_bytes: int = 0


def stream_block(plan: GraphRows, read: Callable[[int, int], Tensor], band: int,
                 stats: StreamStats | None = None) -> Iterator[tuple[int, Tensor]]:
    """Stream one block through the graph, ``band`` input rows at a time.

    Args:
        plan: the block's :class:`GraphRows`.
        read: ``read(r0, r1)`` returns the block's input rows ``[r0, r1)`` as ``(1, C, r1 - r0, ...)``
            tensors of the model's dtype and device.
        band: input rows read per step.
        stats: filled with the peak bytes of the row buffers.

    Yields:
        ``(j0, rows)``: the output's rows ``[j0, j0 + n)`` (along its row dim) as they are finished.
    """
    run = _Run(plan)
    source = run.buffers[plan.source]
    result = run.buffers[plan.result]
    emitted = 0
    while not run.complete(plan.result):
        pushed = source.nbytes
        if source.hi < plan.source_size:
            source.push(read(source.hi, min(plan.source_size, source.hi + band)))
            run.total += source.nbytes - pushed
        elif result.hi == emitted:
            raise NotStreamable("the stream stalled before the last row; this is a bug in fcconv")
        for index, step in enumerate(plan.steps):
            run.step(index, step)
        if stats is not None:
            stats.peak_bytes = run.peak
        if result.hi > emitted:
            yield emitted, result.rows(emitted, result.hi)
            run.emit(result.hi)
            emitted = result.hi
