"""``fcconv.onnx.convolutionalize``: net surgery on an ONNX classifier that fcconv did not write.

The ONNX twin of :func:`fcconv.convolutionalize`, for a file exported by someone else (torchvision,
timm, Keras...). Shapes come from ONNX shape inference at the training size, never from guessing.

Before: ``features -> GlobalAveragePool -> Flatten -> Gemm(512 -> 1000)`` (inputs ``1x3x224x224``).
After: ``features -> AveragePool(7x7, stride 1) -> Identity -> Conv(512 -> 1000, 1x1)`` (inputs
``batch x 3 x height x width``, outputs ``batch x 1000 x h x w``).

* The flatten point is the node that turns a feature map ``(N, C, H, W)`` into rows ``(N, F)``
  (Flatten, Reshape, Squeeze, or a ReduceMean without keepdims) whose rows never come back to a map
  (a squeeze-and-excitation gate does; see :mod:`fcconv.onnx._head`). It becomes an Identity.
* A global pool behind it (GlobalAveragePool, GlobalMaxPool, ReduceMean over H and W), through nodes
  that compute each cell on their own (1x1 Convs, norms, activations, Transposes), becomes a stride-1
  AveragePool / MaxPool over the training feature size.
* The first Gemm / MatMul after it becomes a Conv whose kernel covers the map ``(C, H, W)`` (the
  flatten order of NCHW is the kernel's); later ones become 1x1 Convs; per-feature constants of
  Add / Sub / Mul / Div become ``(M, 1, 1)``; Softmax / LogSoftmax / Hardmax over the features run
  over the channels (before opset 13 through Transposes, as those opsets flatten from ``axis`` on).
* A channels-last input (reaching ``Transpose(0, 3, 1, 2)`` directly or through per-channel
  elementwise ops, as tf2onnx writes Keras models) keeps its layout; its height and width become
  symbolic at their positions. Keras' Flatten of a channels-last map (``Transpose(0, 2, 3, 1)`` then a
  Reshape) is read in ``(H, W, C)`` order; a ReduceMean over its axes 1, 2 becomes a Transpose and a pool.
* A Reshape in the body to a constant shape that fixes a map's height and width is refused by name.
* Anything else in the head is refused, naming the node and its op type.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import helper, numpy_helper

from fcconv._shapes import check_input_shape, format_shape
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.onnx._cells import check_larger_size
from fcconv.onnx._check import OnnxReport, SizeCheck, check_ratio, ratio_of
from fcconv.onnx._float64 import check_certify, run_reference, to_float64, verdict
from fcconv.onnx._head import (
    GLOBAL_POOLS,
    check_per_cell,
    flatten_point,
    pool_behind,
    reduced_axes,
    spatial_axes,
    to_channels_first,
)
from fcconv.onnx._runtime import check_output, load, op_counts, run, save, session, symbolic_dims
from fcconv.onnx.rewrite import require_tensor_outputs

__all__ = ["convolutionalize", "convolutionalize_model"]

_ELEMENTWISE = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "HardSigmoid", "HardSwish",
                "Erf", "Gelu", "Identity", "Dropout", "Softplus", "Mish", "Cast", "BatchNormalization"}
_BINARY = {"Add", "Sub", "Mul", "Div"}
_FLATTENS = {"Flatten", "Reshape", "Squeeze"}
_GLOBAL_STATISTICS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ReduceMean", "ReduceMax",
                      "ReduceSum", "ReduceMin", "ReduceL2"}


class _Surgery:
    """The model being operated on, its shapes at the training size, and the values now maps."""

    def __init__(self, model: Any, shape: tuple[int, ...]) -> None:
        self.model = model
        self.graph = model.graph
        self.shapes = _inferred_shapes(model, shape)
        self.inits = {i.name: i for i in self.graph.initializer}
        self.constants = {n.output[0]: n for n in self.graph.node if n.op_type == "Constant"}
        self.producers = {o: n for n in self.graph.node for o in n.output}
        self.layout: dict[str, tuple[int, ...]] = {}  # value -> the (C, H, W) its features come from
        self.done: dict[str, int] = {}
        self.hwc: set[str] = set()  # rows in (H, W, C) order (Keras' Flatten, channels last)
        self.opset = _opset(model)

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer, a Constant, or an Identity of one (deduplicated weights)."""
        producer = self.producers.get(name)
        if producer is not None and producer.op_type == "Identity" and name not in self.layout:
            return self.const(producer.input[0])
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.constants.get(name)
        if node is not None:
            return numpy_helper.to_array(helper.get_attribute_value(node.attribute[0]))
        return None

    def add_init(self, name: str, array: np.ndarray) -> str:
        while name in self.inits:
            name += "_"
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def replace(self, node: Any, new: Any, what: str) -> None:
        new.name = node.name
        node.CopyFrom(new)
        self.done[what] = self.done.get(what, 0) + 1

    def fail(self, node: Any, why: str) -> FcconvError:
        return FcconvError(
            f"Cannot convolutionalize node {node.name or '(unnamed)'!r} ({node.op_type}): {why}. fcconv.onnx "
            "handles heads of Flatten/Reshape, global pools, Gemm/MatMul with constant weights, elementwise "
            "ops and Softmax; convolutionalize the PyTorch model (fcconv.convolutionalize) and export it."
        )


