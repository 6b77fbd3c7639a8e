"""The file's axes decide the layout; stacks need a plane; pixels must be real numbers (issue 14)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiling_support import assert_same_map, digits_model, untiled
from torch import nn

import fcconv
from fcconv import FcconvError
from fcconv.cli import app
from fcconv.cli.tiles import PixelScale
from fcconv.tiling import plan_for, winners

tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")


def _scale(t):  # type: ignore[no-untyped-def]
    return t.double() / 255


@pytest.fixture(scope="module")
def rgb_fcn() -> fcconv.FullyConvolutional:
    """A 3-channel classifier for 8x8 windows, in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    return fcconv.convolutionalize(model.double().eval(), (3, 8, 8))


@pytest.fixture(scope="module")
def planes() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, 40, 47), dtype=np.uint8)


def _tiff(path: Path, data: np.ndarray, **kwargs: object) -> Path:
    tifffile.imwrite(path, data, **kwargs)
    return path


def test_a_z_stack_is_refused_then_mapped_one_plane(tmp_path: Path, digits_fcn: fcconv.FullyConvolutional,
                                                    planes: np.ndarray) -> None:
    path = _tiff(tmp_path / "stack.tif", planes, photometric="minisblack", metadata={"axes": "ZYX"})
    with pytest.raises(FcconvError, match=r"^The image '.*stack\.tif' \(axes ZYX, shape \(5, 40, 47\)\) is a "
                                          r"stack of 5 planes along axis Z \(z-stack\); a 2-d model maps one "
                                          r"plane at a time\. Pass plane=k \(k from 0 to 4\)"):
        fcconv.tiled_map(digits_fcn, path, progress=False)
    got = fcconv.tiled_map(digits_fcn, path, plane=3, tile=24, transform=_scale, progress=False)
    assert_same_map(got, untiled(digits_fcn, planes[3:4] / 255.0))
    assert_same_map(fcconv.tiled_map(digits_fcn, path, plane={"z": 1}, transform=_scale, progress=False),
                    untiled(digits_fcn, planes[1:2] / 255.0))
    with pytest.raises(FcconvError, match=r"^plane Z=5 does not exist: axis Z of the image .* has 5 planes"):
        plan_for(digits_fcn, path, plane=5)
    with pytest.raises(FcconvError, match=r"^plane names axes T; the image .* has the stack axes Z"):
        fcconv.dask_map(digits_fcn, path, plane={"T": 0})
    plain = _tiff(tmp_path / "plain.tif", planes, photometric="minisblack")  # no axes written: QYX
    with pytest.raises(FcconvError, match=r"\(axes QYX, shape \(5, 40, 47\)\) is a stack of 5 planes along "
                                          r"axis Q"):
        fcconv.tiled_map(digits_fcn, plain, progress=False)


def test_time_and_z_need_one_index_each(tmp_path: Path, digits_fcn: fcconv.FullyConvolutional,
                                        planes: np.ndarray) -> None:
    data = planes[:4].reshape(2, 2, 40, 47)
    path = _tiff(tmp_path / "tz.tif", data, photometric="minisblack", metadata={"axes": "TZYX"})
    with pytest.raises(FcconvError, match=r"2 planes along axis T \(time series\) by 2 planes along axis Z.*"
                                          r"Pass plane=\{'T': 0, 'Z': 0\}"):
        fcconv.tiled_map(digits_fcn, path, progress=False)
    with pytest.raises(FcconvError, match=r"^The image .* has 2 stack axes \(T, Z\); one index cannot pick"):
        fcconv.tiled_map(digits_fcn, path, plane=1, progress=False)
    got = fcconv.tiled_map(digits_fcn, path, plane={"T": 1, "Z": 0}, transform=_scale, progress=False)
    assert_same_map(got, untiled(digits_fcn, data[1, 0][None] / 255.0))
    tyx = _tiff(tmp_path / "t.tif", planes[:2], photometric="minisblack", metadata={"axes": "TYX"})
    with pytest.raises(FcconvError, match=r"stack of 2 planes along axis T \(time series\)"):
        fcconv.tiled_map(digits_fcn, tyx, progress=False)


