"""The embedded default model: a tiny digit classifier that pads nothing, and the canvases it reads.

The model classifies 12x12 windows into eleven classes: the ten digits of scikit-learn's bundled 8x8
handwritten digits (UCI optdigits, CC BY 4.0), centred in the window within one pixel, and
``background`` (blank patches, digit fragments, off-centre digits, parts of two neighbouring digits).
Every convolution and pooling is *valid* (no padding anywhere), so once convolutionalized its dense
score map over a larger image equals sliding-window evaluation exactly: each output cell sees exactly
the pixels of its window and nothing else.

Layout of the network, for a ``(N, 1, 12, 12)`` input with values in ``[0, 1]``::

    features:   Conv2d(1, 16, 3) -> ReLU -> Conv2d(16, 32, 3) -> ReLU -> MaxPool2d(2)   (N, 32, 4, 4)
                Conv2d(32, 32, 3) -> ReLU                                                (N, 32, 2, 2)
    classifier: flatten -> Linear(128, 64) -> ReLU -> Linear(64, 11)                    (N, 11)

Its weights and a held-out set of digit images (never seen in training) ship with the package in
``fcconv/data/`` and load without scikit-learn; ``scripts/train_digits.py`` rebuilds them.

Example:
    >>> model = load_digits_model()
    >>> canvas = make_canvas(seed=0)
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from fcconv.errors import FcconvError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "BACKGROUND",
    "CLASS_NAMES",
    "DIGIT_SIZE",
    "HELDOUT_FILE",
    "MARGIN",
    "NUM_CLASSES",
    "STRIDE",
    "WEIGHTS_FILE",
    "WINDOW",
    "Canvas",
    "DigitsCNN",
    "center_in_window",
    "load_digits_model",
    "load_heldout",
    "make_canvas",
    "paste",
]

DIGIT_SIZE = 8
"""Side of one digit image, in pixels."""
MARGIN = 2
"""Blank border around a centred digit in a training window."""
WINDOW = DIGIT_SIZE + 2 * MARGIN
"""Side of the square window the classifier reads (its training input size): 12."""
STRIDE = 2
"""Step, in pixels, between neighbouring windows of the dense map (the product of the pooling strides)."""
NUM_CLASSES = 11
BACKGROUND = 10
"""Index of the ``background`` class; classes 0 to 9 are the digits themselves."""
CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10)) + ("background",)

WEIGHTS_FILE = "digits_cnn.pt"
"""Packaged float32 state dict of :class:`DigitsCNN`, in ``fcconv/data/``."""
HELDOUT_FILE = "digits_heldout.pt"
"""Packaged held-out digits: ``{"images": uint8 (N, 8, 8) in 0..16, "labels": uint8 (N,)}``."""


class DigitsCNN(nn.Module):
    """A tiny valid-convolution classifier for 12x12 windows: ten digits plus ``background``.

    Input ``(N, 1, 12, 12)`` with values in ``[0, 1]`` (ink is 1); output ``(N, 11)`` logits. No layer
    pads, so :func:`fcconv.models.convolutionalize` turns it into a detector whose map equals the
    sliding window exactly.

    Example:
        >>> logits = DigitsCNN()(torch.zeros(1, 1, 12, 12))
        >>> logits.shape
        torch.Size([1, 11])
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 2 * 2, 64),
            nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, 11)`` for windows ``(N, 1, 12, 12)``."""
        return self.classifier(torch.flatten(self.features(x), 1))


def _data_file(name: str) -> Traversable:
    return importlib.resources.files("fcconv") / "data" / name


def _load_data(name: str) -> dict[str, Tensor]:
    resource = _data_file(name)
    if not resource.is_file():
        raise FcconvError(
            f"The packaged file fcconv/data/{name} is missing. Reinstall fcconv, or rebuild it with "
            "`python scripts/train_digits.py` (needs the `train` extra: pip install 'fcconv[train]')."
        )
    with resource.open("rb") as f:
        try:
            data = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a corrupt file
            raise FcconvError(
                f"Cannot read the packaged file fcconv/data/{name}: {exc}. Reinstall fcconv, or rebuild "
                "it with `python scripts/train_digits.py`."
            ) from None
    if not isinstance(data, dict):
        raise FcconvError(f"fcconv/data/{name} should hold a dict of tensors; got {type(data).__name__}.")
    return data


def load_digits_model(
    *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> DigitsCNN:
    """Build :class:`DigitsCNN` with its packaged trained weights, in eval mode.

    The weights load with ``torch.load(..., weights_only=True)``; nothing is downloaded.

    Args:
        device: where to put the model (default CPU).
        dtype: floating dtype of the parameters (default float32, as stored).

    Returns:
        The trained model in eval mode.

    Raises:
        FcconvError: if the packaged weights are missing or unreadable.

    Example:
        >>> model = load_digits_model()
        >>> model(torch.zeros(1, 1, 12, 12)).argmax(1).item()  # a blank window
        10
    """
    model = DigitsCNN()
    model.load_state_dict(_load_data(WEIGHTS_FILE))
    model.eval()
    return model.to(device=device, dtype=dtype)


def load_heldout() -> tuple[Tensor, Tensor]:
    """The packaged held-out digits, never seen in training.

    Returns:
        ``(images, labels)``: float32 ``(N, 8, 8)`` with values in ``[0, 1]`` (the dataset's 0..16
        scaled by 1/16) and int64 ``(N,)`` labels 0 to 9.

    Raises:
        FcconvError: if the packaged file is missing or unreadable.

    Example:
        >>> images, labels = load_heldout()
        >>> images.shape[1:], int(labels.max())
        (torch.Size([8, 8]), 9)
    """
    data = _load_data(HELDOUT_FILE)
    images = data["images"].to(torch.float32) / 16.0
    return images, data["labels"].to(torch.int64)


def center_in_window(images: Tensor) -> Tensor:
    """Centre 8x8 digits in blank 12x12 windows: ``(N, 8, 8)`` -> ``(N, 1, 12, 12)``, what the model reads.

    Example:
        >>> center_in_window(torch.ones(2, 8, 8)).shape
        torch.Size([2, 1, 12, 12])
    """
    if images.ndim != 3 or tuple(images.shape[1:]) != (DIGIT_SIZE, DIGIT_SIZE):
        raise FcconvError(
            f"center_in_window expects digits of shape (N, {DIGIT_SIZE}, {DIGIT_SIZE}); "
            f"got {tuple(images.shape)}."
        )
    return nn.functional.pad(images, (MARGIN,) * 4).unsqueeze(1)


def paste(canvas: np.ndarray | Tensor, digit: np.ndarray | Tensor, top: int, left: int) -> None:
    """Draw ``digit`` onto ``canvas`` (2-d, changed in place) at ``(top, left)``, keeping the darker ink.

    Ink is combined with a maximum, so overlapping digits stay readable; parts outside the canvas
    are clipped.
    """
    h, w = digit.shape[-2:]
    ch, cw = canvas.shape[-2:]
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + h, ch), min(left + w, cw)
    if t0 >= t1 or l0 >= l1:
        return
    part = digit[t0 - top : t1 - top, l0 - left : l1 - left]
    if isinstance(canvas, Tensor):
        canvas[t0:t1, l0:l1] = torch.maximum(
            canvas[t0:t1, l0:l1], torch.as_tensor(part, dtype=canvas.dtype, device=canvas.device)
        )
    else:
        canvas[t0:t1, l0:l1] = np.maximum(canvas[t0:t1, l0:l1], np.asarray(part))


@dataclass(frozen=True)
class Canvas:
    """A blank image with held-out digits drawn at known places: the demo's test image.

    Attributes:
        image: float32 ``(1, H, W)``, values in ``[0, 1]`` (ink is 1).
        boxes: one ``(top, left, bottom, right)`` per digit, bottom/right exclusive, 8x8 each.
        labels: the digit drawn in each box.
    """

    image: Tensor
    boxes: tuple[tuple[int, int, int, int], ...]
    labels: tuple[int, ...]

    @property
    def centers(self) -> list[tuple[float, float]]:
        """Centre ``(y, x)`` of each digit, in continuous pixel coordinates (pixel p spans [p, p+1))."""
        return [((t + b) / 2, (left + r) / 2) for t, left, b, r in self.boxes]


def make_canvas(
    height: int = 64,
    width: int = 192,
    *,
    seed: int = 0,
    fill: float = 0.5,
    cell: int = 16,
    images: Tensor | None = None,
    labels: Tensor | Sequence[int] | None = None,
) -> Canvas:
    """Place held-out digits at known positions on a blank canvas, deterministically from ``seed``.

    The canvas is cut into ``cell x cell`` slots; a random ``fill`` fraction of them (at least one)
    gets one random held-out digit, shifted by up to two pixels from the slot's centre. Digits keep
    a two-pixel margin from the canvas edges so that a whole 12x12 window can centre on each.

    Args:
        height: canvas height in pixels (at least ``cell``).
        width: canvas width in pixels (at least ``cell``).
        seed: seeds the choice of slots, digits and shifts.
        fill: fraction of slots that get a digit, in ``(0, 1]``.
        cell: slot size in pixels, at least 12.
        images: digits to draw from, float ``(N, 8, 8)`` in ``[0, 1]``; default :func:`load_heldout`.
        labels: their labels; required with ``images``.

    Returns:
        The :class:`Canvas` with its ground-truth boxes and labels, sorted top to bottom, left to right.

    Raises:
        FcconvError: on a canvas smaller than one slot or options out of range.

    Example:
        >>> canvas = make_canvas(64, 192, seed=0)
        >>> canvas.image.shape, len(canvas.boxes) == len(canvas.labels)
        (torch.Size([1, 64, 192]), True)
    """
    if cell < WINDOW:
        raise FcconvError(f"make_canvas needs cell >= {WINDOW} pixels (the window size); got {cell}.")
    if height < cell or width < cell:
        raise FcconvError(
            f"make_canvas needs a canvas of at least one {cell}x{cell} slot; got {height}x{width}. "
            "Pass a larger height and width."
        )
    if not 0.0 < fill <= 1.0:
        raise FcconvError(f"make_canvas needs 0 < fill <= 1; got {fill}.")
    if images is None:
        images, label_tensor = load_heldout()
    elif labels is None:
        raise FcconvError("make_canvas: pass labels together with images.")
    else:
        label_tensor = torch.as_tensor(labels)
    if len(images) == 0:
        raise FcconvError("make_canvas needs at least one digit image to draw from.")

    rng = np.random.default_rng(seed)
    rows, cols = height // cell, width // cell
    # Centre the grid of slots on the canvas.
    y0, x0 = (height - rows * cell) // 2, (width - cols * cell) // 2
    n_slots = rows * cols
    n_digits = max(1, round(fill * n_slots))
    slots = np.sort(rng.choice(n_slots, size=n_digits, replace=False))
    picks = rng.choice(len(images), size=n_digits, replace=n_digits > len(images))
    jitter = rng.integers(-2, 3, size=(n_digits, 2))

    canvas = torch.zeros(height, width, dtype=torch.float32)
    boxes: list[tuple[int, int, int, int]] = []
    out_labels: list[int] = []
    centre = (cell - DIGIT_SIZE) // 2
    for slot, pick, (dy, dx) in zip(slots, picks, jitter):
        r, c = divmod(int(slot), cols)
        top = min(max(y0 + r * cell + centre + int(dy), MARGIN), height - MARGIN - DIGIT_SIZE)
        left = min(max(x0 + c * cell + centre + int(dx), MARGIN), width - MARGIN - DIGIT_SIZE)
        paste(canvas, images[int(pick)].to(torch.float32), top, left)
        boxes.append((top, left, top + DIGIT_SIZE, left + DIGIT_SIZE))
        out_labels.append(int(label_tensor[int(pick)]))
    return Canvas(image=canvas.unsqueeze(0), boxes=tuple(boxes), labels=tuple(out_labels))
