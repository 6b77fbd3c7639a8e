"""The preview: winners read band by band, blocks of cells shown by their most confident class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fcconv
from fcconv.tiling import winners
from fcconv.tiling._preview import _pool_cells

zarr = pytest.importorskip("zarr")


def test_winners_band_by_band_equal_a_softmax_of_the_whole(tmp_path: Path) -> None:
    scores = np.random.default_rng(0).normal(size=(4, 23, 17)) * 5
    stored = zarr.open_array(str(tmp_path / "s.zarr"), mode="w", shape=scores.shape, chunks=(4, 5, 6),
                             dtype="f8")
    stored[...] = scores
    winner, confidence = winners(stored)
    probabilities = np.exp(scores) / np.exp(scores).sum(0)
    np.testing.assert_array_equal(winner, probabilities.argmax(0))
    np.testing.assert_allclose(confidence, probabilities.max(0), rtol=1e-6)


def test_pooled_cells_keep_the_most_confident_shown_class() -> None:
    winner = np.array([[0, 1, 2], [3, 0, 0], [2, 2, 1]])
    confidence = np.array([[0.9, 0.5, 0.6], [0.7, 0.99, 0.2], [0.3, 0.4, 0.8]])
    small_winner, small_confidence = _pool_cells(winner, confidence, hide={0}, step=2)
    np.testing.assert_array_equal(small_winner, [[3, 2], [2, 1]])  # class 0 is hidden: 0.9, 0.99 skipped
    np.testing.assert_array_equal(small_confidence, [[0.7, 0.6], [0.4, 0.8]])


def test_preview_png(tmp_path: Path, digits_fcn: fcconv.FullyConvolutional) -> None:
    pytest.importorskip("matplotlib")
    image = np.random.default_rng(1).random((1, 90, 130))
    scores = fcconv.tiled_map(digits_fcn, image, tile=40, out=tmp_path / "s.zarr", progress=False)
    path = fcconv.tiling.write_preview(scores, image, tmp_path / "p.png", fcn=digits_fcn, max_side=64)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.glob("*.png")] == ["p.png"]  # no temporary file left
