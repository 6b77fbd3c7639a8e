"""Models shared by the tiling tests."""

from __future__ import annotations

import pytest
import torch
from tiling_support import PaddedNet, load_digits_model

import fcconv


@pytest.fixture(scope="session")
def digits_fcn() -> fcconv.FullyConvolutional:
    """The embedded digits classifier (valid convolutions, stride 2, window 12), in float64."""
    return fcconv.convolutionalize(load_digits_model(dtype=torch.float64), (1, 12, 12))


@pytest.fixture(scope="session")
def padded_fcn() -> fcconv.FullyConvolutional:
    torch.manual_seed(0)
    return fcconv.convolutionalize(PaddedNet().double().eval(), (2, 16, 16))
