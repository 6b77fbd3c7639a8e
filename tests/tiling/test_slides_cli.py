"""``fcconv heatmap ... -o X.zarr`` on a slide: --mpp, --mask, --scores, --class-names, --class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from slide_support import make_svs, seeded_rgb_net, tissue_picture

import fcconv
from fcconv.cli import app
from fcconv.cli.tiles import PixelScale

zarr = pytest.importorskip("zarr")
pytest.importorskip("tiffslide")
pytest.importorskip("matplotlib")

MODEL = ("slide_support:seeded_rgb_net", "--input", "3,16,16")


def _run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), prog_name="fcconv")


@pytest.fixture(scope="module")
def svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_svs(tmp_path_factory.mktemp("slide") / "slide.svs", tissue_picture(512))


def test_slide_options_through_the_command(svs: Path, tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("tumour\nstroma\nimmune\nnecrosis\nfat\n", encoding="utf-8")
    out, preview = tmp_path / "map.zarr", tmp_path / "preview.png"
    result = _run("heatmap", *MODEL, str(svs), "-o", str(out), "--mpp", "1.0", "--mask", "otsu",
                  "--scores", "probabilities", "--class-names", str(names), "--preview", str(preview),
                  "--class", "stroma", "--tile", "160", "-q")
    assert result.exit_code == 0, (result.output, result.exception)
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fcn = fcconv.convolutionalize(seeded_rgb_net(), (3, 16, 16))
    expected = fcconv.tiled_map(fcn, svs, mpp=1.0, tile=160, mask="otsu", scores="probabilities",
                                transform=PixelScale(1 / 255, None, None, torch.float32), progress=False)
    got = np.asarray(zarr.open(str(out), mode="r")["0"] if not hasattr(zarr.open(str(out), mode="r"), "shape")
                     else zarr.open_array(str(out), mode="r"))
    assert got.shape == (5, 31, 31)  # level 1 (256 px), stride 8
    np.testing.assert_array_equal(got, expected)
    assert np.isnan(got[:, :, -1]).all() and np.isfinite(got[:, :, 0]).all()


def test_dtype_runs_the_model_in_float64(svs: Path, tmp_path: Path) -> None:
    out = tmp_path / "map64.zarr"
    result = _run("heatmap", *MODEL, str(svs), "-o", str(out), "--mpp", "2.0", "--dtype", "float64",
                  "--no-prefetch", "--tile", "256", "-q")
    assert result.exit_code == 0, (result.output, result.exception)
    node = zarr.open(str(out), mode="r")
    got = np.asarray(node if hasattr(node, "shape") else node["0"])
    fcn = fcconv.convolutionalize(seeded_rgb_net().double(), (3, 16, 16))
    expected = fcconv.tiled_map(fcn, svs, mpp=2.0, tile=256, progress=False,
                                transform=PixelScale(1 / 255, None, None, torch.float64))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("args", "start"), [
    (("--mpp", "0.1"), "mpp 0.1 (level 0: 0.5 mpp) is finer than the slide's level 0"),
    (("--mask", "nowhere.png"), "mask 'nowhere.png' is neither 'otsu' nor an image file"),
    (("--mpp", "1", "--preview", "p.png", "--class", "zebra"), "class 'zebra' is not a class of this map")])
def test_bad_slide_options_are_one_line_errors(svs: Path, tmp_path: Path, args: tuple[str, ...],
                                               start: str) -> None:
    result = _run("heatmap", *MODEL, str(svs), "-o", str(tmp_path / "m.zarr"), "--tile", "256", "-q", *args)
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {start}"), result.stderr