def _inferred_shapes(model: Any, shape: tuple[int, ...]) -> dict[str, tuple[int, ...] | None]:
    """Every value's shape for one input of ``(1, *shape)``, by ONNX shape inference."""
    fixed = copy.deepcopy(model)
    _check_input(fixed.graph.input[0], shape)
    dims = fixed.graph.input[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, (1, *shape)):
        dim.Clear()
        dim.dim_value = size
    del fixed.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    out: dict[str, tuple[int, ...] | None] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = info.type.tensor_type
        if tensor.HasField("shape") and all(d.HasField("dim_value") for d in tensor.shape.dim):
            out[info.name] = tuple(int(d.dim_value) for d in tensor.shape.dim)
        else:
            out.setdefault(info.name, None)
    return out


def _check_input(graph_input: Any, shape: tuple[int, ...]) -> None:
    """Refuse an input shape the graph's input does not accept, naming the one it declares."""
    dims = graph_input.type.tensor_type.shape.dim
    declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    text = "(" + ", ".join(str(d) for d in declared) + ")"
    wanted = (1, *shape)
    fixed = [(d, w) for d, w in zip(declared[1:], wanted[1:]) if isinstance(d, int)]
    if len(dims) != len(wanted) or any(d != w for d, w in fixed):
        per_sample = ",".join(str(d) for d in declared[1:])
        raise FcconvError(
            f"The model's input {graph_input.name!r} is {text}; the input shape {format_shape(shape)} does "
            f"not fit it. Give its per-sample training shape ({per_sample})."
        )


def _slide_pool(s: _Surgery, node: Any) -> None:
    """A global pool becomes a stride-1 pool over the training feature size."""
    source = s.shapes[node.input[0]]
    assert source is not None
    kernel = list(source[2:])
    new = helper.make_node(GLOBAL_POOLS[node.op_type], [node.input[0]], [node.output[0]],
                           kernel_shape=kernel, strides=[1, 1])
    s.replace(node, new, f"{node.op_type} -> {new.op_type} {kernel[0]}x{kernel[1]}")


def _enter_head(s: _Surgery, node: Any) -> None:
    """Turn the flatten point (and a global pool behind it, through per-cell ops) into maps."""
    x = node.input[0]
    source = s.shapes[x]
    assert source is not None
    if node.op_type == "ReduceMean" and spatial_axes(s, node):
        _slide_pool(s, node)
        s.layout[node.output[0]] = (source[1], 1, 1)
        return
    if node.op_type == "ReduceMean" and reduced_axes(s, node) == [1, 2]:
        _slide_channels_last_mean(s, node, source)
        return
    if node.op_type not in _FLATTENS:
        raise s.fail(node, f"it turns the map {format_shape(source)} into rows and is not a flatten")
    found = pool_behind(s, x) if source[2:] == (1, 1) or source[1:3] == (1, 1) else None
    perm = None
    if found is not None:
        pool, between = found
        perm = to_channels_first(check_per_cell(s, pool, between)[x])
        _slide_pool(s, pool)
    channels = source[1] if perm is None else source[perm[1]]
    s.layout[x] = (channels, *source[2:]) if perm is None else (channels, 1, 1)
    s.layout[node.output[0]] = s.layout[x]
    if perm is None and _from_channels_last(s, x):
        x = s.producers[x].input[0]
        s.layout[node.output[0]] = s.layout[x] = _chw(s.shapes[x])
        s.hwc.add(node.output[0])
    if perm is None:
        s.replace(node, helper.make_node("Identity", [x], [node.output[0]]), f"{node.op_type} -> Identity")
    else:
        s.replace(node, helper.make_node("Transpose", [x], [node.output[0]], perm=perm),
                  f"{node.op_type} -> Transpose to channels first")


