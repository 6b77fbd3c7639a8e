"""The optional dependencies, reading and writing ONNX files, and running them in onnxruntime."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fcconv._deps import need_onnx as require
from fcconv._io import atomic_output, check_output_path
from fcconv.errors import FcconvError

__all__ = ["LINEAR_OPS", "check_output", "load", "op_counts", "require", "run", "run_all", "save", "session",
           "symbolic_dims"]

#: The op types a conv-only graph must not hold.
LINEAR_OPS = ("Gemm", "MatMul")


def load(path: str | Path) -> Any:
    """Read and check an ONNX file; an ``onnx.ModelProto``.

    Raises:
        FcconvError: if the file is missing or is not a valid ONNX model.
    """
    onnx = require("onnx")
    path = Path(path)
    if not path.is_file():
        raise FcconvError(f"{str(path)!r} is not a file; give the path of an .onnx model.")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as error:  # DecodeError, ValidationError, ...: all mean "not a usable ONNX file"
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise FcconvError(
            f"{str(path)!r} is not a valid ONNX model ({first}). Give a file written by torch.onnx.export "
            "or another ONNX exporter."
        ) from None
    if len(model.graph.input) - _initializer_inputs(model) != 1 or len(model.graph.output) < 1:
        raise FcconvError(
            f"{str(path)!r} has {len(model.graph.input)} graph inputs; fcconv.onnx handles models with one "
            "image input (N, C, *spatial)."
        )
    return model


def _initializer_inputs(model: Any) -> int:
    names = {init.name for init in model.graph.initializer}
    return sum(1 for i in model.graph.input if i.name in names)


def check_output(dst: str | Path, src: str | Path | None = None) -> None:
    """Refuse, before any work, an output whose folder is missing or that is the input file."""
    dst = check_output_path(dst, what="the ONNX model")  # the one check: folder, device, FIFO, socket
    if src is not None and dst.exists() and Path(src).exists() and dst.samefile(src):
        raise FcconvError(f"The output {str(dst)!r} is the input file; fcconv never overwrites its input. "
                          "Choose another output path.")


def save(model: Any, path: str | Path, *, what: str = "the ONNX model") -> None:
    """Write ``model`` (a ModelProto) to ``path`` atomically: no partial file on failure."""
    onnx = require("onnx")
    with atomic_output(Path(path), what=what) as tmp:
        onnx.save(model, str(tmp))


def op_counts(model: Any) -> dict[str, int]:
    """How many nodes of each op type the main graph holds, most frequent first."""
    return dict(Counter(node.op_type for node in model.graph.node).most_common())


def symbolic_dims(model: Any) -> dict[int, str]:
    """The symbolic dims of the model's image input, e.g. ``{0: "batch", 2: "height", 3: "width"}``."""
    names = {init.name for init in model.graph.initializer}
    graph_input = next(i for i in model.graph.input if i.name not in names)
    return {i: d.dim_param for i, d in enumerate(graph_input.type.tensor_type.shape.dim)
            if d.HasField("dim_param")}


def session(model: Any) -> Any:
    """An onnxruntime CPU session for a ModelProto or a path."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors come back as exceptions; no log lines on stderr
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(sess: Any, x: Tensor) -> Tensor:
    """Run the session's single input on ``x``; its first output as a tensor.

    Raises:
        FcconvError: when onnxruntime fails (a shape frozen at export, an unsupported op, ...).
    """
    return run_all(sess, x)[0]


def run_all(sess: Any, x: Tensor) -> list[Tensor]:
    """:func:`run`, every output (tensors) in the graph's order."""
    name = sess.get_inputs()[0].name
    feed: Mapping[str, np.ndarray] = {name: x.detach().cpu().numpy()}
    try:
        outs = sess.run(None, feed)
    except Exception as error:
        raise FcconvError(
            f"onnxruntime failed on an input of shape {tuple(x.shape)}: {_first_line(error)}"
        ) from None
    return [torch.from_numpy(np.ascontiguousarray(out)) for out in outs]


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")