def test_minisblack_planes_are_not_read_as_rgb(tmp_path: Path, rgb_fcn: fcconv.FullyConvolutional,
                                               planes: np.ndarray) -> None:
    path = _tiff(tmp_path / "three.tif", planes[:3], photometric="minisblack")  # tifffile reads QYX
    with pytest.raises(FcconvError, match=r"^The image .* \(axes QYX, .*\) is a stack of 3 planes along "
                                          r"axis Q .*layout='CHW' if these planes are the image's channels"):
        fcconv.tiled_map(rgb_fcn, path, progress=False)
    z = _tiff(tmp_path / "z.tif", planes[:3], photometric="minisblack", metadata={"axes": "ZYX"})
    with pytest.raises(FcconvError, match=r"stack of 3 planes along axis Z"):
        fcconv.tiled_map(rgb_fcn, z, layout="CHW", progress=False)  # Z is never channels
    got = fcconv.tiled_map(rgb_fcn, path, layout="CHW", transform=_scale, progress=False)  # the user says so
    assert_same_map(got, untiled(rgb_fcn, planes[:3] / 255.0))


def test_rgb_cyx_and_the_layouts_they_contradict(tmp_path: Path, rgb_fcn: fcconv.FullyConvolutional,
                                                 planes: np.ndarray) -> None:
    expected = untiled(rgb_fcn, planes[:3] / 255.0)
    rgb = _tiff(tmp_path / "rgb.tif", np.moveaxis(planes[:3], 0, -1), photometric="rgb", tile=(16, 16))
    assert_same_map(fcconv.tiled_map(rgb_fcn, rgb, tile=20, transform=_scale, progress=False), expected)
    assert_same_map(fcconv.tiled_map(rgb_fcn, rgb, layout="HWC", transform=_scale, progress=False), expected)
    with pytest.raises(FcconvError, match=r"^layout='CHW' contradicts the image .*: its axes YXS store "
                                          r"channels last \(HWC\)\. Drop layout"):
        fcconv.tiled_map(rgb_fcn, rgb, layout="CHW", progress=False)
    cyx = _tiff(tmp_path / "cyx.tif", planes[:3], photometric="minisblack", metadata={"axes": "CYX"})
    assert_same_map(fcconv.tiled_map(rgb_fcn, cyx, transform=_scale, progress=False), expected)
    with pytest.raises(FcconvError, match=r"^plane picks one plane of a stack; the image .* \(axes CYX\)"):
        fcconv.tiled_map(rgb_fcn, cyx, plane=0, progress=False)
    with pytest.raises(FcconvError, match=r"^plane picks a plane of a file that states its axes"):
        fcconv.tiled_map(rgb_fcn, planes[:3], plane=0, progress=False)


def test_rgba_and_grayscale_to_an_rgb_model(tmp_path: Path, rgb_fcn: fcconv.FullyConvolutional,
                                            planes: np.ndarray) -> None:
    rgba = _tiff(tmp_path / "rgba.tif", np.moveaxis(planes[:4], 0, -1), photometric="rgb",
                 extrasamples=["unassalpha"])
    with pytest.raises(FcconvError, match=r"^The image .* has 4 samples per pixel \(axes YXS: RGB and "
                                          r"alpha\); the model takes 3\. fcconv does not drop the alpha"):
        fcconv.tiled_map(rgb_fcn, rgba, progress=False)
    gray = _tiff(tmp_path / "gray.tif", planes[0], photometric="minisblack")
    with pytest.raises(FcconvError, match=r"^The image .* is grayscale \(axes YX: one channel\); the model "
                                          r"takes 3 channels"):
        fcconv.tiled_map(rgb_fcn, gray, progress=False)


def test_zarr_dimension_names(tmp_path: Path, rgb_fcn: fcconv.FullyConvolutional, planes: np.ndarray) -> None:
    hwc = np.moveaxis(planes[:3], 0, -1)
    store = zarr.create_array(str(tmp_path / "hwc.zarr"), shape=hwc.shape, dtype="u1", chunks=(16, 16, 3),
                              dimension_names=("y", "x", "c"))
    store[...] = hwc
    got = fcconv.tiled_map(rgb_fcn, tmp_path / "hwc.zarr", transform=_scale, progress=False)
    assert_same_map(got, untiled(rgb_fcn, planes[:3] / 255.0))


