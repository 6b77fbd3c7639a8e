"""``fcconv.onnx.export``: a PyTorch model to an ONNX file, checked in onnxruntime at several sizes."""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcconv._shapes import check_input_shape, format_shape
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.models.fcn import FullyConvolutional
from fcconv.models.modules import UnfoldConv1d, UnfoldConv2d, UnfoldConv3d
from fcconv.onnx._check import OnnxReport, SizeCheck, check_ratio, check_size, check_sizes_for
from fcconv.onnx._float64 import check_certify, run_reference, verdict
from fcconv.onnx._runtime import (
    LINEAR_OPS,
    check_output,
    op_counts,
    require,
    run,
    save,
    session,
    symbolic_dims,
)
from fcconv.onnx.rewrite import linear_to_conv_model

__all__ = ["export"]

_SPATIAL_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def export(module: nn.Module, path: str | Path, input_shape: Sequence[int], *, dynamic: bool = True,
           conv_only: bool = False, check_sizes: Sequence[Sequence[int]] | None = None,
           certify: str = "float64") -> OnnxReport:
    """Export ``module`` to ONNX (``torch.onnx.export(..., dynamo=True)``) and check the file.

    The file is run in onnxruntime (batch 1) at the training size and at the other sizes the module
    accepts (a :class:`~fcconv.FullyConvolutional`: its ``min_size`` and a non-square odd size;
    another module: the training size only), or at ``check_sizes``, and compared with the module within
    the float32 rounding bound :func:`fcconv.compare` derives and by the error ratio (onnxruntime's
    deviation from the float64 module over the float32 module's own, at most
    :data:`fcconv.certify.ERROR_RATIO_MAX`; also with ``certify="float32"``). The verdict is float64, as in
    :func:`fcconv.compare`: a float64 copy of the module is exported the same way and run with
    ``onnx.reference`` at the same sizes; its outputs must agree with the copy's to
    :data:`fcconv.certify.FLOAT64_RTOL`. It is written atomically, and only when every check passes.

    Args:
        module: the model, in eval mode (e.g. ``fcconv.convolutionalize(model, input_shape)``).
        path: the ``.onnx`` file to write.
        input_shape: the per-sample training shape ``(C, *spatial)``.
        dynamic: symbolic batch size, and symbolic spatial sizes when more than the training size
            is checked; False exports the training shape only.
        conv_only: turn every Gemm and MatMul with constant weights into a 1x1 Conv
            (:func:`fcconv.onnx.linear_to_conv`) and check that none is left.
        check_sizes: the spatial sizes to check besides the training size, e.g. ``[(300, 257)]``.
        certify: ``"float64"`` (the verdict above) or ``"float32"`` (onnxruntime only: in deep models
            it catches wrong shapes and non-finite values, not wrong weights), for models too big
            to run in ``onnx.reference`` (resnet18 at 224 x 224: about 1 s per size).

    Returns:
        An :class:`OnnxReport`: the sizes checked, their differences, the op counts.

    Raises:
        FcconvError: if the module cannot be exported (with symbolic sizes: which sizes were asked),
            onnxruntime cannot run the file at a checked size, or ``conv_only`` leaves a Gemm/MatMul.
        NotEquivalentError: if onnxruntime's output differs by more than rounding, or the float64
            file's by more than ``FLOAT64_RTOL`` (naming the size and the difference).

    Example:
        >>> fcn = fcconv.convolutionalize(torchvision.models.resnet18().eval(), (3, 224, 224))
        >>> print(fcconv.onnx.export(fcn, "resnet18-fcn.onnx", (3, 224, 224), conv_only=True))
    """
    require("onnxscript")
    float64 = check_certify(certify)
    shape = check_input_shape(input_shape)
    check_output(path)
    if not isinstance(module, nn.Module):
        raise FcconvError(f"export expects a torch.nn.Module; got {type(module).__name__}.")
    sizes = check_sizes_for(module, shape, check_sizes)
    if not dynamic and len(sizes) > 1:
        raise FcconvError(
            f"dynamic=False exports the training size {format_shape(shape[1:])} only; check_sizes asks for "
            f"{', '.join(format_shape(s) for s in sizes[1:])}. Pass dynamic=True (drop --static)."
        )
    module = _exportable(module)
    dims = _dynamic_dims(shape, sizes) if dynamic else {}
    proto = _export(module, shape, sizes, dims)
    rewritten: dict[str, int] = {}
    if conv_only:
        proto, rewritten = linear_to_conv_model(proto)
        _check_conv_only(proto)
    sess = _session(proto, sizes)
    checks = []
    for i, spatial in enumerate(sizes):
        x = _example(module, (1, shape[0], *spatial))
        try:
            checks.append(check_size(module, sess, x, "the exported ONNX model"))
        except NotEquivalentError:
            raise
        except FcconvError as error:  # onnxruntime failed: a shape frozen at export
            if i == 0 or not dynamic:
                raise
            raise FcconvError(
                f"The exported file runs at the training size {format_shape(shape[1:])} but not at "
                f"{format_shape(spatial)} (sizes tried: {', '.join(format_shape(s) for s in sizes)}): "
                f"a shape was frozen at export, so it works at a fixed size only. {error} Pass dynamic=False "
                "(--static) for a fixed-size file, or make the model size-agnostic."
            ) from None
    if dynamic:
        _check_batch(module, sess, shape)
    if float64:
        checks = _certify_float64(module, shape, sizes, dims, conv_only, checks)
    for check in checks:  # the float32 verdict, after the float64 one (which says more when both fail)
        check_ratio(check.error_ratio, "the exported ONNX model", "the PyTorch module", check.input_shape)
    save(proto, path)
    return OnnxReport(str(path), tuple(checks), op_counts(proto), symbolic_dims(proto), rewritten)


