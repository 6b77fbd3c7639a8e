"""``fcconv.onnx.linear_to_conv``: every Gemm / MatMul(+Add) with constant weights becomes a 1x1 Conv.

Rewrite rules of the onnxscript rewriter (a pattern, a check, a replacement), the ONNX twin of
:func:`fcconv.linear_to_pointwise`: the weight ``(M, K)`` becomes a ``(M, K, 1, 1)`` kernel and the
rows of the input become the batch of a ``1x1`` image.

Before: ``x (N, K) -> Gemm(W, b, transB=1) -> (N, M)``.
After: ``x -> Reshape(0, -1, 1, 1) -> Conv(W[:, :, None, None], b) -> Reshape(0, -1) -> (N, M)``.

A MatMul over ``x (d0, ..., K)`` of rank 3 to 5 moves ``K`` to the channels (``Transpose``) and runs a
1-, 2- or 3-d Conv with a kernel of ones. Every op written exists with the same form from opset 7 on,
so the file keeps its opset. Weights and biases are constants however they are reached (initializers,
Constant nodes, through Identity or Cast); a node left (a computed weight, an input rank shape
inference cannot give, ``transA``/``alpha`` set) is named with the reason (:func:`left_nodes`).
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript import rewriter
from onnxscript.rewriter import pattern

from fcconv._shapes import format_shape
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.onnx._check import OnnxReport, SizeCheck, check_ratio, ratio_of
from fcconv.onnx._float64 import check_certify, run_reference_outputs, to_float64, verdict
from fcconv.onnx._runtime import (
    LINEAR_OPS,
    check_output,
    load,
    op_counts,
    run_all,
    save,
    session,
    symbolic_dims,
)

__all__ = ["left_nodes", "linear_to_conv", "linear_to_conv_model", "require_tensor_outputs", "rules"]


def _constant(value: Any) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output, through Identity and Cast; else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy())
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Constant" and "value" in node.attributes:
        return np.asarray(node.attributes["value"].as_tensor().numpy())
    if node.op_type == "Identity":
        return _constant(node.inputs[0])
    if node.op_type == "Cast" and "to" in node.attributes:
        source = _constant(node.inputs[0])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(node.attributes["to"].as_int())
        return None if source is None else source.astype(dtype)
    return None


def _attr(node: Any, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    return attr.as_float() if name in ("alpha", "beta") else attr.as_int()


_names = itertools.count()


def _pointwise(op: Any, x2d: Any, weight: np.ndarray, bias: np.ndarray | None, name: str) -> Any:
    """``x2d (R, K) -> (R, M)`` as a 1x1 Conv over ``(R, K, 1, 1)``; ``weight`` is ``(M, K)``."""
    name = f"{name}_{next(_names)}"
    image = op.initializer(ir.tensor(np.array([0, -1, 1, 1], dtype=np.int64)), f"{name}_image")
    rows = op.initializer(ir.tensor(np.array([0, -1], dtype=np.int64)), f"{name}_rows")
    kernel = op.initializer(ir.tensor(np.ascontiguousarray(weight[:, :, None, None])), f"{name}_kernel")
    inputs = [op.Reshape(x2d, image), kernel]
    if bias is not None:
        inputs.append(op.initializer(ir.tensor(np.ascontiguousarray(bias)), f"{name}_bias"))
    return op.Reshape(op.Conv(*inputs, kernel_shape=[1, 1]), rows)


def _channels_conv(op: Any, x: Any, rank: int, weight: np.ndarray, bias: np.ndarray | None, name: str) -> Any:
    """``x (d0, ..., d_{r-2}, K) -> (d0, ..., M)``: ``K`` to the channels, a Conv of ones, and back."""
    name = f"{name}_{next(_names)}"
    ones = [1] * (rank - 2)
    kernel = op.initializer(ir.tensor(np.ascontiguousarray(weight.reshape(*weight.shape, *ones))),
                            f"{name}_kernel")
    inputs = [op.Transpose(x, perm=[0, rank - 1, *range(1, rank - 1)]), kernel]
    if bias is not None:
        inputs.append(op.initializer(ir.tensor(np.ascontiguousarray(bias)), f"{name}_bias"))
    return op.Transpose(op.Conv(*inputs, kernel_shape=ones), perm=[0, *range(2, rank), 1])


def _bias_vector(bias: np.ndarray | None, m: int) -> np.ndarray | None | bool:
    """A bias broadcast over rows as a ``(M,)`` vector; False when it is not one."""
    if bias is None:
        return None
    if bias.size == m and all(s == 1 for s in bias.shape[:-1]) and bias.shape[-1:] == (m,):
        return bias.reshape(m)
    if bias.size == 1:
        return np.full((m,), bias.reshape(()), dtype=bias.dtype)
    return False



def _gemm_weight(v: dict[str, Any]) -> np.ndarray:
    """The Gemm's weight as ``(M, K)``, from a constant ``B`` and ``transB``."""
    weight = _constant(v["w"])
    assert weight is not None
    return weight if _attr(v["out"].producer(), "transB", 0) else weight.T


