"""Exact class activation maps: the affine head of a classifier moved before its global average pool.

When the head is ``global average pool -> affine maps`` (Linear layers, eval-mode BatchNorm,
dropout in eval mode, a per-class scale or bias, flattens; no non-linearity), the affine part ``A``
commutes with the mean: ``A(mean_p f_p) = mean_p A(f_p)``. ``A`` applied at each position ``p`` of
the last feature map is the class activation map, and its spatial mean is the model's logits,
exactly: the same function, checked in float64 with :func:`fcconv.compare`.

Before: ``features -> AdaptiveAvgPool2d(1) -> flatten -> Linear(512, 1000)``, logits ``(N, 1000)``.
After: ``features -> Linear(512, 1000) at each position``, scores ``(N, 1000, 7, 7)``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from fcconv._shapes import format_shape
from fcconv.certify import EquivalenceReport, compare
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.models.fcn import check_inference_mode
from fcconv.models.ops import adaptive_output_size, is_flatten_like, reduction_of
from fcconv.models.shapes import NodeFailure, NodeValue, node_failure, record_shapes
from fcconv.models.tracing import arg, describe, first_tensor_output, leaf_matchers, trace

__all__ = ["ClassActivationMap", "class_activation_map"]


@dataclass(frozen=True)
class ClassActivationMap:
    """Per-position class scores whose spatial mean is the model's logits.

    Attributes:
        scores: ``(N, classes, *grid)``: the head applied at each position of the last feature map.
        logits: ``(N, classes)``: the model's output on the same input.
        report: the float64 certificate that ``scores.mean(spatial) == logits``
            (:func:`fcconv.compare`); None when ``certify=False``.
        pool: the global average pool the head was moved before (a node, in words).
        head: the affine nodes moved before it, in order.
        image_size: the spatial size of the input.
    """

    scores: Tensor
    logits: Tensor
    report: EquivalenceReport | None
    pool: str
    head: tuple[str, ...]
    image_size: tuple[int, ...]

    def upsample(self, mode: str = "bilinear") -> Tensor:
        """The scores resized to the input image, ``(N, classes, *image_size)``, for drawing.

        Example:
            >>> overlay = cam.upsample()[0, cam.logits[0].argmax()]
        """
        linear = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(self.image_size)]
        mode = linear if mode == "bilinear" else mode
        corners = False if mode in ("linear", "bilinear", "trilinear", "bicubic") else None
        return F.interpolate(self.scores, size=self.image_size, mode=mode, align_corners=corners)


@dataclass(frozen=True)
class _Head:
    features: str   # the node whose positions are the map's cells
    pool: str       # the global average pool of it
    chain: tuple[str, ...]  # the affine nodes from the pool to the output
    sums: bool = False  # the pool is a sum: each position stands for the sum, count times itself


_AFFINE_MODULES = (nn.Identity, nn.Flatten, nn.modules.dropout._DropoutNd)
_AFFINE_FUNCTIONS = {F.linear, F.dropout, torch.flatten, torch.reshape, torch.squeeze, F.batch_norm}
_AFFINE_METHODS = {"flatten", "view", "reshape", "squeeze", "contiguous", "clone", "add", "sub",
                   "mul", "div"}
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
               torch.mul, torch.div, operator.iadd, operator.imul}
_NOT_FORM = (
    "A class activation map is exact only for a head that is a global average pool followed by "
    "affine maps (Linear, eval-mode BatchNorm, dropout in eval, a per-class scale or bias)"
)


def _tensor_inputs(node: fx.Node, shapes: dict[fx.Node, NodeValue], live: set[fx.Node]) -> list[fx.Node]:
    """The inputs of ``node`` that are tensors computed from the model's input."""
    return [i for i in dict.fromkeys(node.all_input_nodes) if i in live and isinstance(shapes.get(i), tuple)]


