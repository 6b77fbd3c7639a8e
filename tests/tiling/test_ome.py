"""The map as OME-NGFF 0.5: read by ome_zarr, cells on their windows' centres, a pyramid, one class cheap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from slide_support import make_svs, rgb_fcn, tissue_picture, to_unit
from tiling_support import assert_same_map

import fcconv
from fcconv.errors import FcconvError
from fcconv.tiling import _ome
from fcconv.tiling._map import _prepare

zarr = pytest.importorskip("zarr")
pytest.importorskip("ome_zarr")
pytest.importorskip("tiffslide")

MPP0 = 0.5  # the slide's level-0 pixel size


@pytest.fixture(scope="module")
def svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_svs(tmp_path_factory.mktemp("slide") / "slide.svs", tissue_picture(512), mpp=MPP0)


def contract_group(path: Path, values: np.ndarray, geometry: dict[str, Any]) -> Any:
    """A map store as the contract lays it out: group, ``0`` sharded per tile, 16 classes per inner chunk."""
    group = zarr.open_group(str(path), mode="w")
    classes = values.shape[0]
    inner = min(16, classes)
    tile = tuple(min(32, s) for s in values.shape[1:])
    array = group.create_array("0", shape=values.shape, chunks=(inner, *tile),
                               shards=(-(-classes // inner) * inner, *tile), dtype=values.dtype,
                               fill_value=np.nan)
    array[...] = values
    group.attrs["fcconv"] = {"version": 1, "identity": {}, "complete": True, "geometry": geometry,
                             "classes": None}
    return group


def _read(path: Path) -> Any:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(path)))())
    assert nodes, "ome_zarr found no image"
    return nodes[0]


@pytest.mark.parametrize("mpp", [0.5, 1.0, 0.75])
def test_ome_zarr_reads_the_map_with_cells_on_their_windows_centres(svs: Path, tmp_path: Path,
                                                                    mpp: float) -> None:
    fcn = rgb_fcn()
    source = _prepare(fcn, svs, 512, "CHW", None, 0, mpp=mpp).source
    scores = fcconv.tiled_map(fcn, svs, mpp=mpp, tile=160, transform=to_unit, progress=False)
    geometry = _ome.geometry_of(fcn, source)
    contract_group(tmp_path / "map.zarr", scores, geometry)
    names = [f"class {c}" for c in "ABCDE"]
    _ome.write_ome(tmp_path / "map.zarr", geometry=geometry, class_names=names)
    node = _read(tmp_path / "map.zarr")
    assert [a["name"] for a in node.metadata["axes"]] == ["c", "y", "x"]
    assert node.metadata["axes"][1]["unit"] == "micrometer"
    assert node.metadata["channel_names"] == names
    assert np.array_equal(np.asarray(node.data[0]), scores, equal_nan=True)
    scale, translation = (t[k] for t, k in zip(node.metadata["coordinateTransformations"][0],
                                               ("scale", "translation")))
    d = geometry["downsample"]  # level-0 pixels per image pixel
    assert d == pytest.approx(mpp / MPP0)
    for cell in [(0, 0), (3, 7), (scores.shape[1] - 1, scores.shape[2] - 2)]:
        top, left, bottom, right = fcn.window_of(cell)
        # The window's centre on the slide: level-0 pixel centres at q * MPP0 (q = 0, 1, ...).
        centre = [MPP0 * (d * (a + b) / 2 - 0.5) for a, b in ((top, bottom), (left, right))]
        placed = [scale[1 + k] * cell[k] + translation[1 + k] for k in range(2)]
        assert placed == pytest.approx(centre, rel=1e-12)


def test_pyramid_levels_are_nan_ignoring_2x2_means(tmp_path: Path) -> None:
    values = np.random.default_rng(0).random((3, 9, 6))
    values[:, :2, :2] = np.nan  # a skipped block of cells
    values[:, 4, 3] = np.nan
    geometry = {"stride": [4, 4], "window": [8, 8], "window_offset": [0, 0], "image_shape": [3, 40, 28],
                "level": 0, "downsample": 1.0, "mpp": None}
    contract_group(tmp_path / "map.zarr", values, geometry)
    _ome.write_ome(tmp_path / "map.zarr")
    node = _read(tmp_path / "map.zarr")
    level1 = np.asarray(node.data[1])
    assert level1.shape == (3, 5, 3) and np.isnan(level1[:, 0, 0]).all()
    assert level1[0, 2, 1] == pytest.approx(np.nanmean(values[0, 4:6, 2:4]))
    assert level1[1, 4, 2] == pytest.approx(np.mean(values[1, 8, 4:6]))
    assert len(node.data) >= 3 and "unit" not in node.metadata["axes"][1]
    transforms = node.metadata["coordinateTransformations"]
    assert transforms[1][0]["scale"] == [1.0, 8.0, 8.0]
    assert transforms[1][1]["translation"] == [0.0, 5.5, 5.5]  # cells (0, 1) at 3.5 and 7.5: mean 5.5


class CountingStore(zarr.storage.WrapperStore):
    """A store that adds up the bytes read from it."""

    bytes_read = 0

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        value = await super().get(key, prototype, byte_range)
        if value is not None and not key.endswith("zarr.json"):
            type(self).bytes_read += len(value)
        return value


def test_one_class_reads_its_inner_chunk_only(tmp_path: Path) -> None:
    values = np.random.default_rng(1).random((40, 32, 32))
    contract_group(tmp_path / "map.zarr", values, {})
    store = CountingStore(zarr.storage.LocalStore(str(tmp_path / "map.zarr"), read_only=True))
    array = zarr.open_array(store=store, path="0", mode="r")
    CountingStore.bytes_read = 0
    assert np.array_equal(array[0], values[0])
    one = CountingStore.bytes_read
    CountingStore.bytes_read = 0
    assert np.array_equal(array[:], values)
    everything = CountingStore.bytes_read
    assert one <= 16 / 40 * everything + 1024  # one inner chunk of 16 classes (and the shard index)


def test_probabilities_are_the_softmax_of_the_untiled_map(svs: Path) -> None:
    fcn = rgb_fcn()
    probabilities = fcconv.tiled_map(fcn, svs, mpp=1.0, tile=100, transform=to_unit, progress=False,
                                     scores="probabilities")
    logits = fcconv.tiled_map(fcn, svs, mpp=1.0, tile=256, transform=to_unit, progress=False)
    assert_same_map(probabilities, torch.softmax(torch.from_numpy(logits), dim=0).numpy())
    assert np.allclose(probabilities.sum(0), 1.0, rtol=1e-12)
    with pytest.raises(FcconvError, match="scores must be one of logits, probabilities"):
        fcconv.tiled_map(fcn, svs, mpp=1.0, progress=False, scores="softmax")
    with pytest.raises(FcconvError, match="class_names holds 2 name"):
        fcconv.tiled_map(fcn, svs, mpp=1.0, progress=False, class_names=["a", "b"])
