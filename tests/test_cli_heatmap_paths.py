"""``fcconv heatmap``: an option that does nothing on the chosen path is refused there (issue 14, 11)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from fcconv.cli import app

DIGITS = ("fcconv.demo.digits:load_digits_model", "--input", "1,12,12")


def _refused(args: list[str], start: str) -> str:
    result = CliRunner().invoke(app, ["heatmap", *DIGITS, *args], prog_name="fcconv")
    assert result.exit_code == 2, (args, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {start}"), (args, result.stderr)
    return errors[0]


@pytest.mark.parametrize(("option", "instead"), [
    (["--scale", "0.5"], "mapped at its own size: pick a pyramid level with --level"),
    (["--alpha", "0.3"], "the --preview picture has a fixed opacity"),
    (["--top", "3"], "prints no class summary"),
    (["--cam"], "drop one"),
])
def test_picture_options_are_refused_with_a_zarr_map(tmp_path: Path, option: list[str], instead: str) -> None:
    line = _refused(["in.tif", "-o", str(tmp_path / "c.zarr"), *option],
                    f"{option[0]} does nothing with -o X.zarr (a map, tile by tile): ")
    assert instead in line
    assert not (tmp_path / "c.zarr").exists()


def test_hide_needs_the_preview_with_a_zarr_map(tmp_path: Path) -> None:
    _refused(["in.tif", "-o", str(tmp_path / "c.zarr"), "--hide", "background"],
             "--hide applies to the --preview picture; -o X.zarr stores every class. Add --preview")


@pytest.mark.parametrize(("option", "instead"), [
    (["--tile", "64"], "one pass over the whole image"),
    (["--preview", "p.png"], "the picture -o writes is the preview"),
    (["--level", "1"], "give -o X.zarr to read a pyramid level"),
    (["--workers", "2"], "give -o X.zarr to run tiles on a dask cluster"),
    (["--scheduler", "tcp://x:1"], "give -o X.zarr to run tiles on a dask cluster"),
    (["--overwrite"], "a picture is always replaced"),
    (["--layout", "HWC"], "Pillow reads pictures as they are stored"),
    (["--plane", "2"], "give -o X.zarr to map a plane of a TIFF stack"),
])
def test_tile_options_are_refused_with_a_picture(tmp_path: Path, option: list[str], instead: str) -> None:
    line = _refused(["in.png", "-o", str(tmp_path / "m.png"), *option],
                    f"{option[0]} does nothing with a picture -o (.png, .pdf, ...): ")
    assert instead in line
    assert not (tmp_path / "m.png").exists()


def test_head_impl_is_refused_where_nothing_is_converted(tmp_path: Path) -> None:
    _refused(["in.png", "-o", str(tmp_path / "m.png"), "--cam", "--head-impl", "conv"],
             "--head-impl does nothing with --cam")
    fcn = tmp_path / "digits-fcn.pt"
    made = CliRunner().invoke(app, ["convert", *DIGITS, "--to", "fcn", "-o", str(fcn)], prog_name="fcconv")
    assert made.exit_code == 0, made.output
    picture = tmp_path / "in.png"
    Image.new("L", (24, 24)).save(picture)
    for out in ("m.png", "m.zarr"):
        args = ["heatmap", str(fcn), str(picture), "-o", str(tmp_path / out), "--head-impl", "matmul"]
        result = CliRunner().invoke(app, args, prog_name="fcconv")
        assert result.exit_code == 2, result.output
        assert (f"Error: --head-impl applies when heatmap converts the model; {fcn} is already converted"
                in result.stderr), result.stderr