class GemmToConv(pattern.RewriteRuleClassBase):
    """``Gemm(x, W)`` with a constant W, ``alpha = 1`` and ``transA = 0``."""

    def pattern(self, op: Any, x: Any, w: Any) -> Any:
        return op.Gemm(x, w, _allow_other_attributes=True, _outputs=["out"])

    def check(self, op: Any, *args: Any, **v: Any) -> rewriter.MatchResult:  # op: the match context
        result = rewriter.MatchResult()
        node = v["out"].producer()
        weight = _constant(v["w"])
        if weight is None or weight.ndim != 2:
            return result.fail("the weight is not a constant matrix")
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
            return result.fail("transA or alpha is set")
        if "b" in v:
            bias = _constant(v["b"])
            if bias is None or _bias_vector(bias, _gemm_weight(v).shape[0]) is False:
                return result.fail("the bias is not a constant vector")
            if _attr(node, "beta", 1.0) != 1.0:
                return result.fail("beta is set")
        return result

    def rewrite(self, op: Any, **v: Any) -> Any:
        weight = _gemm_weight(v)
        bias = _bias_vector(_constant(v["b"]), weight.shape[0]) if "b" in v else None
        return _pointwise(op, v["x"], weight, bias if isinstance(bias, np.ndarray) else None,
                          v["out"].producer().name or "gemm")


class GemmBiasToConv(GemmToConv):
    """``Gemm(x, W, b)``: also a constant bias over the columns and ``beta = 1``."""

    def pattern(self, op: Any, x: Any, w: Any, b: Any) -> Any:  # type: ignore[override]
        return op.Gemm(x, w, b, _allow_other_attributes=True, _outputs=["out"])


class MatMulAddToConv(pattern.RewriteRuleClassBase):
    """``MatMul(x, W) + b`` with constant ``W (K, M)`` and ``b (M,)``; ``x`` of any rank >= 2."""

    def pattern(self, op: Any, x: Any, w: Any, b: Any) -> Any:
        return op.Add(op.MatMul(x, w, _outputs=["out"]), b)

    def check(self, op: Any, *args: Any, **v: Any) -> rewriter.MatchResult:  # op: the match context
        result = rewriter.MatchResult()
        weight = _constant(v["w"])
        x = v["x"]
        if weight is None or weight.ndim != 2:
            return result.fail("the weight is not a constant matrix")
        if x.shape is None or not 2 <= len(x.shape) <= 5:
            return result.fail("the input's rank is not inferred, or not 2 to 5")
        if "b" in v:
            bias = _constant(v["b"])
            if bias is None or _bias_vector(bias, weight.shape[1]) is False:
                return result.fail("the bias is not a constant vector")
            if len(v["out"].uses()) != 1:
                return result.fail("the MatMul's output is used elsewhere")
        return result

    def rewrite(self, op: Any, **v: Any) -> Any:
        weight = _constant(v["w"])
        assert weight is not None
        bias = _bias_vector(_constant(v["b"]), weight.shape[1]) if "b" in v else None
        bias = bias if isinstance(bias, np.ndarray) else None
        x, name = v["x"], v["out"].producer().name or "matmul"
        if len(x.shape) == 2:
            return _pointwise(op, x, weight.T, bias, name)
        return _channels_conv(op, x, len(x.shape), weight.T, bias, name)


