"""The check of a convolutionalized ONNX file at a size larger than the training size.

A map is checked against a reference that does not come from the surgery:

* where the graph is local (no padding, no ``ceil_mode``, no global statistic left in the body),
  each cell must equal the ORIGINAL file run on that cell's crop;
* otherwise the original file is translated to PyTorch by ``onnx2torch`` (a translator fcconv does not
  own) and the map must equal :func:`fcconv.convolutionalize` of the translation;
* where neither can be run, the size is reported as unverified, with the reason.

In float64 (``certify="float64"``) both sides run in float64 (``onnx.reference`` for ONNX) and must agree
to :data:`fcconv.certify.FLOAT64_RTOL`; in float32 the difference is measured and reported only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from onnx import helper

from fcconv._shapes import format_shape
from fcconv.errors import NotEquivalentError
from fcconv.onnx._check import SizeCheck
from fcconv.onnx._float64 import float64_rel, run_reference, to_float64, verdict
from fcconv.onnx._runtime import run

__all__ = ["check_larger_size", "is_local", "stride_of"]

#: Ops whose output cell depends only on a fixed window of the input (when unpadded).
_LOCAL = {"Conv", "MaxPool", "AveragePool", "LpPool", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip",
          "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Erf", "Gelu", "Identity", "Dropout", "Softplus",
          "Softsign", "Mish", "Cast", "BatchNormalization", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp",
          "Log", "Abs", "Neg", "Reciprocal", "Min", "Max", "Where", "Transpose", "Softmax", "LogSoftmax",
          "Hardmax", "Constant", "LayerNormalization"}


def _attrs(node: Any) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def is_local(model: Any) -> str | None:
    """None when every node of ``model`` computes a cell from a fixed window; else why not."""
    for node in model.graph.node:
        attrs = _attrs(node)
        name = f"node {node.name or '(unnamed)'!r} ({node.op_type})"
        if node.op_type not in _LOCAL:
            return f"{name} is not a local op"
        if any(attrs.get("pads", [])) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
            return f"{name} pads its input"
        if attrs.get("ceil_mode", 0):
            return f"{name} rounds its output size up (ceil_mode)"
    return None


def to_file(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x (N, C, H, W)`` in the layout of the file's input: ``(N, H, W, C)`` when it is channels last."""
    return x.permute(0, 2, 3, 1) if channels_last else x


def _grid(sess: Any, channels: int, size: tuple[int, int], channels_last: bool = False) -> tuple[int, ...]:
    y = run(sess, to_file(torch.zeros(1, channels, *size), channels_last))
    return tuple(y.shape[2:])


def _first_growth(sess: Any, shape: tuple[int, ...], axis: int, cells: int, last: bool) -> int:
    """The smallest growth of the input along ``axis`` that gives at least ``cells`` cells there."""
    lo, hi = 1, 4 * shape[1 + axis]
    if _grid(sess, shape[0], _grown(shape, axis, hi), last)[axis] < cells:
        raise NotEquivalentError(f"Growing the input by {hi} pixels along axis {axis + 2} gives fewer than "
                                 f"{cells} cells: the result does not give a map of several cells.")
    while lo < hi:  # the grid grows with the size
        mid = (lo + hi) // 2
        if _grid(sess, shape[0], _grown(shape, axis, mid), last)[axis] >= cells:
            hi = mid
        else:
            lo = mid + 1
    return lo


def stride_of(sess: Any, shape: tuple[int, ...], channels_last: bool = False) -> tuple[int, int]:
    """The pixels between cells: per axis, the growth of the input between the 2nd and the 3rd cell.

    Raises:
        FcconvError: if the model does not run at a size (a shape frozen in its body).
        NotEquivalentError: if no growth up to four training sizes adds two cells.
    """
    sy, sx = (_first_growth(sess, shape, axis, 3, channels_last)
              - _first_growth(sess, shape, axis, 2, channels_last) for axis in (0, 1))
    return sy, sx


def _grown(shape: tuple[int, ...], axis: int, by: int) -> tuple[int, int]:
    size = [shape[1], shape[2]]
    size[axis] += by
    return size[0], size[1]


