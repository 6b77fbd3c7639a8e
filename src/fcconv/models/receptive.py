"""The geometry of a traced network, proven op by op: receptive field, locality and exactness.

The graph runs once on fake tensors at one input size, so every call sees its concrete arguments
(TF-"same" padding computed from ``x.size()`` included). Each tensor gets a descriptor: for each of
its dims, either nothing spatial (batch, channels) or the input axis it runs along with an affine
``(stride, offset, extent)``: index ``j`` depends on input ``[offset + stride*j, ... + extent)``.
Only ops on an allow-list of local, translation-equivariant ops keep the descriptor; the first
other op (and the first op that pads) is named.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from fcconv._shapes import check_input_shape, format_shape
from fcconv.errors import FcconvError
from fcconv.models._allowlist import METHOD_RULES, function_rule, module_rule
from fcconv.models._descriptors import CONST, GLOBAL, SIZE, Axis, Call, Desc, Map, NotLocal, merged

__all__ = ["Analysis", "ReceptiveField", "analyze"]


@dataclass(frozen=True)
class ReceptiveField:
    """The input region one output cell depends on, per spatial dim.

    Cell ``j`` depends on input ``[offset + stride*j, offset + stride*j + extent)`` along each dim:
    the box contains the support of the gradient of the cell with respect to the input, and
    equals its bounding box where it lies inside the image. At the borders, clipped to the image,
    it can be larger: an inner layer's padding reads nothing (a tap of a padded layer that falls
    on padding reaches no pixel). With reflect or replicate padding, border cells also read the
    mirrored or edge pixels, which the box of such a cell may not contain; tiling stays exact
    (``Analysis.local``), as tiles that touch the image border see the same border.

    Attributes:
        stride: input pixels between neighbouring output cells.
        offset: input coordinate of the first pixel cell 0 depends on (negative with padding).
        extent: input pixels one cell depends on.
    """

    stride: tuple[int, ...]
    offset: tuple[int, ...]
    extent: tuple[int, ...]

    def box(self, cell: Any) -> tuple[int, ...]:
        """``(*starts, *ends)`` of the input box cell ``cell`` depends on, half-open; it may extend
        past the image. ``cell`` holds ints, numpy ints or 0-d integer tensors.

        Example:
            >>> top, left, bottom, right = analyze(gm, (3, 320, 320)).field.box((2, 3))
        """
        ndim = len(self.stride)
        try:
            if isinstance(cell, (str, bytes)):
                raise TypeError
            try:
                index: tuple[int, ...] = (operator.index(cell),)
            except TypeError:
                index = tuple(operator.index(c) for c in cell)
        except TypeError:
            raise FcconvError(f"cell must be {ndim} integer(s), one per spatial dim; got {cell!r}.") from None
        if len(index) != ndim or any(i < 0 for i in index):
            raise FcconvError(
                f"cell must be {ndim} non-negative integer(s), one per spatial dim; got {cell!r}."
            )
        starts = tuple(o + s * i for o, s, i in zip(self.offset, self.stride, index))
        return starts + tuple(a + e for a, e in zip(starts, self.extent))


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyze` proved about a graph at one input size.

    Attributes:
        field: the receptive field of an output cell; None if some op between input and output
            is not a sliding op (or the output is not an ``(N, C, *spatial)`` map).
        local: every op is proven local and translation-equivariant (padding allowed): tiles
            aligned to the stride, read with a halo covering the field, reproduce the untiled map.
        why_not_local: the first node that breaks locality, and why.
        exact_sliding_window: local and nothing pads, so each cell equals the model on its crop.
        why_not_exact: the first node that breaks exactness, and why.
        size_dependent: padding amounts (hence possibly the field) depend on the input size.
    """

    field: ReceptiveField | None
    local: bool
    why_not_local: str | None
    exact_sliding_window: bool
    why_not_exact: str | None
    size_dependent: bool


# ----------------------------------------------------------------------------------------------
# The run


