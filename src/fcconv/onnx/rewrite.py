"""``fcconv.onnx.linear_to_conv``: every Gemm / MatMul(+Add) with constant weights becomes a 1x1 Conv.

Rewrite rules of the onnxscript rewriter (a pattern, a check, a replacement), the ONNX twin of
:func:`fcconv.linear_to_pointwise`: the weight ``(M, K)`` becomes a ``(M, K, 1, 1)`` kernel and the
rows of the input become the batch of a ``1x1`` image.

Before: ``x (N, K) -> Gemm(W, b, transB=1) -> (N, M)``.
After: ``x -> Unsqueeze(2, 3) -> Conv(W[:, :, None, None], b) -> Squeeze(2, 3) -> (N, M)``.
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
from fcconv.errors import NotEquivalentError
from fcconv.onnx._check import OnnxReport, SizeCheck, check_ratio, ratio_of
from fcconv.onnx._float64 import check_certify, run_reference, to_float64, verdict
from fcconv.onnx._runtime import check_output, load, op_counts, run, save, session, symbolic_dims

__all__ = ["linear_to_conv", "linear_to_conv_model", "rules"]


def _constant(value: Any) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy())
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return np.asarray(node.attributes["value"].as_tensor().numpy())
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
    axes = op.initializer(ir.tensor(np.array([2, 3], dtype=np.int64)), f"{name}_axes")
    kernel = op.initializer(ir.tensor(np.ascontiguousarray(weight[:, :, None, None])), f"{name}_kernel")
    inputs = [op.Unsqueeze(x2d, axes), kernel]
    if bias is not None:
        inputs.append(op.initializer(ir.tensor(np.ascontiguousarray(bias)), f"{name}_bias"))
    return op.Squeeze(op.Conv(*inputs, kernel_shape=[1, 1]), axes)


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
        if x.shape is None or len(x.shape) < 2:
            return result.fail("the input's rank is unknown or below 2")
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
        name = f"{name}_{next(_names)}"
        rows = op.initializer(ir.tensor(np.array([-1, weight.shape[0]], dtype=np.int64)), f"{name}_rows")
        cols = op.initializer(ir.tensor(np.array([weight.shape[1]], dtype=np.int64)), f"{name}_cols")
        y = _pointwise(op, op.Reshape(x, rows), weight.T, bias, name)
        return op.Reshape(y, op.Concat(op.Shape(x, start=0, end=-1), cols, axis=0))


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
    before = op_counts(proto)
    proto = onnx.shape_inference.infer_shapes(proto)  # the ranks the MatMul rules need
    out = rewriter.rewrite(proto, pattern_rewrite_rules=rules())
    after = op_counts(out)
    done = Counter({f"{op} -> Conv": before.get(op, 0) - after.get(op, 0) for op in ("Gemm", "MatMul")})
    return out, {k: v for k, v in done.items() if v > 0}


def linear_to_conv(src: str | Path, dst: str | Path, *, certify: str = "float64") -> OnnxReport:
    """Rewrite every Gemm / MatMul(+Add) with constant weights in ``src`` as a 1x1 Conv, into ``dst``.

    The rewritten file is run in onnxruntime beside the original on one random input (symbolic
    dims: batch 1, others 64) and the difference is reported. The verdict is float64: both files are
    cast to float64 and run with ``onnx.reference`` on that input, where they must agree to
    :data:`fcconv.certify.FLOAT64_RTOL`.

    Args:
        src: the ONNX file to read (never written).
        dst: the file to write, atomically.
        certify: ``"float64"`` (the verdict above) or ``"float32"`` (onnxruntime only), for models
            too big to run in ``onnx.reference``.

    Returns:
        An :class:`OnnxReport` with the op counts and what was rewritten.

    Raises:
        FcconvError: if ``src`` is not a valid ONNX model or the result does not run.
        NotEquivalentError: if the outputs differ in shape or are not finite, or differ in float64.

    Example:
        >>> report = fcconv.onnx.linear_to_conv("resnet18.onnx", "resnet18-conv.onnx")
        >>> report.conv_only
        True
    """
    float64 = check_certify(certify)
    check_output(dst, src)
    proto = load(src)
    out, done = linear_to_conv_model(proto)
    checks = (_check_against_file(proto, out, "the rewritten model", float64),)
    save(out, dst)
    return OnnxReport(str(dst), checks, op_counts(out), symbolic_dims(out), done)


def _check_against_file(original: Any, rewritten: Any, what: str, float64: bool) -> SizeCheck:
    """Run both models in onnxruntime on one random input and measure the difference; with
    ``float64``, run both cast to float64 with ``onnx.reference`` and give the verdict.

    No float32 rounding bound is derived here: onnxruntime is a black box to :func:`fcconv.compare`;
    with ``float64`` the float32 check is the error ratio against the original file's float64 run.
    """
    import torch

    shape = example_shape(original)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    expected = run(session(original), x)
    got = run(session(rewritten), x)
    if got.shape != expected.shape or not bool(torch.isfinite(got).all()):
        raise NotEquivalentError(
            f"{what} gives an output {format_shape(got.shape)} on {format_shape(shape)} where the original "
            f"gives {format_shape(expected.shape)}, or non-finite values."
        )
    diff = float((got - expected).abs().max()) if got.numel() else 0.0
    scale = float(expected.abs().max()) if got.numel() else 0.0
    rel64 = ratio = None
    if float64:
        x64 = x.double().numpy()
        expected64 = run_reference(to_float64(original), x64, "the original file")
        got64 = run_reference(to_float64(rewritten), x64, what)
        rel64 = verdict(expected64, got64, what, "the original file", tuple(shape))
        ratio = check_ratio(ratio_of(expected, got, expected64), what, "the original file", tuple(shape))
    return SizeCheck(tuple(shape), tuple(got.shape), diff, diff / scale if scale else diff, None, None, rel64,
                     error_ratio=ratio)


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
