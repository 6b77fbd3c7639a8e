"""The float64 verdict for ONNX files: cast a graph to float64 and run it with ``onnx.reference``.

onnxruntime has no float64 Conv on CPU, so the verdict runs the float64 graph in
``onnx.reference.ReferenceEvaluator`` (numpy). As in :func:`fcconv.compare`, two graphs compute the
same function when their float64 outputs agree to :data:`fcconv.certify.FLOAT64_RTOL` relative to the
largest reference value; float64 rounding is about 1e-15 of it, a weight off by 1e-3 about 1e-6.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from fcconv._shapes import format_shape
from fcconv.certify import FLOAT64_RTOL
from fcconv.errors import FcconvError, NotEquivalentError

__all__ = ["CERTIFY", "check_certify", "float64_rel", "run_reference", "run_reference_outputs", "to_float64",
           "verdict"]

#: The values of the ``certify`` argument: ``"float64"`` (the verdict, default) or ``"float32"``
#: (onnxruntime at float32 only, for models too big for ``onnx.reference``).
CERTIFY = ("float64", "float32")

_DOUBLE = ir.DataType.DOUBLE


def check_certify(certify: str) -> bool:
    """True when ``certify`` asks for the float64 verdict; refuses any other value."""
    if certify not in CERTIFY:
        raise FcconvError(f"certify must be one of {', '.join(map(repr, CERTIFY))}; got {certify!r}. "
                          "Use 'float32' to skip the float64 run of a model too big for onnx.reference.")
    return certify == "float64"


def _floating(dtype: Any) -> bool:
    return dtype is not None and dtype != _DOUBLE and dtype.is_floating_point()


def _cast_value(value: ir.Value) -> None:
    if _floating(value.dtype):
        value.dtype = _DOUBLE
    tensor = value.const_value
    if tensor is not None and _floating(tensor.dtype):
        value.const_value = ir.tensor(np.asarray(tensor.numpy(), dtype=np.float64), name=tensor.name)


def _cast_attributes(node: ir.Node) -> None:
    """Constant / ConstantOfShape values, and the target of Cast and ops with a ``dtype``."""
    for name, attr in list(node.attributes.items()):
        if attr.type == ir.AttributeType.TENSOR and _floating(attr.as_tensor().dtype):
            array = np.asarray(attr.as_tensor().numpy(), dtype=np.float64)
            node.attributes[name] = ir.AttrTensor(name, ir.tensor(array))
        elif name in ("to", "dtype") and attr.type == ir.AttributeType.INT and _floating(
                ir.DataType(attr.value)):
            node.attributes[name] = ir.AttrInt64(name, int(_DOUBLE))
    for name in ("value_float", "value_floats"):
        if node.op_type == "Constant" and name in node.attributes:
            array = np.asarray(node.attributes.pop(name).value, dtype=np.float64)
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))


def to_float64(proto: Any) -> Any:
    """A copy of the ModelProto ``proto`` computing in float64: every floating initializer, constant,
    Cast target and graph input/output/intermediate type becomes double (``proto`` is not changed)."""
    model = ir.serde.deserialize_model(proto)
    graph = model.graph
    values: list[ir.Value | None] = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
    for node in ir.traversal.RecursiveGraphIterator(graph):
        _cast_attributes(node)
        values += [*node.inputs, *node.outputs]
    for value in values:
        if value is not None:
            _cast_value(value)
    return ir.serde.serialize_model(model)


def run_reference(proto: Any, x: np.ndarray, what: str) -> np.ndarray:
    """Run ``proto``'s single input on ``x`` with ``onnx.reference.ReferenceEvaluator``; its first output.

    Raises:
        FcconvError: when the evaluator fails (an op it does not implement, ...).
    """
    return run_reference_outputs(proto, x, what)[0]


def run_reference_outputs(proto: Any, x: np.ndarray, what: str) -> list[np.ndarray]:
    """:func:`run_reference`, every output in the graph's order."""
    from onnx.reference import ReferenceEvaluator

    names = {init.name for init in proto.graph.initializer}
    name: str = next(i.name for i in proto.graph.input if i.name not in names)
    try:
        proto = _for_reference(proto)
        evaluator: Any = ReferenceEvaluator(proto)  # typed as returning a dict with intermediate=True
        return [np.asarray(y) for y in evaluator.run(None, {name: x})]
    except Exception as error:
        text = " ".join(str(error).split())[:300] or type(error).__name__
        raise FcconvError(
            f"onnx.reference could not run {what} in float64 on an input {format_shape(x.shape)}: {text}. "
            "Pass certify='float32' (--certify float32) to skip the float64 verdict."
        ) from None


def _for_reference(proto: Any) -> Any:
    """``proto`` at opset 14 at least, where ``onnx.reference`` follows the ONNX spec.

    Before opset 13 it runs Softmax, LogSoftmax and Hardmax with the semantics of 13 (over one axis, not
    the flattened dims from it), and BatchNormalization of opsets 9 to 13 on batch statistics (its
    ``momentum`` read as training mode). onnx's version converter rewrites both exactly (Flatten, the
    op, Reshape; BatchNormalization-14 with ``training_mode=0``).
    """
    import onnx

    opset = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 14)
    return proto if opset >= 14 else onnx.version_converter.convert_version(proto, 14)


def float64_rel(expected: np.ndarray, got: np.ndarray) -> float:
    """``max |got - expected|`` over ``max |expected|``, as :func:`fcconv.compare` measures ``max_rel``."""
    if got.size == 0:
        return 0.0
    scale = float(np.abs(expected).max())
    diff = float(np.abs(got.astype(np.float64) - expected).max())
    return diff / scale if scale else diff


def verdict(expected: np.ndarray, got: np.ndarray, what: str, reference: str,
            shape: tuple[int, ...]) -> float:
    """The float64 relative difference, checked against :data:`~fcconv.certify.FLOAT64_RTOL`.

    Raises:
        NotEquivalentError: on other output shapes, non-finite values or a difference above it.
    """
    if got.shape != expected.shape:
        raise NotEquivalentError(
            f"In float64 {what} gives an output {format_shape(got.shape)} on an input {format_shape(shape)} "
            f"where {reference} gives {format_shape(expected.shape)}."
        )
    rel = float64_rel(expected, got)
    if not np.isfinite(got).all() or not rel <= FLOAT64_RTOL:
        raise NotEquivalentError(
            f"In float64 {what} differs from {reference} at input {format_shape(shape)} by {rel:.3g} of the "
            f"largest output, above the {FLOAT64_RTOL:g} threshold (float64 rounding gives about 1e-15): it "
            "does not compute the same function."
        )
    return rel