class MatMulToConv(MatMulAddToConv):
    """``MatMul(x, W)`` with a constant ``W (K, M)``, no bias."""

    def pattern(self, op: Any, x: Any, w: Any) -> Any:  # type: ignore[override]
        return op.MatMul(x, w, _outputs=["out"])

    def check(self, op: Any, *args: Any, **v: Any) -> rewriter.MatchResult:  # op: the match context
        uses = v["out"].uses()
        if len(uses) == 1 and uses[0].node.op_type == "Add":  # a bias: MatMulAddToConv takes both
            add = uses[0].node
            other = add.inputs[1 - uses[0].idx]
            weight = _constant(v["w"])
            bias = _constant(other)
            if weight is not None and bias is not None and _bias_vector(bias, weight.shape[-1]) is not False:
                return rewriter.MatchResult().fail("a bias Add follows")
        return super().check(op, *args, **v)


def rules() -> list[Any]:
    """The onnxscript rewrite rules of :func:`linear_to_conv`, to combine with other rules."""
    add = MatMulAddToConv().rule().commute()  # Add(MatMul(x, W), b) and Add(b, MatMul(x, W))
    return [*add, MatMulToConv().rule(), GemmBiasToConv().rule(), GemmToConv().rule()]


def linear_to_conv_model(proto: Any) -> tuple[Any, dict[str, int]]:
    """:func:`linear_to_conv` on a ``ModelProto`` in memory; the new model and what was rewritten."""
    require_tensor_outputs(proto)
    before = op_counts(proto)
    proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)  # the ranks the MatMul rules need
    out = rewriter.rewrite(proto, pattern_rewrite_rules=rules())
    after = op_counts(out)
    done = Counter({f"{op} -> Conv": before.get(op, 0) - after.get(op, 0) for op in ("Gemm", "MatMul")})
    return out, {k: v for k, v in done.items() if v > 0}


def left_nodes(proto: Any) -> dict[str, str]:
    """Every Gemm / MatMul of ``proto`` (a rewritten model), named, with why it was not rewritten."""
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto, data_prop=True))
    left = {}
    for i, node in enumerate(model.graph):
        if node.op_type in LINEAR_OPS:
            left[f"{node.op_type} {node.name or f'#{i}'!r}"] = _why_left(node)
    return left


def _why_left(node: Any) -> str:
    weight = _constant(node.inputs[1])
    if weight is None:
        return "its weight B is computed, not a constant"
    if weight.ndim != 2:
        return f"its weight B {format_shape(weight.shape)} is not a matrix"
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
            return "transA or alpha is set"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if _attr(node, "beta", 1.0) != 1.0:
                return "beta is set"
            return "its bias C is not a constant vector over the columns"
    x = node.inputs[0]
    if x.shape is None or not 2 <= len(x.shape) <= 5:
        return "the rank of its input A is not inferred by ONNX shape inference, or not 2 to 5"
    return "no rule matched it (a bias that is not a constant vector?)"


def require_tensor_outputs(proto: Any) -> None:
    """Refuse a graph with an output that is not a tensor (a ZipMap's sequence of maps, a sequence)."""
    for out in proto.graph.output:
        kind = out.type.WhichOneof("value")
        if kind != "tensor_type":
            zipmap = any(n.op_type == "ZipMap" and out.name in n.output for n in proto.graph.node)
            what = "a sequence of maps (ZipMap)" if zipmap else f"a {kind.replace('_type', '')}, not a tensor"
            raise FcconvError(
                f"The model's output {out.name!r} is {what}; fcconv.onnx rewrites and checks graphs whose "
                "outputs are tensors. Export without it (skl2onnx: options={'zipmap': False}) or remove it."
            )