def _why_not_affine(node: fx.Node, gm: fx.GraphModule, shapes: dict[fx.Node, NodeValue],
                    src: fx.Node) -> str | None:
    """Why ``node`` is not an affine map of ``src`` sample by sample; None when it is."""
    src_shape = shapes.get(src)
    if is_flatten_like(node, gm) and isinstance(src_shape, tuple) and len(src_shape) > 2 and math.prod(
            src_shape[2:]) > 1:
        return (f"it flattens a {format_shape(src_shape[1:])} map into the head, so each position "
                "has its own weights and the scores are not a mean over positions")
    if node.op == "call_module":
        return _why_module_not_affine(gm.get_submodule(str(node.target)))
    if node.op == "call_method" and node.target in ("permute", "transpose", "swapaxes", "movedim"):
        dims = [d for d in node.args[1:] if isinstance(d, int)]
        flat = dims[0] if dims and isinstance(dims[0], (list, tuple)) else None
        keeps = (flat[0] == 0) if flat is not None else (
            dims[0] == 0 if node.target == "permute" else 0 not in dims and len(dims) == 2)
        return None if keeps else "it moves the batch dim"
    if node.op == "call_function" and node.target in (F.layer_norm, F.group_norm, F.normalize):
        return "it normalises each sample by its own statistics, which is not affine"
    if node.op == "call_function" and node.target in _ARITHMETIC or (
            node.op == "call_method" and node.target in ("add", "sub", "mul", "div")):
        if len(node.args) < 2 or all(isinstance(a, fx.Node) and a is src for a in node.args[:2]):
            return "it is not an affine map"
        divides = node.target in (operator.truediv, torch.div, "div")
        return "it divides by the features" if divides and node.args[1] is src else None
    if node.op == "call_function" and node.target is F.batch_norm:
        return None if arg(node, 5, "training", False) is False else "it normalises with batch statistics"
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1]
        first = index[0] if isinstance(index, tuple) and index else index
        return None if first == slice(None) else "it selects samples of the batch"
    if (node.op == "call_function" and node.target in _AFFINE_FUNCTIONS) or (
            node.op == "call_method" and node.target in _AFFINE_METHODS):
        return None
    return "it is not an affine map"


def _why_module_not_affine(module: nn.Module) -> str | None:
    """Why a module is not an affine map of each sample; None when it is."""
    if isinstance(module, nn.Linear):
        return None if type(module).forward is nn.Linear.forward else "its forward overrides nn.Linear's"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return None if not module.training and module.running_mean is not None else (
            "it normalises with batch statistics")
    if type(module).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
        conv: Any = module
        pointwise = all(k == 1 for k in conv.kernel_size) and not any(
            conv.padding if isinstance(conv.padding, tuple) else (1,))
        return None if pointwise else "it is not a 1x1 convolution without padding"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        return "it normalises each sample by its own statistics, which is not affine"
    return None if isinstance(module, _AFFINE_MODULES) else "it is not an affine map"


def _global_average(node: fx.Node, gm: fx.GraphModule, shapes: dict[fx.Node, NodeValue]) -> fx.Node | None:
    """The feature map that ``node`` averages over all its positions, or None."""
    src = node.all_input_nodes[0] if node.all_input_nodes else None
    src_shape = shapes.get(src) if src is not None else None
    out = shapes.get(node)
    if src is None or not isinstance(src_shape, tuple) or len(src_shape) < 3 or not isinstance(out, tuple):
        return None
    rank = len(src_shape)
    adaptive = adaptive_output_size(node, gm)
    reduced = reduction_of(node)
    if adaptive is not None:
        whole = adaptive[1] == "avg" and all(s in (1, None) for s in adaptive[2])
    elif reduced is not None:
        whole = reduced[0] == "avg" and {d % rank for d in reduced[1]} == set(range(2, rank))
    else:
        whole = _is_avg_pool(node, gm) and all(s == 1 for s in out[2:]) and _pools_everything(
            node, gm, shapes, src)
    return _unpooled(src, gm, shapes) if whole else None


def _global_sum(node: fx.Node, gm: fx.GraphModule, shapes: dict[fx.Node, NodeValue]) -> fx.Node | None:
    """The feature map that ``node`` sums over all its positions (``x.sum((2, 3))``), or None."""
    is_sum = (node.op == "call_method" and node.target == "sum") or (
        node.op == "call_function" and node.target is torch.sum)
    src = node.all_input_nodes[0] if is_sum and node.all_input_nodes else None
    src_shape = shapes.get(src) if src is not None else None
    if src is None or not isinstance(src_shape, tuple) or len(src_shape) < 3 or arg(
            node, 3, "dtype") is not None:
        return None
    dims = arg(node, 1, "dim")
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        return None
    whole = {d % len(src_shape) for d in dims} == set(range(2, len(src_shape)))
    return _unpooled(src, gm, shapes, means=False) if whole else None


