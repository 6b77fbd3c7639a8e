"""``fcconv.onnx.float16_error_ratio``: is a file as accurate as the original in onnxruntime's float16?

Both files are converted to float16 with onnxconverter-common (``convert_float_to_float16``, inputs
and outputs kept float32), run in onnxruntime on the same seeded input, and compared with the
original file run in float64 by ``onnx.reference``: the error ratio of :func:`fcconv.certify.error_ratio`,
about 1 when the candidate adds no error beyond what float16 does to the original.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fcconv._deps import require
from fcconv.certify import RatioMeasure, error_ratio
from fcconv.errors import FcconvError
from fcconv.onnx._float64 import run_reference, to_float64
from fcconv.onnx._runtime import load, run, session
from fcconv.onnx.rewrite import example_shape

__all__ = ["float16_error_ratio"]


def float16_error_ratio(original: str | Path, candidate: str | Path, *, seed: int = 0,
                        sizes: dict[str, int] | None = None) -> RatioMeasure:
    """The candidate's float16 deviation from the original's float64 function over the original's own.

    Args:
        original: the ONNX file taken as correct (float32), e.g. the classifier.
        candidate: the file to check, e.g. what :func:`fcconv.onnx.convolutionalize` wrote from it,
            with an output of the same size at the original's input shape.
        seed: seed of the standard normal input.
        sizes: values of symbolic input dims (default: batch 1, others 64).

    Returns:
        A :class:`~fcconv.certify.RatioMeasure`: ``ratio`` at most
        :data:`fcconv.certify.ERROR_RATIO_MAX` for a conversion that adds no float16 error.

    Raises:
        FcconvError: if onnxconverter-common is missing, a file does not convert or run in float16, or
            the outputs differ in size.

    Example:
        >>> fcconv.onnx.float16_error_ratio("resnet18.onnx", "resnet18-fcn.onnx").ratio  # about 1
    """
    float16 = require("onnxconverter_common.float16", extra="onnx", feature="The float16 error ratio")
    ref, cand = load(original), load(candidate)
    shape = example_shape(ref, sizes)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    ref16, cand16 = (_run_float16(float16, p, x, str(f)) for p, f in ((ref, original), (cand, candidate)))
    if ref16.numel() != cand16.numel():
        raise FcconvError(f"{candidate} gives {cand16.numel()} values on an input {tuple(shape)} where "
                          f"{original} gives {ref16.numel()}; compare files with outputs of the same size.")
    ref64 = torch.from_numpy(run_reference(to_float64(ref), x.double().numpy(), str(original)))
    return error_ratio([ref16], [cand16.reshape(ref16.shape)], [ref64.reshape(ref16.shape)])


def _run_float16(float16: Any, proto: Any, x: torch.Tensor, what: str) -> torch.Tensor:
    try:
        half = float16.convert_float_to_float16(proto, keep_io_types=True)
    except Exception as error:
        raise FcconvError(f"onnxconverter-common could not convert {what} to float16: "
                          f"{' '.join(str(error).split())[:300]}") from None
    return run(session(half), x)
