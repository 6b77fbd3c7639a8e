"""fcconv.models.sliding: the naive reference, sliding_window."""

from __future__ import annotations

import pytest
import torch
from small_nets import DTYPE, TOL, AlreadyConv, lenet

from fcconv.errors import FcconvError
from fcconv.models import (
    convolutionalize,
    sliding_window,
)

# ----------------------------------------------------------------------------------------------
# sliding_window


def test_sliding_window_layout_and_batching() -> None:
    model = lenet()
    x = torch.randn(2, 3, 40, 36, dtype=DTYPE)
    out = sliding_window(model, x, window=32, stride=(4, 2), batch_size=3, progress=False)
    assert out.shape == (2, 10, 3, 3)
    with torch.no_grad():
        crop = x[1:2, :, 8:40, 2:34]
        torch.testing.assert_close(out[1:2, :, 2, 1], model(crop), **TOL)
    again = sliding_window(model, x, window=(32, 32), stride=(4, 2), batch_size=100, progress=False)
    torch.testing.assert_close(out, again, **TOL)
    single = sliding_window(model, x[0], window=(32, 32), stride=(4, 2), progress=False)
    torch.testing.assert_close(single, out[0], **TOL)


def test_sliding_window_accepts_an_fcn_as_model() -> None:
    model = lenet()
    fcn = convolutionalize(model, (3, 32, 32))
    x = torch.randn(1, 3, 36, 36, dtype=DTYPE)
    torch.testing.assert_close(sliding_window(fcn, x, window=32, stride=4, progress=False),
                               sliding_window(model, x, window=32, stride=4, progress=False), **TOL)


def test_sliding_window_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    sliding_window(lenet(), torch.randn(1, 3, 36, 32, dtype=DTYPE), window=32, stride=4, progress=True)
    assert "sliding window" in capsys.readouterr().err


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"window": 50, "stride": 4}, r"^window \(50, 50\) is larger than the image"),
    ({"window": 32, "stride": 0}, r"^window and stride must be positive"),
    ({"window": (32,), "stride": 4}, r"^window must be 2 integer"),
    ({"window": 32, "stride": 4, "batch_size": 0}, r"^batch_size must be a positive integer"),
])
def test_sliding_window_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(FcconvError, match=message):
        sliding_window(lenet(), torch.randn(1, 3, 40, 40, dtype=DTYPE), progress=False, **kwargs)


def test_sliding_window_needs_one_vector_per_crop() -> None:
    model = AlreadyConv().to(DTYPE)
    with pytest.raises(FcconvError, match=r"^sliding_window needs a model that returns one score"):
        sliding_window(model, torch.randn(1, 3, 12, 12, dtype=DTYPE), window=8, stride=2, progress=False)