def _unpooled(node: fx.Node, gm: fx.GraphModule, shapes: dict[fx.Node, NodeValue], *,
              means: bool = True) -> fx.Node:
    """The map before partial averages over positions or flattens of positions (uniform weights:
    a mean of means over the remaining positions is the mean over all): ``x.mean(-1).mean(-1)``,
    ``x.flatten(2).mean(2)``."""
    while node.all_input_nodes:
        src = node.all_input_nodes[0]
        before, after = shapes.get(src), shapes.get(node)
        if not isinstance(before, tuple) or not isinstance(after, tuple) or len(before) < 3:
            break
        reduced = reduction_of(node)
        partial = means and reduced is not None and reduced[0] == "avg" and all(
            d % len(before) >= 2 for d in reduced[1])
        merged = (is_flatten_like(node, gm) and len(after) == 3 and before[:2] == after[:2]
                  and math.prod(before[2:]) == after[2])
        if not (partial or merged):
            break
        node = src
    return node


def _pools_everything(node: fx.Node, gm: fx.GraphModule, shapes: dict[fx.Node, NodeValue],
                      src: fx.Node) -> bool:
    """An average pooling whose kernel is its whole input, without padding or divisor override."""
    kernel: Any
    padding: Any
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        kernel, padding = module.kernel_size, module.padding
        divisor = getattr(module, "divisor_override", None)
    else:
        kernel, padding = arg(node, 1, "kernel_size"), arg(node, 3, "padding", 0)
        divisor = arg(node, 6, "divisor_override")
    spatial = shapes[src][2:]  # type: ignore[index]
    if isinstance(kernel, fx.Node):  # F.avg_pool2d(x, x.size()[2:]) or x.shape[2:]
        size = kernel.args[0] if kernel.target is operator.getitem else None
        reads_src = isinstance(size, fx.Node) and size.all_input_nodes == [src] and (
            size.target in ("size", "shape") or (size.target is getattr and size.args[1] == "shape"))
        whole = reads_src and kernel.args[1] == slice(2, None)
    else:
        whole = tuple(kernel if isinstance(kernel, (tuple, list)) else [kernel] * len(spatial)) == spatial
    padding = padding if isinstance(padding, (tuple, list)) else [padding]
    return bool(whole and divisor is None and not any(padding))


def _is_avg_pool(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.modules.pooling._AvgPoolNd)
    return node.target in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d)


def _is_max_pool(node: fx.Node, gm: fx.GraphModule) -> bool:
    adaptive = adaptive_output_size(node, gm)
    reduced = reduction_of(node)
    if (adaptive is not None and adaptive[1] == "max") or (reduced is not None and reduced[0] == "max"):
        return True
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.modules.pooling._MaxPoolNd)
    name = str(getattr(node.target, "__name__", node.target))
    return name in ("max", "amax") or ("max" in name and "pool" in name)


def _find_head(gm: fx.GraphModule, shapes: dict[fx.Node, NodeValue]) -> _Head:
    """Walk back from the output through affine nodes to the global average pool."""
    live: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" and not live or any(i in live for i in n.all_input_nodes):
            live.add(n)
    node = first_tensor_output(gm)
    chain: list[fx.Node] = []
    while node is not None:
        if node.op == "placeholder":
            break
        averaged = _global_average(node, gm, shapes)
        summed = _global_sum(node, gm, shapes) if averaged is None else None
        features = averaged if averaged is not None else summed
        if features is not None:
            return _Head(features.name, node.name, tuple(n.name for n in reversed(chain)), summed is not None)
        inputs = _tensor_inputs(node, shapes, live)
        why: str | None
        if _is_max_pool(node, gm):
            why = "it is a max pooling: the max of a map is not the mean of its positions"
        elif len(inputs) != 1:
            why = "it reads the features by more than one path"
        else:
            why = _why_not_affine(node, gm, shapes, inputs[0])
        if why is not None:
            raise NotEquivalentError(
                f"{_NOT_FORM}; {describe(node, gm)}, between the output and the global average "
                f"pool, is not: {why}. For such a head, fcconv.convolutionalize gives a score map "
                "of windows instead."
            )
        chain.append(node)
        node = inputs[0]
    raise NotEquivalentError(
        f"{_NOT_FORM}; {type(gm).__name__} has no global average pool feeding its output. "
        "fcconv.convolutionalize gives a score map of windows instead."
    )


def _first_tensor(out: Any) -> Tensor:
    """The output, or the first tensor of a returned tuple, list or dict (as ``compare`` reads it)."""
    while isinstance(out, (tuple, list, dict)) and out:
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    if not isinstance(out, Tensor):
        raise FcconvError(f"The model returns {type(out).__name__}, not class scores (N, classes).")
    return out


