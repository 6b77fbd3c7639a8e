"""A small SVS-style slide (tifffile: JPEG tiles of 256^2, 3 levels, Aperio MPP and AppMag) and an RGB net."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

import fcconv

__all__ = ["RgbNet", "make_svs", "rgb_fcn", "seeded_rgb_net", "tissue_picture", "to_unit"]


def tissue_picture(size: int = 1024, background: float = 0.5, seed: int = 0) -> np.ndarray:
    """An ``(size, size, 3)`` uint8 picture: textured tissue left, flat light background right."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 236, np.uint8)
    edge = int(round(size * (1 - background)))
    image[:, :edge] = rng.integers(60, 200, (size, edge, 3), dtype=np.uint8)
    return image


def make_svs(path: Path, image: np.ndarray, *, mpp: float = 0.5, magnification: int = 20,
             levels: int = 3) -> Path:
    """Write ``image`` as an Aperio SVS-style pyramid: baseline, thumbnail, then levels 2x, 4x, ..."""
    import tifffile

    height, width = image.shape[:2]
    head = f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] (256x256) JPEG/RGB Q=90"
    options = {"photometric": "rgb", "metadata": None}
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(256, 256), compression="jpeg", subfiletype=0,
                  description=f"{head}|AppMag = {magnification}|MPP = {mpp}", **options)
        tif.write(np.ascontiguousarray(image[::16, ::16]), description=f"{head}\r\nthumbnail", **options)
        for k in range(1, levels):
            tif.write(np.ascontiguousarray(image[::2**k, ::2**k]), tile=(256, 256), compression="jpeg",
                      subfiletype=0, description=f"{head}\r\nlevel {k}", **options)
    return path


class RgbNet(nn.Module):
    """A tiny RGB classifier of 16x16 patches: stride 8, five classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.ReLU(), nn.Conv2d(4, 6, 2, stride=2))
        self.head = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def rgb_fcn() -> fcconv.FullyConvolutional:
    """:class:`RgbNet` in float64, seeded, converted."""
    torch.manual_seed(0)
    return fcconv.convolutionalize(RgbNet().double().eval(), (3, 16, 16))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to float64 in [0, 1]."""
    return x.double() / 255


def seeded_rgb_net() -> RgbNet:
    """:class:`RgbNet` (float32) with seeded weights: a factory for CLI tests."""
    torch.manual_seed(0)
    return RgbNet().eval()