@pytest.mark.parametrize(("image", "start"), [
    (np.zeros((2, 30, 30), dtype=np.complex128), r"The image has dtype complex128 \(complex\); expected "
                                                 r"integer or floating-point values\. Pass image\.real"),
    (np.zeros((2, 30, 30), dtype=object), r"The image has dtype object \(object\);.* numpy\.asarray"),
    (np.zeros((2, 30, 30), dtype=bool), r"The image has dtype bool \(boolean\);.* image\.astype\(numpy"),
    (np.zeros((2, 30, 30), dtype="U1"), r"The image has dtype <U1 \(text\)"),
])
def test_pixels_that_are_not_real_numbers_are_refused(padded_fcn: fcconv.FullyConvolutional,
                                                      image: np.ndarray, start: str) -> None:
    for call in (fcconv.tiled_map, fcconv.dask_map, plan_for):
        with pytest.raises(FcconvError, match="^" + start):
            call(padded_fcn, image)
    with pytest.raises(FcconvError, match="^" + start.replace("The image", "The map")):
        winners(image)


def test_a_complex_zarr_file_is_refused(tmp_path: Path, padded_fcn: fcconv.FullyConvolutional) -> None:
    zarr.create_array(str(tmp_path / "c.zarr"), shape=(2, 30, 30), dtype="c8", chunks=(2, 30, 30))
    with pytest.raises(FcconvError, match=r"^The image has dtype complex64 \(complex\)"):
        fcconv.tiled_map(padded_fcn, tmp_path / "c.zarr", progress=False)


# the command line: --layout, --plane, and messages that name them


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["heatmap", "tiling_support:digits_model", "--input", "1,12,12", *args],
                                prog_name="fcconv")
    return result.exit_code, result.stderr.strip()


def test_cli_plane_and_layout(tmp_path: Path, planes: np.ndarray) -> None:
    path = _tiff(tmp_path / "stack.tif", planes, photometric="minisblack", metadata={"axes": "ZYX"})
    out = str(tmp_path / "s.zarr")
    code, err = _cli(str(path), "-o", out, "-q")
    assert code == 1 and err.startswith("Error: The image") and len(err.splitlines()) == 1, err
    assert "5 planes along axis Z" in err and "Pass --plane k (k from 0 to 4)" in err and "plane=" not in err
    code, err = _cli(str(path), "-o", out, "-q", "--plane", "Z=7")
    assert code == 1 and "axis Z of the image" in err and "has 5 planes, 0 to 4" in err, err
    code, err = _cli(str(path), "-o", out, "-q", "--plane", "x")
    assert code == 2 and "--plane" in err and "AXIS=INDEX" in err, err
    code, err = _cli(str(path), "-o", out, "-q", "--plane", "2", "--tile", "24")
    assert code == 0, err
    fcn = fcconv.convolutionalize(digits_model(), (1, 12, 12))  # as the command line converts it
    scale = PixelScale(1 / 255, None, None, torch.float32)
    expected = fcconv.tiled_map(fcn, path, plane=2, tile=24, transform=scale, progress=False)
    np.testing.assert_array_equal(zarr.open_group(out)["0"][...], expected)
    rgb = _tiff(tmp_path / "rgb.tif", np.moveaxis(planes[:3], 0, -1), photometric="rgb")
    code, err = _cli(str(rgb), "-o", str(tmp_path / "r.zarr"), "-q", "--layout", "CHW")
    assert code == 1 and "Error: --layout CHW contradicts the image" in err and "Drop --layout" in err, err
    assert "layout=" not in err


def test_a_picture_of_a_stack_is_refused(tmp_path: Path, planes: np.ndarray) -> None:
    path = _tiff(tmp_path / "stack.tif", planes, photometric="minisblack", metadata={"axes": "ZYX"})
    code, err = _cli(str(path), "-o", str(tmp_path / "m.png"))
    assert code == 1 and err.startswith(f"Error: {str(path)!r} has axes ZYX (shape (5, 40, 47)): a picture "
                                        "-o reads one grayscale or RGB image"), err
    assert "--plane" in err and not (tmp_path / "m.png").exists()
