"""The preview of masked maps (skipped cells), top classes by area, one class's probability; ``valid``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fcconv.errors import FcconvError
from fcconv.tiling import _mask
from fcconv.tiling._plan import TilePlan
from fcconv.tiling._preview import _class_index, class_probability, top_classes, winners

zarr = pytest.importorskip("zarr")


def test_skipped_cells_have_no_winner_and_probabilities_are_used_as_given() -> None:
    scores = np.array([[[0.0, 2.0], [np.nan, 1.0]], [[1.0, 0.0], [np.nan, 1.0]]])
    winner, confidence = winners(scores)
    assert winner.tolist() == [[1, 0], [-1, 0]] and np.isnan(confidence[1, 0])
    probabilities = np.array([[[0.3]], [[0.7]]])
    assert winners(probabilities, probabilities=True)[1][0, 0] == pytest.approx(0.7)
    assert class_probability(probabilities, 0, probabilities=True)[0, 0] == pytest.approx(0.3)
    assert class_probability(np.array([[[0.0]], [[np.log(3.0)]]]), 1)[0, 0] == pytest.approx(0.75)


def test_top_classes_by_area_among_computed_cells() -> None:
    winner = np.array([[2, 2, 2, -1], [1, 1, 0, -1]])
    assert top_classes(winner, 2) == [(2, 0.5), (1, pytest.approx(1 / 3))]
    assert top_classes(np.full((2, 2), -1), 3) == []


def test_class_by_name_or_index() -> None:
    names = ["tumour", "stroma"]
    assert _class_index("stroma", names) == 1 and _class_index("0", names) == 0
    with pytest.raises(FcconvError, match="class 'fat' is not a class of this map"):
        _class_index("fat", names)


def test_valid_marks_the_cells_of_computed_tiles(tmp_path: Path) -> None:
    plan = TilePlan(stride=(1, 1), offset=(0, 0), extent=(1, 1), image=(4, 6), grid=(4, 6),
                    cells_per_tile=(2, 3), tile=(2, 3))
    tissue = np.zeros((4, 6), dtype=bool)
    tissue[0, 4] = True  # tile (0, 1)
    assert [t.index for t in _mask.tiles_touching(list(plan), tissue)] == [(0, 1)]
    valid = _mask.computed_cells(list(plan), tissue)
    assert valid.sum() == 6 and valid[:2, 3:].all()
    group = zarr.open_group(str(tmp_path / "map.zarr"), mode="w")
    group.create_array("0", shape=(2, 4, 6), chunks=(2, 2, 3), dtype="f8", fill_value=np.nan)
    assert _mask.write_valid(tmp_path / "map.zarr", valid)
    stored = zarr.open_group(str(tmp_path / "map.zarr"), mode="r")["valid"]
    assert stored.dtype == np.uint8 and np.array_equal(stored[...], valid)
    bare = zarr.open_array(str(tmp_path / "bare.zarr"), mode="w", shape=(4, 6), dtype="f8")
    assert bare is not None and not _mask.write_valid(tmp_path / "bare.zarr", valid)