def _slide_channels_last_mean(s: _Surgery, node: Any, source: tuple[int, ...]) -> None:
    """ReduceMean over axes 1, 2 of a channels-last map (tf2onnx from opset 18) -> Transpose to channels
    first, then a stride-1 AveragePool over the training feature size."""
    first = f"{node.output[0]}_channels_first"
    s.graph.node.append(helper.make_node("Transpose", [node.input[0]], [first], perm=[0, 3, 1, 2]))
    kernel = list(source[1:3])
    new = helper.make_node("AveragePool", [first], [node.output[0]], kernel_shape=kernel, strides=[1, 1])
    s.replace(node, new, f"ReduceMean over H, W (channels last) -> AveragePool {kernel[0]}x{kernel[1]}")
    s.layout[node.output[0]] = (source[3], 1, 1)


def _from_channels_last(s: _Surgery, value: str) -> bool:
    """True when ``value`` is ``Transpose(0, 2, 3, 1)`` of a map: a channels-last map Keras flattens."""
    producer = s.producers.get(value)
    if producer is None or producer.op_type != "Transpose":
        return False
    perm = [list(a.ints) for a in producer.attribute if a.name == "perm"]
    shape = s.shapes.get(producer.input[0])
    return perm == [[0, 2, 3, 1]] and shape is not None and len(shape) == 4


def _chw(shape: tuple[int, ...] | None) -> tuple[int, ...]:
    assert shape is not None and len(shape) == 4
    return tuple(shape[1:])


def _linear(s: _Surgery, node: Any) -> None:
    """Gemm / MatMul with a constant weight -> Conv whose kernel covers the incoming layout."""
    layout = s.layout[node.input[0]]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.input[1] in s.layout or s.const(node.input[1]) is None:
        raise s.fail(node, "its weight is not a constant")
    weight = s.const(node.input[1])
    assert weight is not None
    if node.op_type == "Gemm":
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise s.fail(node, "transA, alpha or beta is set")
        matrix = weight if attrs.get("transB", 0) else weight.T
    else:
        matrix = weight.T
    if matrix.ndim != 2 or matrix.shape[1] != int(np.prod(layout)):
        raise s.fail(node, f"its weight {format_shape(weight.shape)} does not take the "
                           f"{int(np.prod(layout))} features of the map {format_shape(layout)}")
    kernel = matrix.reshape(-1, *layout)
    if node.input[0] in s.hwc:  # features in (H, W, C) order: the kernel's rows are read that way
        kernel = matrix.reshape(-1, layout[1], layout[2], layout[0]).transpose(0, 3, 1, 2)
    inputs = [node.input[0], s.add_init(f"{node.name or 'fc'}_kernel", kernel)]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = s.const(node.input[2])
        if bias is None or bias.size not in (1, matrix.shape[0]):
            raise s.fail(node, "its bias is not a constant vector")
        vector = np.broadcast_to(bias.reshape(-1), (matrix.shape[0],))
        inputs.append(s.add_init(f"{node.name or 'fc'}_bias", vector))
    conv = helper.make_node("Conv", inputs, [node.output[0]], kernel_shape=list(layout[1:]))
    s.replace(node, conv, f"{node.op_type} -> Conv {layout[1]}x{layout[2]}")
    s.layout[node.output[0]] = (matrix.shape[0], 1, 1)


