"""Checks and models shared by the tiling tests (importable: tests/tiling is on sys.path)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import fcconv
from fcconv.demo.digits import CLASS_NAMES, load_digits_model, make_canvas

__all__ = ["CLASS_NAMES", "PaddedNet", "assert_same_map", "digits_model", "make_canvas", "untiled"]


def digits_model() -> nn.Module:
    """The embedded digits classifier (float32), wherever the package keeps it."""
    return load_digits_model()


def assert_same_map(got: np.ndarray, reference: np.ndarray) -> None:
    """Every cell equal to the untiled map: float64 relative difference at most 1e-12 per cell."""
    assert got.shape == reference.shape
    scale = np.abs(reference).max(axis=0)
    assert np.isfinite(got).all()
    assert (np.abs(got - reference).max(axis=0) <= 1e-12 * scale).all()


def untiled(fcn: fcconv.FullyConvolutional, image: np.ndarray) -> np.ndarray:
    """``fcn(image[None])[0]`` on a CHW numpy image."""
    with torch.inference_mode():
        return fcn(torch.from_numpy(image)[None].to(torch.float64))[0].numpy()


class PaddedNet(nn.Module):
    """A small padded classifier for 16x16 inputs: stride 4, zero padding at three layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(6, 5, 5, padding=2), nn.ReLU(),
        )
        self.head = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))