def _certify_float64(module: nn.Module, shape: tuple[int, ...], sizes: list[tuple[int, ...]],
                     dims: dict[int, Any], conv_only: bool, checks: list[SizeCheck]) -> list[SizeCheck]:
    """The float64 verdict: a float64 copy exported the same way, run with ``onnx.reference``.

    The exporter's constant folding (batch norm into the conv weights) then happens in float64 too,
    so a correct file agrees with the copy to float64 rounding (about 1e-15 on resnet18).
    """
    module64 = copy.deepcopy(module).to(torch.float64)
    skip = "Pass certify='float32' (--certify float32) to skip the float64 verdict."
    try:
        proto = _export(module64, shape, sizes, dims)
    except FcconvError as error:
        raise FcconvError(f"The float32 file is checked, but a float64 copy of the module does not export, "
                          f"so there is no float64 verdict: {error} {skip}") from None
    if conv_only:
        proto, _ = linear_to_conv_model(proto)
    out = []
    for check in checks:
        x = _example(module, check.input_shape).to(torch.float64)  # the float32 check's input, exact
        with torch.no_grad():  # runs: the float32 check's compare ran a float64 copy too
            expected = module64(x).detach().cpu().numpy()
        got = run_reference(proto, x.cpu().numpy(), "the exported ONNX model")
        rel = verdict(expected, got, "the exported ONNX model", "the PyTorch module", check.input_shape)
        out.append(dataclasses.replace(check, float64_max_rel=rel))
    return out


def _check_batch(module: nn.Module, sess: Any, shape: tuple[int, ...]) -> None:
    """The batch dim is symbolic: a batch of 3 gives 3 outputs (the values are checked at batch 1)."""
    x = _example(module, (3, *shape))
    with torch.no_grad():
        expected = module(x)
    got = run(sess, x)
    if tuple(got.shape) != tuple(expected.shape):
        raise NotEquivalentError(
            f"The exported file gives {format_shape(got.shape)} for a batch of 3 where PyTorch gives "
            f"{format_shape(expected.shape)}: the batch size was frozen at export."
        )


