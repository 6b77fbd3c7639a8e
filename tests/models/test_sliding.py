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


def test_sliding_window_takes_one_image_by_the_models_rank() -> None:
    model = lenet()
    x = torch.randn(3, 36, 32, dtype=DTYPE)
    single = sliding_window(model, x, window=32, stride=4, progress=False)
    batched = sliding_window(model, x[None], window=32, stride=4, progress=False)
    assert single.shape == (10, 2, 1)
    torch.testing.assert_close(single, batched[0], rtol=0, atol=0)  # the same crops, the same runs
    with pytest.raises(FcconvError, match=r"^image must be \(N, C, \*spatial\) or \(C, \*spatial\) "
                                          r"with the model's 2 spatial dim\(s\); got \(1, 1, 3, 36, 32\)"):
        sliding_window(model, x[None, None], window=32, stride=4, progress=False)


def test_sliding_window_refuses_an_ambiguous_image() -> None:
    def model(t: torch.Tensor) -> torch.Tensor:  # no conv to tell the rank
        return t.flatten(1)[:, :2]

    with pytest.raises(FcconvError, match=r"^image \(3, 16, 16\) with one window size is ambiguous"):
        sliding_window(model, torch.randn(3, 16, 16), window=16, stride=4, progress=False)
    assert sliding_window(model, torch.randn(3, 16, 16), window=(16,), stride=4,
                          progress=False).shape == (3, 2, 1)


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_cells_and_sizes_as_numpy_ints_and_0d_tensors(kind: str) -> None:
    import numpy as np

    fcn = convolutionalize(lenet(), (3, 32, 32))

    def as_int(v: int) -> object:
        return np.int64(v) if kind == "numpy" else torch.tensor(v)

    cell = np.unravel_index(5, (3, 4)) if kind == "numpy" else (torch.tensor(1), torch.tensor(1))
    assert fcn.window_of(cell) == (4, 4, 36, 36)
    assert fcn.grid_shape((as_int(40), as_int(44))) == fcn.grid_shape((40, 44)) == (3, 4)
    assert fcn.grid_shape(as_int(40)) == (3, 3)
    assert fcn.accepts((as_int(40), as_int(44)))
