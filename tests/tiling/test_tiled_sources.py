"""Images read block by block: a pyramidal tiled TIFF, zarr arrays and groups, memmaps."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from tiling_support import assert_same_map, untiled

import fcconv
from fcconv import FcconvError

tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, 150, 211), dtype=np.uint8)


def _scale(t):  # type: ignore[no-untyped-def]
    return t.double() / 255


def test_pyramidal_tiff_levels(tmp_path: Path, padded_fcn: fcconv.FullyConvolutional,
                               pixels: np.ndarray) -> None:
    hwc = np.ascontiguousarray(np.moveaxis(pixels, 0, -1))
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path) as tif:  # a whole-slide layout: tiled, with 2 reduced levels
        tif.write(hwc, tile=(64, 64), subifds=2, planarconfig="contig", photometric="minisblack")
        for step in (2, 4):
            tif.write(hwc[::step, ::step], tile=(64, 64), subfiletype=1, planarconfig="contig",
                      photometric="minisblack")
    for level, step in ((0, 1), (2, 4)):
        expected = untiled(padded_fcn, pixels[:, ::step, ::step] / 255.0)
        got = fcconv.tiled_map(padded_fcn, path, tile=48, layout="HWC", level=level, transform=_scale,
                               progress=False)
        assert_same_map(got, expected)
    with pytest.raises(FcconvError, match=r"^level 3 does not exist in .*slide\.tif': it has 3 pyramid"):
        fcconv.tiled_map(padded_fcn, path, layout="HWC", level=3, progress=False)
    # without layout, the axes tifffile reads (YXS at every level) say channels last
    assert_same_map(fcconv.tiled_map(padded_fcn, path, tile=48, level=2, transform=_scale, progress=False),
                    untiled(padded_fcn, pixels[:, ::4, ::4] / 255.0))
    with pytest.raises(FcconvError, match=r"^layout='CHW' contradicts the image '.*slide\.tif': its axes YXS "
                                          r"store channels last \(HWC\)"):
        fcconv.tiled_map(padded_fcn, path, layout="CHW", progress=False)


def test_zarr_array_path_group_and_memmap(tmp_path: Path, padded_fcn: fcconv.FullyConvolutional,
                                          pixels: np.ndarray) -> None:
    image = pixels / 255.0
    expected = untiled(padded_fcn, image)
    store = zarr.open_array(str(tmp_path / "image.zarr"), mode="w", shape=image.shape, chunks=(2, 40, 40),
                            dtype="f8")
    store[...] = image
    group = zarr.open_group(str(tmp_path / "pyramid.zarr"), mode="w")
    group.create_array("0", data=image, chunks=(2, 64, 64))
    group.create_array("1", data=image[:, ::2, ::2], chunks=(2, 64, 64))
    memmap = np.lib.format.open_memmap(tmp_path / "image.npy", mode="w+", dtype="f8", shape=image.shape)
    memmap[...] = image
    memmap.flush()
    for source in (tmp_path / "image.zarr", str(tmp_path / "image.zarr"), store, tmp_path / "pyramid.zarr",
                   np.load(tmp_path / "image.npy", mmap_mode="r")):
        assert_same_map(fcconv.tiled_map(padded_fcn, source, tile=50, progress=False), expected)
    got = fcconv.tiled_map(padded_fcn, tmp_path / "pyramid.zarr", level=1, tile=50, progress=False)
    assert_same_map(got, untiled(padded_fcn, image[:, ::2, ::2]))
    with pytest.raises(FcconvError, match=r"^level 2 does not exist in the zarr group .* arrays are 0, 1\."):
        fcconv.tiled_map(padded_fcn, tmp_path / "pyramid.zarr", level=2, progress=False)


def test_unknown_or_missing_file(tmp_path: Path, padded_fcn: fcconv.FullyConvolutional) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(FcconvError, match=r"^Cannot read .*notes\.txt': unknown image type\. Give a TIFF"):
        fcconv.tiled_map(padded_fcn, tmp_path / "notes.txt", progress=False)
    with pytest.raises(FcconvError, match=r"^Image .*nowhere\.tif' not found"):
        fcconv.tiled_map(padded_fcn, tmp_path / "nowhere.tif", progress=False)
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(FcconvError, match=r"^Cannot read .*broken\.tif' as a TIFF"):
        fcconv.tiled_map(padded_fcn, tmp_path / "broken.tif", progress=False)
    with pytest.raises(FcconvError, match=r"^level 1 applies to TIFF and zarr pyramids"):
        fcconv.tiled_map(padded_fcn, np.zeros((2, 40, 40)), level=1, progress=False)
    with pytest.raises(FcconvError, match=r"^layout must be one of CHW, HWC or None \(from the file\)"):
        fcconv.tiled_map(padded_fcn, np.zeros((2, 40, 40)), layout="NCHW", progress=False)


def test_a_rewritten_file_is_read_again(tmp_path: Path, padded_fcn: fcconv.FullyConvolutional) -> None:
    path = tmp_path / "image.tif"
    for seed in (0, 1):
        pixels = np.random.default_rng(seed).integers(0, 256, (2, 40, 50), dtype=np.uint8)
        tifffile.imwrite(path, pixels, tile=(16, 16), photometric="minisblack", planarconfig="separate")
        got = fcconv.tiled_map(padded_fcn, path, tile=40, transform=_scale, progress=False)
        assert_same_map(got, untiled(padded_fcn, pixels / 255.0))


def test_a_memmap_travels_as_its_file(tmp_path: Path) -> None:
    from fcconv.tiling._source import open_source

    image = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype="u1", shape=(3, 400, 500))
    image[...] = np.random.default_rng(0).integers(0, 256, image.shape, dtype=np.uint8)
    image.flush()
    mapped = np.load(tmp_path / "big.npy", mmap_mode="r")
    source = open_source(mapped, layout="CHW", level=0, ndim=2, channels=3)
    shipped = pickle.dumps(source)
    assert len(shipped) < 10_000  # not the 600 kB of pixels
    arrived = pickle.loads(shipped)
    np.testing.assert_array_equal(arrived.read((10, 20), (50, 70)), image[:, 10:50, 20:70])
    copied = open_source(np.array(image[:, :100]), layout="CHW", level=0, ndim=2, channels=3)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(copied)).read((0, 0), (5, 5)), image[:, :5, :5])
