"""The embedded digits model: packaged weights and held-out set, the model's structure, the canvas."""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from fcconv.demo.digits import (
    BACKGROUND,
    DIGIT_SIZE,
    HELDOUT_FILE,
    MARGIN,
    NUM_CLASSES,
    WEIGHTS_FILE,
    WINDOW,
    DigitsCNN,
    center_in_window,
    load_digits_model,
    load_heldout,
    make_canvas,
    paste,
)
from fcconv.errors import FcconvError

ROOT = Path(__file__).resolve().parents[2]


def _resource(name: str) -> importlib.resources.abc.Traversable:
    return importlib.resources.files("fcconv").joinpath("data", name)


# ------------------------------------------------------------------------------------------------
# Packaged files


def test_packaged_weights_load_weights_only_as_a_small_float32_state_dict():
    with _resource(WEIGHTS_FILE).open("rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    assert set(state) == set(DigitsCNN().state_dict())
    assert all(t.dtype == torch.float32 for t in state.values())
    size = len(_resource(WEIGHTS_FILE).read_bytes())
    assert size < 300 * 1024, f"weights file is {size} bytes; the budget is a few hundred KB"


def test_packaged_heldout_loads_weights_only():
    with _resource(HELDOUT_FILE).open("rb") as f:
        data = torch.load(f, map_location="cpu", weights_only=True)
    assert data["images"].dtype == torch.uint8 and int(data["images"].max()) <= 16
    assert data["labels"].dtype == torch.uint8


def test_load_heldout_gives_200_digits_20_per_class_in_unit_range():
    images, labels = load_heldout()
    assert images.shape == (200, DIGIT_SIZE, DIGIT_SIZE) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == [20] * 10
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0


def test_heldout_set_is_the_one_the_training_script_sets_aside():
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "scripts" / "train_digits.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    train_x, train_y, held_x, held_y = script.split_digits(0)
    images, labels = load_heldout()
    assert torch.equal(torch.from_numpy(held_x).float() / 16, images)
    assert torch.equal(torch.from_numpy(held_y), labels)
    # Never trained on: the dataset has no duplicate images, and no held-out one is a training one.
    assert len(train_y) + len(held_y) == 1797
    train = {x.tobytes() for x in train_x}
    assert not any(x.tobytes() in train for x in held_x)


# ------------------------------------------------------------------------------------------------
# The model


def test_model_loads_in_eval_mode_float32_and_pads_nothing():
    model = load_digits_model()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            assert layer.padding in (0, (0, 0)), f"{layer} pads"
    assert model(torch.zeros(2, 1, WINDOW, WINDOW)).shape == (2, NUM_CLASSES)


def test_model_keeps_dtype_on_request():
    model = load_digits_model(dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_heldout_accuracy_meets_the_target():
    model = load_digits_model()
    images, labels = load_heldout()
    with torch.inference_mode():
        accuracy = float((model(center_in_window(images)).argmax(1) == labels).float().mean())
    assert accuracy >= 0.97  # measured 0.990 (198 of 200)


def test_blank_and_off_centre_windows_are_background():
    model = load_digits_model()
    images, _ = load_heldout()
    windows = torch.zeros(11, 1, WINDOW, WINDOW)
    for k in range(10):  # a digit 5 pixels off centre: only a fragment is in the window
        paste(windows[k + 1, 0], images[k], MARGIN + 5, MARGIN + 5)
    with torch.inference_mode():
        predicted = model(windows).argmax(1)
    assert predicted[0] == BACKGROUND
    assert (predicted[1:] == BACKGROUND).float().mean() >= 0.8


# ------------------------------------------------------------------------------------------------
# Canvas


def test_make_canvas_is_deterministic_by_seed():
    a, b, c = make_canvas(seed=3), make_canvas(seed=3), make_canvas(seed=4)
    assert torch.equal(a.image, b.image) and a.boxes == b.boxes and a.labels == b.labels
    assert not torch.equal(a.image, c.image)


def test_make_canvas_draws_each_digit_in_its_box_with_a_window_margin():
    images, labels = load_heldout()
    canvas = make_canvas(64, 192, seed=0)
    h, w = canvas.image.shape[-2:]
    assert canvas.image.shape == (1, 64, 192) and len(canvas.boxes) == 24
    ink = torch.zeros(h, w, dtype=torch.bool)
    for (t, left, b, r), label in zip(canvas.boxes, canvas.labels):
        assert (b - t, r - left) == (DIGIT_SIZE, DIGIT_SIZE)
        assert t >= MARGIN and left >= MARGIN and b <= h - MARGIN and r <= w - MARGIN
        crop = canvas.image[0, t:b, left:r]
        # The crop is one of the held-out images of that label.
        assert any(torch.equal(crop, img) for img in images[labels == label])
        assert not ink[t:b, left:r].any(), "digits overlap"
        ink[t:b, left:r] = True
    assert float(canvas.image[0][~ink].abs().max()) == 0.0  # nothing outside the boxes
    assert canvas.centers[0] == ((canvas.boxes[0][0] + canvas.boxes[0][2]) / 2,
                                 (canvas.boxes[0][1] + canvas.boxes[0][3]) / 2)


def test_make_canvas_takes_its_own_digits():
    digits = torch.ones(3, 8, 8)
    canvas = make_canvas(16, 32, seed=1, fill=1.0, images=digits, labels=[7, 7, 7])
    assert canvas.labels == (7, 7) and float(canvas.image.sum()) == 2 * 64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 8}, "make_canvas needs a canvas of at least one 16x16 slot"),
        ({"fill": 0.0}, "make_canvas needs 0 < fill <= 1"),
        ({"cell": 10}, "make_canvas needs cell >= 12"),
        ({"images": torch.ones(2, 8, 8)}, "make_canvas: pass labels together with images"),
    ],
)
def test_make_canvas_rejects_bad_options(kwargs, message):
    with pytest.raises(FcconvError, match="^" + message):
        make_canvas(**kwargs)


def test_center_in_window_pads_by_the_margin_and_rejects_other_shapes():
    windows = center_in_window(torch.ones(2, 8, 8))
    assert windows.shape == (2, 1, WINDOW, WINDOW)
    assert float(windows[0, 0, MARGIN:-MARGIN, MARGIN:-MARGIN].min()) == 1.0 and float(windows.sum()) == 128
    with pytest.raises(FcconvError, match=r"^center_in_window expects digits of shape \(N, 8, 8\)"):
        center_in_window(torch.ones(2, 1, 8, 8))


def test_paste_clips_at_the_borders_and_keeps_the_darker_ink():
    canvas = torch.full((4, 4), 0.5)
    paste(canvas, torch.ones(3, 3), -1, 2)
    assert canvas.tolist() == [[0.5, 0.5, 1, 1], [0.5, 0.5, 1, 1], [0.5] * 4, [0.5] * 4]
    paste(canvas, torch.zeros(2, 2), 0, 0)  # blank pixels never erase ink
    assert float(canvas[0, 0]) == 0.5

