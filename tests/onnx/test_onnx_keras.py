"""Keras models exported with tf2onnx (channels-last, NHWC) through ``fcconv.onnx.convolutionalize``.

Each model is made in the test with random weights and exported with ``tf2onnx.convert.from_keras``;
the converted file is compared with Keras itself: on every cell's crop in float64 for a net that pads
nothing, at the training size with the float32 error ratio for padded nets (whose larger sizes fcconv
checks against the onnx2torch translation).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch._dynamo  # noqa: F401  # before TensorFlow: triton, which it loads, crashes when loaded after it

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnx2torch")
tf = pytest.importorskip("tensorflow")
tf2onnx = pytest.importorskip("tf2onnx")
keras = pytest.importorskip("keras")

import fcconv.onnx as fonnx  # noqa: E402
from fcconv.certify import ERROR_RATIO_MAX, FLOAT64_RTOL  # noqa: E402
from fcconv.errors import FcconvError  # noqa: E402
from fcconv.onnx._check import ratio_of  # noqa: E402
from fcconv.onnx._float64 import run_reference, to_float64  # noqa: E402
from fcconv.onnx._runtime import load, run, session  # noqa: E402


def _export(model: Any, shape: tuple[int, int, int], path: Path, opset: int = 15) -> None:
    """``model`` as tf2onnx writes it at ``opset``, input ``(batch, *shape)`` (channels last)."""
    model.output_names = ["output"]  # tf2onnx 1.17 looks the outputs up by this name (Keras 3)
    spec = (tf.TensorSpec((None, *shape), tf.float32, name="input"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, output_path=str(path))


def _sequential(dtype: str) -> Any:
    return keras.Sequential([
        keras.Input((12, 12, 3), dtype=dtype),
        keras.layers.Conv2D(4, 3, activation="relu", dtype=dtype),
        keras.layers.MaxPooling2D(2, dtype=dtype),
        keras.layers.Conv2D(5, 3, dtype=dtype),
        keras.layers.Flatten(dtype=dtype),
        keras.layers.Dense(7, dtype=dtype),
        keras.layers.Softmax(dtype=dtype),
    ])


def test_flatten_dense_equals_keras_on_every_crop(tmp_path: Path) -> None:
    """Keras' Flatten reads a channels-last map in (H, W, C) order: the Dense's kernel must too."""
    model = _sequential("float32")
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=w.shape) for w in model.get_weights()]  # biases nonzero too
    model.set_weights([w.astype(np.float32) for w in weights])
    _export(model, (12, 12, 3), tmp_path / "seq.onnx")
    report = fonnx.convolutionalize(tmp_path / "seq.onnx", tmp_path / "fcn.onnx", (12, 12, 3))
    assert "crop" in (report.checks[1].verified_by or "")
    # Keras in float64, with the same (float32-valued) weights, on each crop of a larger image.
    keras64 = _sequential("float64")
    keras64.set_weights([w.astype(np.float32).astype(np.float64) for w in weights])
    x = np.random.default_rng(1).normal(size=(1, 14, 16, 3))
    got = run_reference(to_float64(load(tmp_path / "fcn.onnx")), x, "the file")
    assert got.shape == (1, 7, 2, 3)
    crops = np.stack([x[0, 2 * i:2 * i + 12, 2 * j:2 * j + 12] for i in range(2) for j in range(3)])
    expected = np.asarray(keras64(crops)).T.reshape(7, 2, 3)
    assert np.abs(got[0] - expected).max() <= FLOAT64_RTOL * np.abs(expected).max()


_APPS = [("MobileNetV2", 64, 15), ("ResNet50", 64, 15), ("EfficientNetB0", 64, 15), ("ResNet50", 64, 18)]


def _app(name: str, size: int) -> Any:
    """A Keras application with random weights giving logits (a random net's softmax is near uniform)."""
    return getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                             classifier_activation=None)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size", "opset"), _APPS)
def test_keras_applications(tmp_path: Path, name: str, size: int, opset: int) -> None:
    """Padded nets: the larger size is checked against the onnx2torch translation (float64), or said
    UNVERIFIED, and the file at its training size gives Keras' logits within the float32 error ratio,
    against Keras in float64."""
    keras.utils.set_random_seed(0)
    model = _app(name, size)
    _export(model, (size, size, 3), tmp_path / "model.onnx", opset)
    report = fonnx.convolutionalize(tmp_path / "model.onnx", tmp_path / "fcn.onnx", (size, size, 3))
    larger = report.checks[1]
    assert np.prod(larger.output_shape[2:]) > 1
    if report.unverified:  # said so, with the reason (onnx2torch 1.5 has no ReduceMean-18)
        assert "onnx2torch" in (larger.unverified or "") and "UNVERIFIED" in str(report)
    else:
        assert "onnx2torch" in (larger.verified_by or "")
        assert larger.float64_max_rel is not None and larger.float64_max_rel <= FLOAT64_RTOL
    x = torch.rand((2, size, size, 3), generator=torch.Generator().manual_seed(2)) * 255
    expected = torch.tensor(np.asarray(model(x.numpy())))
    got = run(session(tmp_path / "fcn.onnx"), x).reshape(expected.shape)
    keras.config.set_dtype_policy("float64")
    try:
        model64 = _app(name, size)
    finally:
        keras.config.set_dtype_policy("float32")
    model64.set_weights([w.astype(np.float64) for w in model.get_weights()])
    ratio = ratio_of(expected, got, np.asarray(model64(x.double().numpy())))
    assert ratio is not None and ratio <= ERROR_RATIO_MAX


@pytest.mark.slow
def test_a_map_of_one_pixel_in_the_body_is_refused(tmp_path: Path) -> None:
    """tf2onnx writes ``Reshape(-1, C, 1, 1)`` for the Transpose of a 1x1 map (ResNet50 at 32x32)."""
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3))
    _export(model, (32, 32, 3), tmp_path / "model.onnx")
    with pytest.raises(FcconvError, match=r"\(Reshape\) reshapes the feature map .* larger than 1x1"):
        fonnx.convolutionalize(tmp_path / "model.onnx", tmp_path / "fcn.onnx", (32, 32, 3))
    assert not (tmp_path / "fcn.onnx").exists()


def test_a_file_exported_with_symbolic_height_and_width(tmp_path: Path) -> None:
    """``TensorSpec((None, None, None, 3))``: the training size is given, the graph holds no fixed shape."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(4, 3),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5)])
    model.output_names = ["output"]
    spec = (tf.TensorSpec((None, None, None, 3), tf.float32, name="input"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=15, output_path=str(tmp_path / "m.onnx"))
    report = fonnx.convolutionalize(tmp_path / "m.onnx", tmp_path / "fcn.onnx", (12, 12, 3))
    assert "crop" in (report.checks[1].verified_by or "")
    assert report.checks[1].output_shape[2:] == (2, 3)