def _exportable(module: nn.Module) -> nn.Module:
    """A FullyConvolutional computes its large-kernel head as plain convs in the file.

    ``head_impl='auto'`` picks unfold + matmul for PyTorch on CPU, by input size; ONNX runtimes get the
    conv, which is the same function (a copy is changed, never the module).
    """
    if isinstance(module, FullyConvolutional) and module.head_impl != "conv":
        module = copy.deepcopy(module)
        for sub in module.modules():
            if isinstance(sub, (UnfoldConv1d, UnfoldConv2d, UnfoldConv3d)):
                sub.method = "conv"
    return module


def _dynamic_dims(shape: tuple[int, ...], sizes: list[tuple[int, ...]]) -> dict[int, Any]:
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1)}
    ndim = len(shape) - 1
    if len(sizes) > 1:
        for i, name in enumerate(_SPATIAL_NAMES[ndim]):
            low = min(s[i] for s in sizes)
            if any(s[i] != shape[1 + i] for s in sizes):
                dims[2 + i] = torch.export.Dim(name, min=max(2, low))
    return dims


def _example(module: nn.Module, full: tuple[int, ...]) -> torch.Tensor:
    dtype, device = torch.float32, torch.device("cpu")
    for t in module.parameters():
        dtype, device = t.dtype, t.device
        break
    return torch.randn(full, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx prints progress and warnings; fcconv's report says what matters."""
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch").setLevel(level)


def _export(module: nn.Module, shape: tuple[int, ...], sizes: list[tuple[int, ...]],
            dims: dict[int, Any]) -> Any:
    batch = 2 if 0 in dims else 1
    x = _example(module, (batch, *shape))
    try:
        with _quiet():
            program = torch.onnx.export(
                module, (x,), dynamo=True, dynamic_shapes=(dims,) if dims else None, input_names=["input"],
                output_names=["output"], optimize=True, verbose=False)
    except Exception as error:
        text = _cause(error)
        if len(dims) > 1:
            raise FcconvError(
                f"{type(module).__name__} does not export with symbolic spatial sizes: torch.export refused "
                f"sizes {', '.join(format_shape(s) for s in sizes)} ({text}). It exports at a fixed size "
                "only: pass dynamic=False (--static), or make the model size-agnostic (e.g. "
                "fcconv.convolutionalize)."
            ) from None
        raise FcconvError(f"torch.onnx.export failed on {type(module).__name__} at input "
                          f"{format_shape(x.shape)}: {text}") from None
    if program is None:
        raise FcconvError("torch.onnx.export returned no program; fcconv needs torch >= 2.6 for dynamo=True.")
    proto = program.model_proto
    graph_dims = proto.graph.input[0].type.tensor_type.shape.dim
    fixed = [f"{dims[i].__name__} = {d.dim_value}" for i, d in enumerate(graph_dims)
             if i in dims and i > 0 and d.HasField("dim_value")]
    if fixed:
        tried = ", ".join(format_shape(s) for s in sizes)
        raise FcconvError(
            f"{type(module).__name__} exports at a fixed size only: torch.export fixed {', '.join(fixed)} "
            f"(sizes tried: {tried}), as the model's code depends on it. Pass dynamic=False (--static) "
            "for a fixed-size file, or make the model size-agnostic (e.g. fcconv.convolutionalize)."
        )
    return proto


def _cause(error: BaseException) -> str:
    """The innermost message of an export error, on one line (torch.onnx wraps torch.export's)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300] + ("..." if len(text) > 300 else "")


def _session(proto: Any, sizes: list[tuple[int, ...]]) -> Any:
    try:
        return session(proto)
    except Exception as error:
        raise FcconvError(f"onnxruntime cannot load the exported model: {' '.join(str(error).split())[:300]}"
                          ) from None


def _check_conv_only(proto: Any) -> None:
    left = [f"{n.name or '(unnamed)'} ({n.op_type})" for n in proto.graph.node if n.op_type in LINEAR_OPS]
    if left:
        raise FcconvError(
            f"conv_only=True but {len(left)} node(s) could not become convolutions: {', '.join(left[:5])}. "
            "Only Gemm/MatMul with constant weights can; export without conv_only for this model."
        )