def _binary(s: _Surgery, node: Any) -> None:
    mapped = [i for i in node.input if i in s.layout]
    layout = s.layout[mapped[0]]
    if len(mapped) == 1:
        other = next(i for i in node.input if i not in s.layout)
        value = s.const(other)
        if value is None:
            raise s.fail(node, "its other operand is neither a constant nor from the head")
        if value.size != 1:
            if value.size != layout[0] or layout[1:] != (1, 1):
                raise s.fail(node, f"its constant {format_shape(value.shape)} is not one value per feature")
            index = list(node.input).index(other)
            node.input[index] = s.add_init(f"{other}_per_channel", value.reshape(-1, 1, 1))
    s.layout[node.output[0]] = layout


def _opset(model: Any) -> int:
    """The version of the default ONNX domain the model imports."""
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _softmax(s: _Surgery, node: Any) -> None:
    """Softmax / LogSoftmax / Hardmax over the features -> over the channels of each cell.

    From opset 13 that is ``axis=1``. Before 13 these ops flatten every dim from ``axis`` on, so
    ``axis=1`` would normalise over ``C x h x w`` at once: the channels are moved last
    (``Transpose``), normalised with ``axis=3`` (only the last dim) and moved back.
    """
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"),
                -1 if s.opset >= 13 else 1)
    if axis not in (1, -1):
        raise s.fail(node, f"it runs over axis {axis}, not the features")
    out, source = node.output[0], node.input[0]
    if s.opset >= 13:
        s.replace(node, helper.make_node(node.op_type, list(node.input), [out], axis=1),
                  f"{node.op_type} over channels")
    else:
        last, back = f"{out}_channels_last", f"{out}_normalised"
        s.graph.node.append(helper.make_node("Transpose", [node.input[0]], [last], perm=[0, 2, 3, 1]))
        s.graph.node.append(helper.make_node(node.op_type, [last], [back], axis=3))
        s.replace(node, helper.make_node("Transpose", [back], [out], perm=[0, 3, 1, 2]),
                  f"{node.op_type} over channels (opset {s.opset}: Transpose, axis 3, Transpose)")
    s.layout[out] = s.layout[source]


def _convert_head(s: _Surgery, start: int) -> None:
    for node in list(s.graph.node)[start + 1:]:
        if not any(i in s.layout for i in node.input):
            continue
        op = node.op_type
        if op in ("Gemm", "MatMul") and node.input[0] in s.layout:
            _linear(s, node)
        elif op in _ELEMENTWISE:
            for out in node.output:
                s.layout[out] = s.layout[node.input[0]]
                if node.input[0] in s.hwc:
                    s.hwc.add(out)
        elif op in _BINARY:
            _binary(s, node)
        elif op in ("Softmax", "LogSoftmax", "Hardmax"):
            _softmax(s, node)
        elif op in _FLATTENS:
            s.layout[node.output[0]] = s.layout[node.input[0]]
            if node.input[0] in s.hwc:
                s.hwc.add(node.output[0])
            s.replace(node, helper.make_node("Identity", [node.input[0]], [node.output[0]]),
                      f"{op} -> Identity")
        elif op == "Shape":
            continue  # feeds the shape of a flatten that is now an Identity: removed as unused
        else:
            raise s.fail(node, "this op type cannot slide over a larger map")