class _Positions(fx.Interpreter):
    """Runs the graph with the pool's output replaced by every position of its input, as a batch."""

    def __init__(self, gm: fx.GraphModule, head: _Head) -> None:
        super().__init__(gm)
        self.head = head
        self.grid: tuple[int, ...] = ()
        self.features = torch.empty(0)
        self.batch = 0

    def run_node(self, n: fx.Node) -> Any:
        if n.name == self.head.pool:
            pooled = super().run_node(n)
            f = self.features  # kept: the interpreter frees it after its last user
            self.grid = tuple(f.shape[2:])
            cells = f.movedim(1, -1).reshape(-1, f.shape[1])  # (N * positions, C)
            if self.head.sums:
                cells = cells * math.prod(self.grid)
            return cells.reshape(cells.shape[0], *pooled.shape[1:])
        value = super().run_node(n)
        if n.name == self.head.features:
            self.features = value
        if n.name in self.head.chain and isinstance(value, Tensor) and value.dim() and (
                value.shape[0] != self.positions):
            raise NotEquivalentError(
                f"{_NOT_FORM}; node '{n.name}' of the head reads the batch size from elsewhere "
                f"(it gives {value.shape[0]} rows for {self.positions} positions)."
            )
        return value

    @property
    def positions(self) -> int:
        return self.batch * math.prod(self.grid)

    def scores(self, x: Tensor) -> Tensor:
        self.batch = x.shape[0]
        out = _first_tensor(self.run(x))
        return out.reshape(self.batch, *self.grid, -1).movedim(-1, 1)


class _MeanOfMap(nn.Module):
    """``x -> mean over positions of the class activation map``: what :func:`compare` certifies."""

    def __init__(self, gm: fx.GraphModule, head: _Head) -> None:
        super().__init__()
        self.gm, self.head = gm, head

    def forward(self, x: Tensor) -> Tensor:
        scores = _Positions(self.gm, self.head).scores(x)
        return scores.mean(dim=tuple(range(2, scores.dim())))


def class_activation_map(model: nn.Module, x: Tensor, *, leaf_modules: object = (),
                         certify: bool = True) -> ClassActivationMap:
    """Exact class activation maps: the model's affine head applied at each position.

    No target layer to choose: the global average pool that feeds the head is found in the traced
    graph, and the affine nodes after it (Linear, eval-mode BatchNorm, dropout in eval, a
    per-class scale or bias, flattens) are applied to every position of the pooled feature map.
    Their spatial mean is the model's output, certified in float64 with :func:`fcconv.compare`.

    Args:
        model: a classifier in eval mode whose head is a global average pool then affine maps.
        x: a batch of images ``(N, C, *spatial)``.
        leaf_modules: as for :func:`~fcconv.models.convolutionalize`.
        certify: run :func:`fcconv.compare` (float64) and raise if the mean is not the logits.

    Returns:
        A :class:`ClassActivationMap`: ``scores (N, classes, *grid)``, ``logits``, ``report``.

    Raises:
        FcconvError: on a model in training mode or an input that is not a batch of images.
        NotEquivalentError: if the head is not of that form (the message names the node), or the
            certificate fails.

    Example:
        >>> cam = class_activation_map(torchvision.models.resnet18().eval(), torch.rand(1, 3, 224, 224))
        >>> cam.scores.shape, cam.report.equivalent
        (torch.Size([1, 1000, 7, 7]), True)
    """
    if not isinstance(model, nn.Module):
        raise FcconvError(f"class_activation_map expects an nn.Module; got {type(model).__name__}.")
    if not isinstance(x, Tensor) or x.dim() < 3 or not x.is_floating_point():
        got = format_shape(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise FcconvError(f"x must be a floating batch of images (N, C, *spatial); got {got}. "
                          "Add the batch dim with x.unsqueeze(0).")
    types, names = leaf_matchers(model, leaf_modules)
    gm = trace(model, [*types, *sorted(names)])
    check_inference_mode(model, gm)
    try:
        shapes = record_shapes(gm, tuple(x.shape[1:]))
    except NodeFailure as error:
        raise node_failure(error, gm, tuple(x.shape[1:]), f"{type(model).__name__} on x",
                           "Pass an image the model accepts") from None
    head = _find_head(gm, shapes)
    with torch.no_grad():
        scores = _Positions(gm, head).scores(x)
        logits = _first_tensor(model(x))
    report = compare(model, _MeanOfMap(gm, head), inputs=x) if certify else None
    if report is not None and not report.equivalent:
        raise NotEquivalentError(
            f"The mean of the class activation map is not the model's output: {report.reason}"
        )
    return ClassActivationMap(scores, logits, report, _describe(gm, head.pool),
                              tuple(_describe(gm, n) for n in head.chain), tuple(x.shape[2:]))


def _describe(gm: fx.GraphModule, name: str) -> str:
    return describe(next(n for n in gm.graph.nodes if n.name == name), gm)