def linear_to_conv(src: str | Path, dst: str | Path, *, certify: str = "float64",
                   allow_partial: bool = False) -> OnnxReport:
    """Rewrite every Gemm / MatMul(+Add) with constant weights in ``src`` as a 1x1 Conv, into ``dst``.

    The rewritten file is run in onnxruntime beside the original on one random input (symbolic
    dims: batch 1, others 64) and every output is compared. The verdict is float64: both files are
    cast to float64 and run with ``onnx.reference`` on that input, where every output must agree to
    :data:`fcconv.certify.FLOAT64_RTOL`.

    Args:
        src: the ONNX file to read (never written).
        dst: the file to write, atomically.
        certify: ``"float64"`` (the verdict above) or ``"float32"`` (onnxruntime only), for models
            too big to run in ``onnx.reference``.
        allow_partial: write the file even when a Gemm / MatMul is left (named in ``report.left``).

    Returns:
        An :class:`OnnxReport` with the op counts, what was rewritten and what was left, and why.

    Raises:
        FcconvError: if ``src`` is not a valid ONNX model, has an output that is not a tensor (ZipMap),
            a Gemm / MatMul is left and not ``allow_partial``, or the result does not run.
        NotEquivalentError: if an output differs in shape or is not finite, or differs in float64.

    Example:
        >>> report = fcconv.onnx.linear_to_conv("resnet18.onnx", "resnet18-conv.onnx")
        >>> report.conv_only
        True
    """
    float64 = check_certify(certify)
    check_output(dst, src)
    proto = load(src)
    out, done = linear_to_conv_model(proto)
    left = left_nodes(out)
    if left and not allow_partial:
        reasons = "; ".join(f"{node}: {why}" for node, why in left.items())
        raise FcconvError(f"{len(left)} Gemm/MatMul node(s) of {str(src)!r} could not be rewritten "
                          f"({reasons}). Pass allow_partial=True (--allow-partial) to write the file with "
                          "them left.")
    checks = _check_against_file(proto, out, "the rewritten model", float64)
    save(out, dst)
    return OnnxReport(str(dst), checks, op_counts(out), symbolic_dims(out), done, left)


def _check_against_file(original: Any, rewritten: Any, what: str, float64: bool) -> tuple[SizeCheck, ...]:
    """Run both models in onnxruntime on one random input and measure the difference of every output;
    with ``float64``, run both cast to float64 with ``onnx.reference`` and give the verdict.

    No float32 rounding bound is derived here: onnxruntime is a black box to :func:`fcconv.compare`;
    with ``float64`` the float32 check is the error ratio against the original file's float64 run.
    """
    import torch

    shape = example_shape(original)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    names = [o.name for o in original.graph.output]
    expected, got = run_all(session(original), x), run_all(session(rewritten), x)
    if float64:
        x64 = x.double().numpy()
        want64 = run_reference_outputs(to_float64(original), x64, "the original file")
        got64 = run_reference_outputs(to_float64(rewritten), x64, what)
    checks = []
    for i, (name, want, have) in enumerate(zip(names, expected, got)):
        several = len(names) > 1
        which = f"{what} (output {name!r})" if several else what
        if have.shape != want.shape or not bool(torch.isfinite(have.double()).all()):
            raise NotEquivalentError(
                f"{which} gives {format_shape(have.shape)} on {format_shape(shape)} where the original "
                f"gives {format_shape(want.shape)}, or non-finite values."
            )
        diff = float((have.double() - want.double()).abs().max()) if have.numel() else 0.0
        scale = float(want.double().abs().max()) if have.numel() else 0.0
        rel64 = ratio = None
        if float64:
            rel64 = verdict(want64[i], got64[i], which, "the original file", tuple(shape))
            if want.is_floating_point() and have.is_floating_point():
                ratio = check_ratio(ratio_of(want, have, want64[i]), which, "the original file", tuple(shape))
        checks.append(SizeCheck(tuple(shape), tuple(have.shape), diff, diff / scale if scale else diff, None,
                                None, rel64, error_ratio=ratio, output=name if several else None))
    return tuple(checks)


def example_shape(proto: Any, sizes: dict[str, int] | None = None) -> tuple[int, ...]:
    """The input shape of ``proto`` with symbolic dims filled: batch 1, others from ``sizes`` or 64."""
    names = {init.name for init in proto.graph.initializer}
    graph_input = next(i for i in proto.graph.input if i.name not in names)
    dims = []
    for i, dim in enumerate(graph_input.type.tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(1 if i == 0 else (sizes or {}).get(dim.dim_param, 64))
    return tuple(dims)