def check_larger_size(original: Any, fcn: Any, sess: Any, shape: tuple[int, ...], float64: bool,
                      channels_last: bool = False) -> SizeCheck:
    """Run ``fcn`` at a larger non-square size and check its map against an independent reference.

    ``shape`` is ``(C, H, W)``; a ``channels_last`` file is fed ``(N, H, W, C)``.

    Raises:
        NotEquivalentError: if the map has fewer cells than the crops the stride places, or (in float64)
            differs from the reference by more than :data:`fcconv.certify.FLOAT64_RTOL`.
    """
    local = is_local(fcn)
    if local is not None:
        big = (1, shape[0], shape[1] + shape[1] // 2 + 1, shape[2] + shape[2] // 4 + 3)
        x = torch.randn(big, generator=torch.Generator().manual_seed(1))
        got = _run(fcn, to_file(x, channels_last), float64, "the convolutionalized file")
        if got.ndim != 4 or got.shape[0] != 1:
            raise NotEquivalentError(f"At input {format_shape(big)} the result gives "
                                     f"{format_shape(got.shape)}: not one map for one image (a shape in its "
                                     "body is fixed at export).")
        expected, why = _translated(original, x, shape, float64, channels_last)
        if expected is None:
            return SizeCheck(big, tuple(got.shape), float("nan"), float("nan"), None, None,
                             unverified=f"{local}, and {why}")
        by = "against fcconv.convolutionalize of the onnx2torch translation of the original file"
    else:
        sy, sx = stride_of(sess, shape, channels_last)
        big = (1, shape[0], shape[1] + sy, shape[2] + 2 * sx)
        x = torch.randn(big, generator=torch.Generator().manual_seed(1))
        got = _run(fcn, to_file(x, channels_last), float64, "the convolutionalized file")
        if got.ndim != 4 or tuple(got.shape[2:]) != (2, 3):
            raise NotEquivalentError(
                f"At input {format_shape(big)} the result gives {format_shape(got.shape)}; its stride "
                f"({sy}, {sx}) over the window {format_shape(shape[1:])} places (2, 3) cells."
            )
        expected = _crops(original, x, shape, (sy, sx), float64, channels_last).reshape(got.shape)
        by = f"each cell against the original file on its crop (stride {sy}x{sx})"
    if expected.shape != got.shape:
        raise NotEquivalentError(f"At input {format_shape(big)} the result gives {format_shape(got.shape)} "
                                 f"where the reference gives {format_shape(expected.shape)}.")
    rel64 = verdict(expected, got, "the convolutionalized file", "the reference", big) if float64 else None
    diff = float(np.abs(got.astype(np.float64) - expected).max())
    return SizeCheck(big, tuple(got.shape), diff, float64_rel(expected, got), None, None, rel64,
                     verified_by=by)


def _run(model: Any, x: torch.Tensor, float64: bool, what: str) -> np.ndarray:
    if float64:
        return run_reference(to_float64(model), x.double().numpy(), what)
    from fcconv.onnx._runtime import session

    return run(session(model), x).numpy()


def _crops(original: Any, x: torch.Tensor, shape: tuple[int, ...], stride: tuple[int, int], float64: bool,
           channels_last: bool, grid: tuple[int, int] = (2, 3)) -> np.ndarray:
    """The original file's scores on every cell's crop, as a ``(M, *grid)`` array."""
    if float64:
        proto = to_float64(original)
        one = lambda crop: run_reference(proto, to_file(crop, channels_last).double().numpy(),  # noqa: E731
                                         "the original file")
    else:
        from fcconv.onnx._runtime import session

        sess = session(original)
        one = lambda crop: run(sess, to_file(crop, channels_last)).numpy()  # noqa: E731
    cells = [[one(x[:, :, i * stride[0]:i * stride[0] + shape[1], j * stride[1]:j * stride[1] + shape[2]])
              .reshape(-1) for j in range(grid[1])] for i in range(grid[0])]
    return np.asarray(cells).transpose(2, 0, 1)


def _for_onnx2torch(proto: Any) -> Any:
    """``proto`` with Identity nodes removed, Constant nodes lifted to initializers and ``Add(MatMul)`` of
    rank-2 values fused to Gemm (onnxscript's rule): onnx2torch reads Conv and Gemm weights from
    initializers only (exporters share weights through Identity) and turns only Gemm into a Linear
    (tf2onnx writes Keras' Dense as MatMul + Add)."""
    import onnx
    import onnx_ir as ir
    import onnx_ir.passes.common as passes
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.rules.common import matmul_add_to_gemm_rule

    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    passes.LiftConstantsToInitializersPass()(model)
    passes.IdentityEliminationPass()(model)
    model = rewrite(model, [matmul_add_to_gemm_rule, _matmul_to_gemm_rule()])
    return ir.serde.serialize_model(model)


def _matmul_to_gemm_rule() -> Any:
    """``MatMul(a, b)`` of rank-2 values, ``b`` constant -> ``Gemm(a, b)`` (a MatMul with no bias)."""
    from onnxscript.rewriter import pattern

    def check(context: Any, a: Any, b: Any) -> bool:
        del context
        return (a.shape is not None and len(a.shape) == 2 and b.const_value is not None
                and len(b.const_value.shape) == 2)

    return pattern.RewriteRule(lambda op, a, b: op.MatMul(a, b), lambda op, a, b: op.Gemm(a, b), check)


def _opaque_modules() -> tuple[type, ...]:
    """onnx2torch's elementwise modules with control flow on values (integer division): kept whole."""
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation

    return (OnnxBinaryMathOperation,)


class _ChannelsLast(torch.nn.Module):
    """A translated channels-last file behind a permute: it takes ``(N, C, H, W)`` as fcconv's models do."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.permute(0, 2, 3, 1))


def _translated(original: Any, x: torch.Tensor, shape: tuple[int, ...], float64: bool,
                channels_last: bool = False) -> tuple[np.ndarray | None, str]:
    """``fcconv.convolutionalize`` of onnx2torch's translation of ``original``, run on ``x (N, C, H, W)``
    (a channels-last file's translation is fed through a permute)."""
    try:
        from onnx2torch import convert
    except ImportError:
        return None, "onnx2torch is not installed to translate it (pip install onnx2torch)"
    from fcconv.models import convolutionalize

    errors = []
    for leaves in ((), _opaque_modules()):  # traced through, then with the elementwise modules kept whole
        try:
            module = convert(_for_onnx2torch(original)).eval()
            module = _ChannelsLast(module).eval() if channels_last else module
            fcn = convolutionalize(module, shape, leaf_modules=leaves)
            dtype = torch.float64 if float64 else torch.float32
            with torch.no_grad():
                return fcn.to(dtype)(x.to(dtype)).numpy(), ""
        except Exception as error:  # any failure of the translation: the size stays unverified, said so
            errors.append(" ".join(str(error).split())[:200] or type(error).__name__)
    return None, f"its onnx2torch translation could not be convolutionalized ({errors[0]})"
