"""Slides through tiffslide and OpenSlide, the level by mpp or magnification, and tissue masks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from slide_support import make_svs, rgb_fcn, tissue_picture, to_unit
from tiling_support import assert_same_map

import fcconv
from fcconv.errors import FcconvError
from fcconv.tiling import _slide
from fcconv.tiling._source import Source

tiffslide = pytest.importorskip("tiffslide")
HAS_OPENSLIDE = importlib.util.find_spec("openslide") is not None


@pytest.fixture(scope="module")
def svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_svs(tmp_path_factory.mktemp("slide") / "slide.svs", tissue_picture(512))


@pytest.fixture(scope="module")
def fcn() -> fcconv.FullyConvolutional:
    return rgb_fcn()


def _untiled(fcn: fcconv.FullyConvolutional, pixels: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return fcn(to_unit(torch.from_numpy(np.moveaxis(pixels, -1, 0).copy())[None]))[0].numpy()


def _whole(reader: _slide.SlideLevel) -> np.ndarray:
    return reader[0:reader.shape[0], 0:reader.shape[1], slice(None)]


def test_tiffslide_object_and_path_give_the_untiled_map(svs: Path, fcn: fcconv.FullyConvolutional) -> None:
    pixels = np.asarray(tiffslide.TiffSlide(svs).read_region((0, 0), 0, (512, 512), as_array=True))
    reference = _untiled(fcn, pixels)
    by_object = fcconv.tiled_map(fcn, tiffslide.TiffSlide(svs), tile=200, transform=to_unit, progress=False)
    by_mpp = fcconv.tiled_map(fcn, svs, mpp=0.5, tile=200, transform=to_unit, progress=False)
    assert_same_map(by_object, reference)
    assert np.array_equal(by_mpp, by_object)


@pytest.mark.skipif(not HAS_OPENSLIDE, reason="openslide-python / openslide-bin not installed")
def test_openslide_gives_the_same_map_as_tiffslide(svs: Path, fcn: fcconv.FullyConvolutional) -> None:
    import openslide

    through_tiffslide = fcconv.tiled_map(fcn, tiffslide.TiffSlide(svs), tile=200, transform=to_unit,
                                         progress=False)
    through_openslide = fcconv.tiled_map(fcn, openslide.OpenSlide(svs), tile=200, transform=to_unit,
                                         progress=False)
    assert np.array_equal(through_openslide, through_tiffslide)


@pytest.mark.parametrize(("asked", "level", "factor"), [
    ({"mpp": 1.0}, 1, 1.0), ({"mpp": 2.0}, 2, 1.0), ({"mpp": 1.004}, 1, 1.0),
    ({"magnification": 10}, 1, 1.0), ({"mpp": 0.75}, 0, 1.5), ({"magnification": 8}, 1, 1.25)])
def test_level_by_mpp_or_magnification(svs: Path, asked: dict, level: int, factor: float) -> None:
    reader = _slide.slide_level(svs, **asked)
    assert (reader.level, reader.factor) == (level, factor)
    assert reader.shape[:2] == (int(512 / 2**level / factor),) * 2


def test_a_resampled_level_is_area_averaged_and_the_same_in_any_block(svs: Path,
                                                                      fcn: fcconv.FullyConvolutional) -> None:
    reader = _slide.slide_level(svs, mpp=0.75)
    whole = _whole(reader)
    assert np.array_equal(reader[37:151, 90:201, slice(None)], whole[37:151, 90:201])
    level = reader.read_level(0, 3, 0, 3).astype(np.float64)  # pixel (0, 0): [0, 1.5)^2 of level 0
    weights = np.array([1.0, 0.5, 0.0]) / 1.5
    assert whole[0, 0, 0] == np.rint(weights @ level[..., 0] @ weights)
    scores = fcconv.tiled_map(fcn, svs, mpp=0.75, tile=150, transform=to_unit, progress=False)
    assert_same_map(scores, _untiled(fcn, whole))
    source = fcconv.tiling._map._prepare(fcn, svs, 150, "CHW", None, 0, mpp=0.75).source
    assert _slide.slide_geometry(source) == {
        "level": 0, "downsample": 1.5, "mpp": [0.75, 0.75], "resampling": "area", "level_downsample": 1.0,
        "factor": 1.5, "reader": "tiffslide", "objective_power": 20.0}


@pytest.mark.parametrize(("asked", "message"), [
    ({"mpp": 0.25}, "mpp 0.25 (level 0: 0.5 mpp) is finer than the slide's level 0"),
    ({"mpp": 1.0, "magnification": 10}, "Give mpp or magnification, not both"),
    ({"mpp": 1.0, "level": 1}, "Give level or mpp/magnification, not both"),
    ({"level": 3}, "level 3 does not exist in this slide")])
def test_bad_resolutions_are_refused(svs: Path, asked: dict, message: str) -> None:
    with pytest.raises(FcconvError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _slide.slide_level(svs, **asked)


def test_mpp_on_an_array_is_refused(fcn: fcconv.FullyConvolutional) -> None:
    with pytest.raises(FcconvError, match="mpp and magnification apply to slides"):
        fcconv.tiled_map(fcn, np.zeros((3, 32, 32)), mpp=0.5, progress=False)


def test_mask_skips_background_tiles_without_reading_them(svs: Path, fcn: fcconv.FullyConvolutional,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # a mask runs halo tiles (method="auto" picks them): the unmasked reference runs the same tiles
    full = fcconv.tiled_map(fcn, svs, mpp=0.5, tile=136, transform=to_unit, progress=False, method="tiles")
    reads: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    read = Source.read

    def counted(self: Source, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        reads.append((tuple(start), tuple(stop)))
        return read(self, start, stop)

    monkeypatch.setattr(Source, "read", counted)
    masked = fcconv.tiled_map(fcn, svs, mpp=0.5, tile=136, transform=to_unit, progress=False, mask="otsu")
    computed = ~np.isnan(masked[0])
    assert computed[:, :30].all() and not computed[:, 48:].any()  # tissue: x < 256 px, i.e. cells < 32
    assert np.array_equal(masked[:, computed], full[:, computed])
    assert np.isnan(masked[:, ~computed]).all()
    assert reads and all(start[1] < 384 for start, _ in reads)  # the last tile column (x >= 384): unread
    plan = fcconv.tiling.plan_for(fcn, svs, mpp=0.5, tile=136, method="tiles")
    assert len(reads) < len(plan)


def test_mask_as_array_callable_and_file(svs: Path, fcn: fcconv.FullyConvolutional, tmp_path: Path) -> None:
    from PIL import Image

    left = np.zeros((8, 8), dtype=bool)
    left[:, :2] = True  # the left quarter of the image, at 1/64 of its resolution
    Image.fromarray((left * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    maps = [fcconv.tiled_map(fcn, svs, mpp=0.5, tile=136, transform=to_unit, progress=False, mask=m)
            for m in (left, lambda thumbnail: left, tmp_path / "mask.png")]
    computed = ~np.isnan(maps[0][0])
    assert computed[:, :10].all() and not computed[:, 40:].any()
    for other in maps[1:]:
        assert np.array_equal(np.isnan(other), np.isnan(maps[0]))
    with pytest.raises(FcconvError, match="mask is an array of shape"):
        fcconv.tiled_map(fcn, svs, mpp=0.5, progress=False, mask=np.zeros(5))


def test_prefetch_reads_ahead_and_gives_the_same_map(svs: Path, fcn: fcconv.FullyConvolutional,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from fcconv.tiling._prefetch import Prefetching

    # prefetch reads halo tiles' blocks ahead (a streamed strip reads its bands in turn)
    plain = fcconv.tiled_map(fcn, svs, mpp=0.5, tile=136, transform=to_unit, progress=False, method="tiles")
    hits: list[bool] = []
    read = Prefetching.read

    def counted(self: Prefetching, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        hits.append((tuple(start), tuple(stop)) in self._pending)
        return read(self, start, stop)

    monkeypatch.setattr(Prefetching, "read", counted)
    ahead = fcconv.tiled_map(fcn, svs, mpp=0.5, tile=136, transform=to_unit, progress=False, prefetch=True,
                             method="tiles")
    assert np.array_equal(ahead, plain)
    assert len(hits) == len(fcconv.tiling.plan_for(fcn, svs, mpp=0.5, tile=136, method="tiles"))
    assert sum(hits) >= len(hits) - 2  # all but the first read (and a turn) were read ahead


def test_a_slide_source_travels_as_its_path(svs: Path, fcn: fcconv.FullyConvolutional) -> None:
    import pickle

    source = fcconv.tiling._map._prepare(fcn, tiffslide.TiffSlide(svs), 512, "CHW", None, 0).source
    data = pickle.dumps(source)
    assert len(data) < 2000  # the path and the level, not the pixels nor the open file
    assert np.array_equal(pickle.loads(data).read((10, 20), (50, 90)), source.read((10, 20), (50, 90)))