def _what(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


class _Prover(fx.Interpreter):
    """Runs the graph and keeps, per node, its descriptor and what it breaks."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.descs: dict[fx.Node, Desc] = {}
        self.not_local: dict[fx.Node, str] = {}
        self.not_exact: dict[fx.Node, str] = {}
        self.sized: set[fx.Node] = set()
        self._seen_input = False

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.descs[n] = self._describe(n, value)
        return value

    def _describe(self, n: fx.Node, value: Any) -> Desc:
        if n.op == "placeholder":
            if self._seen_input or not isinstance(value, Tensor):
                return CONST
            self._seen_input = True
            return Map((None, None) + tuple(Axis(i, 1, 0, 1) for i in range(value.dim() - 2)))
        if n.op in ("get_attr", "output"):
            return CONST
        if n.target is operator.getitem and isinstance(n.args[0], fx.Node) and isinstance(
                self.descs[n.args[0]], list):  # an element of a shape, or one chunk
            args, _ = self.fetch_args_kwargs_from_env(n)
            return self.descs[n.args[0]][args[1]]
        found = [merged(self.descs[i]) for i in n.all_input_nodes]
        if any(d is GLOBAL for d in found):
            return GLOBAL
        if not any(isinstance(d, (Map, list)) for d in found):
            return SIZE if any(d is SIZE for d in found) else CONST
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.module.get_submodule(str(n.target)) if n.op == "call_module" else None
        rule = self._rule(n, module)
        call = Call(n, args, kwargs, value, self.descs, module)
        try:
            if rule is None:
                raise NotLocal("is not on the allow-list of ops known to be local")
            desc = rule(call)
        except NotLocal as e:
            self.not_local[n] = e.why
            desc = e.keep
        if call.pads:
            self.not_exact[n] = call.pads
        if call.sized:
            self.sized.add(n)
        return desc

    def _rule(self, n: fx.Node, module: nn.Module | None) -> Callable[[Call], Desc] | None:
        if module is not None:
            return module_rule(module)
        if n.op == "call_method":
            return METHOD_RULES.get(str(n.target))
        return function_rule(n.target)


def _run(gm: fx.GraphModule, shape: tuple[int, ...]) -> _Prover:
    """Run on fake tensors (no compute, no memory); on real zeros if the graph needs values.

    Buffers are restored afterwards: a module in training mode (BatchNorm's ``num_batches_tracked``)
    must not change because it was analyzed.
    """
    saved = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        return _run_once(gm, shape)
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _run_once(gm: fx.GraphModule, shape: tuple[int, ...]) -> _Prover:
    from torch._subclasses.fake_tensor import FakeTensorMode

    param = next((p for p in gm.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    device = param.device if param is not None else torch.device("cpu")
    prover = _Prover(gm)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            prover.run(torch.empty(1, *shape, dtype=dtype, device=device))
        return prover
    except Exception:  # data-dependent control flow or an op without a fake kernel
        prover = _Prover(gm)
    try:
        with torch.no_grad():
            prover.run(torch.zeros(1, *shape, dtype=dtype, device=device))
    except Exception as e:
        raise FcconvError(
            f"Cannot analyze the graph at input shape {format_shape(shape)}: running it failed with "
            f"{type(e).__name__}: {e}. Pass a shape the model accepts."
        ) from None
    return prover


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _field(desc: Desc, ndim: int) -> ReceptiveField | None:
    if not isinstance(desc, Map):
        return None
    axes = [e for e in desc.dims if e is not None]
    if len(desc.dims) != ndim + 2 or desc.dims[:2] != (None, None) or [a.axis for a in axes] != list(
            range(ndim)):
        return None
    return ReceptiveField(tuple(a.stride for a in axes), tuple(a.offset for a in axes),
                          tuple(a.extent for a in axes))


def analyze(gm: fx.GraphModule, input_shape: Sequence[int]) -> Analysis:
    """Prove the geometry of ``gm`` (a traced or converted model) at one input size.

    Args:
        gm: the graph, e.g. ``convolutionalize(model, shape).graph_module``.
        input_shape: per-sample ``(C, *spatial)`` of the image at which to evaluate the geometry.

    Returns:
        An :class:`Analysis`: the receptive field of an output cell, whether tiling is exact
        (``local``), whether each cell is the model on its crop (``exact_sliding_window``), each
        with the first node that breaks it.

    Raises:
        FcconvError: on a malformed ``input_shape`` or a graph that fails to run at it.

    Example:
        >>> a = analyze(convolutionalize(resnet18().eval(), (3, 224, 224)).graph_module, (3, 320, 320))
        >>> a.local, a.exact_sliding_window, a.field.box((0, 0))
    """
    shape = check_input_shape(input_shape)
    prover = _run(gm, shape)
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    result = _first_node(out.args) if out is not None else None
    if result is None:
        raise FcconvError("Cannot analyze a graph that returns no tensor computed from its input.")
    order = [n for n in gm.graph.nodes if n in _ancestors(result)]
    field = _field(prover.descs[result], len(shape) - 1)
    why_local = next((_reason(n, gm, prover.not_local[n]) for n in order if n in prover.not_local), None)
    if why_local is None and field is None:
        why_local = f"the output {_what(result, gm)} is not an (N, C, *spatial) map of the input"
    breaks = {**prover.not_exact, **prover.not_local}
    why_exact = next((_reason(n, gm, breaks[n]) for n in order if n in breaks), why_local)
    return Analysis(
        field=field, local=why_local is None, why_not_local=why_local,
        exact_sliding_window=why_exact is None, why_not_exact=why_exact,
        size_dependent=any(n in prover.sized for n in order),
    )


def _first_node(args: Any) -> fx.Node | None:
    if isinstance(args, fx.Node):
        return args
    if isinstance(args, (list, tuple)):
        return next((f for f in map(_first_node, args) if f is not None), None)
    if isinstance(args, dict):
        return _first_node(list(args.values()))
    return None


def _reason(node: fx.Node, gm: fx.GraphModule, why: str) -> str:
    return f"node {node.name!r} ({_what(node, gm)}): {why}"
