"""Deploying fcconv's models as ONNX: export checked in onnxruntime, conv-only graphs, surgery on files.

Needs the ``onnx`` extra (``pip install 'fcconv[onnx]'``: onnx, onnxruntime, onnxscript).

Example:
    >>> import fcconv.onnx
    >>> report = fcconv.onnx.export(fcn, "model.onnx", (3, 224, 224), conv_only=True)
"""

from fcconv.onnx._runtime import require

for _name in ("onnx", "onnxruntime", "onnxscript", "onnx_ir"):
    require(_name)

from fcconv.onnx._check import OnnxReport, SizeCheck  # noqa: E402 - after the check of the extra
from fcconv.onnx.export import export  # noqa: E402
from fcconv.onnx.precision import float16_error_ratio  # noqa: E402
from fcconv.onnx.rewrite import linear_to_conv  # noqa: E402
from fcconv.onnx.surgery import convolutionalize  # noqa: E402

__all__ = ["OnnxReport", "SizeCheck", "convolutionalize", "export", "float16_error_ratio", "linear_to_conv"]