def channels_last(model: Any) -> bool:
    """True when the image input is ``(N, H, W, C)``: every path from it reaches ``Transpose(0, 3, 1, 2)``
    (as tf2onnx writes Keras models) through elementwise ops whose constants hold one value per channel
    at most (Keras' Rescaling and Normalization layers), so the spatial dims are found from the graph."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    todo, seen, found = [model.graph.input[0].name], set(), False
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for user in (n for n in model.graph.node if name in n.input):
            perm = [list(a.ints) for a in user.attribute if a.name == "perm"]
            if user.op_type == "Transpose" and perm == [[0, 3, 1, 2]]:
                found = True
            elif user.op_type in _ELEMENTWISE | _BINARY | {"Sqrt"} and _per_channel_operands(
                    model, user, consts | seen):
                todo += list(user.output)
            else:
                return False
    return found


def _per_channel_operands(model: Any, node: Any, known: set[str]) -> bool:
    """True when every operand of ``node`` is on the path from the input or a constant that broadcasts
    along the last axis only (a scalar, ``(C,)`` or ``(1, 1, 1, C)``)."""
    for name in node.input:
        if name in known and name not in {i.name for i in model.graph.initializer}:
            continue
        value = _const_value(model, name)
        if value is None or any(d != 1 for d in value.shape[:-1]):
            return False
    return True


def _const_value(model: Any, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(helper.get_attribute_value(node.attribute[0]))
    return None


def _make_dynamic(s: _Surgery) -> None:
    """Symbolic batch, height and width in; score maps out; stale intermediate shapes dropped."""
    graph_input = s.graph.input[0]
    last = channels_last(s.model)
    names = ("batch", "height", "width", None) if last else ("batch", None, "height", "width")
    for dim, name in zip(graph_input.type.tensor_type.shape.dim, names):
        if name is not None:
            dim.Clear()
            dim.dim_param = name
    for out in s.graph.output:
        if out.name not in s.layout:
            raise FcconvError(f"The model's output {out.name!r} does not come from its classifier head; "
                              "fcconv.onnx convolutionalizes models with one output, the scores.")
        elem = out.type.tensor_type.elem_type
        dims: list[str | int | None] = ["batch", s.layout[out.name][0], "h", "w"]
        out.CopyFrom(helper.make_tensor_value_info(out.name, elem, dims))
    del s.graph.value_info[:]


def _fixed_reshape(s: _Surgery, node: Any) -> tuple[tuple[int, ...], np.ndarray] | None:
    """The map ``node`` reshapes and the constant shape it fixes besides the channels, if it does."""
    source = s.shapes.get(node.input[0]) if node.op_type == "Reshape" else None
    target = s.const(node.input[1]) if source is not None and len(source) == 4 else None
    if source is None or target is None or target.size != 4 or int((target > 0).sum()) < 2:
        return None
    return source, target


def _refuse_fixed_reshapes(s: _Surgery, start: int) -> None:
    """Refuse a Reshape of a map, before the head, to a constant shape that fixes its height and width.

    tf2onnx writes ``Reshape(-1, C, 1, 1)`` for the Transpose of a map of one pixel, so a model exported
    at a size where a map is 1x1 cannot run on a larger map (and might run with cells moved to the batch).
    """
    pooled: set[str] = set()  # values computed from global statistics only (squeeze-and-excitation gates)
    for node in list(s.graph.node)[:start]:
        inputs = [i for i in node.input if i and s.const(i) is None]
        if node.op_type in _GLOBAL_STATISTICS or (inputs and all(i in pooled for i in inputs)):
            pooled.update(node.output)
            continue
        found = _fixed_reshape(s, node)
        if found is None:
            continue
        source, target = found
        hint = (" (an exporter writes this for the Transpose of a map of one pixel: export the model at an "
                "input size where its last feature map is larger than 1x1)" if source[1:3] == (1, 1)
                or source[2:] == (1, 1) else "")
        raise FcconvError(f"The model's body cannot run on a larger image: node {node.name or '(unnamed)'!r} "
                          f"(Reshape) reshapes the feature map {format_shape(source)} to the fixed shape "
                          f"{target.tolist()}, which does not grow with the input{hint}.")


def convolutionalize_model(model: Any, input_shape: Sequence[int]) -> tuple[Any, dict[str, int]]:
    """:func:`convolutionalize` on a ``ModelProto`` in memory: the new model and what was replaced."""
    shape = check_input_shape(input_shape)
    if len(shape) != 3:
        raise FcconvError(f"fcconv.onnx.convolutionalize handles images (C, H, W); got the input shape "
                          f"{format_shape(shape)}.")
    require_tensor_outputs(model)
    s = _Surgery(copy.deepcopy(model), shape)
    start = flatten_point(s)
    _refuse_fixed_reshapes(s, start)
    _enter_head(s, s.graph.node[start])
    _convert_head(s, start)
    _make_dynamic(s)
    ir_model = ir.serde.deserialize_model(s.model)
    ir_model.graph.sort()  # nodes added beside the one they replace (Transposes around a Softmax)
    ir.passes.common.RemoveUnusedNodesPass()(ir_model)
    ir.passes.common.IdentityEliminationPass()(ir_model)
    out = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(out)
    return out, s.done


def convolutionalize(src: str | Path, dst: str | Path, input_shape: Sequence[int], *,
                     certify: str = "float64") -> OnnxReport:
    """Turn the ONNX classifier ``src`` into a fully convolutional one that gives score maps, into ``dst``.

    See the module docstring for what changes. The result is run in onnxruntime at the training
    size, where it must give the original file's scores, and at a larger non-square size, where its
    map is checked against an independent reference (see :mod:`fcconv.onnx._cells`): where the graph
    pads nothing, each cell against the original file on its crop; otherwise against
    :func:`fcconv.convolutionalize` of the file's onnx2torch translation; where neither runs, the report
    says the size is unverified (``report.unverified``). The verdict is float64: the files are cast to
    float64 and run with ``onnx.reference``, and must agree to :data:`fcconv.certify.FLOAT64_RTOL`.

    Args:
        src: the ONNX file to read (never written).
        dst: the file to write, atomically; written only when the checks pass.
        input_shape: the per-sample training shape ``(C, H, W)`` (``(H, W, C)`` for a channels-last
            file: the file's own order).
        certify: ``"float64"`` (the verdict above) or ``"float32"`` (onnxruntime only), for models
            too big to run in ``onnx.reference``.

    Returns:
        An :class:`OnnxReport`: the sizes run, the difference from ``src`` at the training size, the op
        counts and the replacements.

    Raises:
        FcconvError: if ``src`` is not ONNX, a node of the head cannot slide (named, with its op
            type), or the body holds a shape fixed at the training size.
        NotEquivalentError: if the result gives other scores than ``src`` at the training size, in
            onnxruntime or in float64.

    Example:
        >>> report = fcconv.onnx.convolutionalize("resnet18.onnx", "resnet18-fcn.onnx", (3, 224, 224))
        >>> report.checks[1].output_shape
        (1, 1000, 4, 2)
    """
    shape = check_input_shape(input_shape)
    float64 = check_certify(certify)
    check_output(dst, src)
    original = load(src)
    model, done = convolutionalize_model(original, shape)
    sess = session(model)
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    checks = [_same_scores(run(session(Path(src)), x), run(sess, x), x)]
    if float64:
        checks[0] = _certify_float64(original, model, x, checks[0])
    last = channels_last(original)
    chw = (shape[2], shape[0], shape[1]) if last else shape
    try:
        checks.append(check_larger_size(original, model, sess, chw, float64, last))
    except FcconvError as error:
        if isinstance(error, NotEquivalentError):
            raise
        raise FcconvError(
            f"The convolutionalized model runs at the training size {format_shape(chw[1:])} but not at "
            f"larger sizes: its body holds a shape fixed at export. {error}"
        ) from None
    save(model, dst)
    return OnnxReport(str(dst), tuple(checks), op_counts(model), symbolic_dims(model), done)


def _certify_float64(original: Any, model: Any, x: torch.Tensor, check: SizeCheck) -> SizeCheck:
    """Both files in float64 (``onnx.reference``) at the training size must give the same scores, and
    in float32 (onnxruntime) the result may deviate from the original's float64 scores no more than
    :data:`fcconv.certify.ERROR_RATIO_MAX` times as much as the original does."""
    x64 = x.double().numpy()
    expected = run_reference(to_float64(original), x64, "the original file")
    got = run_reference(to_float64(model), x64, "the convolutionalized file")
    if got.size == expected.size:
        got = got.reshape(expected.shape)  # (N, M, 1, 1) -> (N, M)
    rel = verdict(expected, got, "the convolutionalized file", "the original file", tuple(x.shape))
    # The float32 check: both files in onnxruntime, against the original's float64 run.
    ratio = check_ratio(ratio_of(run(session(original), x), run(session(model), x), expected),
                        "the convolutionalized file", "the original file", tuple(x.shape))
    return dataclasses.replace(check, float64_max_rel=rel, error_ratio=ratio)


def _same_scores(expected: torch.Tensor, got: torch.Tensor, x: torch.Tensor) -> SizeCheck:
    if got.numel() != expected.numel() or not bool(torch.isfinite(got).all()):
        raise NotEquivalentError(
            f"At the training input {format_shape(x.shape)} the result gives {format_shape(got.shape)} where "
            f"the original gives {format_shape(expected.shape)}, or non-finite values."
        )
    diff = float((got.reshape(expected.shape) - expected).abs().max())
    scale = float(expected.abs().max())
    return SizeCheck(tuple(x.shape), tuple(got.shape), diff, diff / scale if scale else diff, None, None)
