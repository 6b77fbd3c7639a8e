"""What a new user hits in a fresh clone: odd --input spellings, output names, Python-only advice.

Driven through the real entry point (``fcconv.cli.app``); each test asserts the exit code and the
start of the message.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from fcconv.cli import app

BAD_INPUT = "Error: Invalid value for '--input' / '-i': "


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FCCONV_DEBUG", raising=False)


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), prog_name="fcconv")


def error_line(result: Result, code: int) -> str:
    """The one ``Error:`` line on stderr of a command that exited with ``code``."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# --------------------------------------------------------------------------------------------
# --input


@pytest.mark.parametrize("shape", ["512x7x7x", "3,,224", "3x224x", ",3,224", "3,224,224,", "3x 224xx224"])
def test_input_with_an_empty_size_is_refused(shape: str) -> None:
    line = error_line(run("explain", "Linear(25088, 4096)", "--input", shape), 2)
    assert line.startswith(f"{BAD_INPUT}expected a per-sample shape C,H,W"), line
    assert "an empty size" in line and repr(shape) in line


@pytest.mark.parametrize("shape", ["3_0,2,2", "3.0,2,2", "3,2,2a", "three,2,2"])
def test_input_with_a_non_integer_is_refused(shape: str) -> None:
    line = error_line(run("explain", "Conv2d(3, 8, 3)", "--input", shape), 2)
    assert line.startswith(f"{BAD_INPUT}expected a per-sample shape C,H,W"), line


@pytest.mark.parametrize(("shape", "start"), [
    ("-3,2,2", f"{BAD_INPUT}--input sizes must be positive; got (-3, 2, 2)"),
    ("3,0,2", f"{BAD_INPUT}--input sizes must be positive; got (3, 0, 2)"),
    ("1,3,224,224,2", f"{BAD_INPUT}--input must have rank 2 to 4"),
])
def test_input_with_nonpositive_sizes_or_a_wrong_rank_is_refused(shape: str, start: str) -> None:
    line = error_line(run("explain", "Conv2d(3, 8, 1)", "--input", shape), 2)
    assert line.startswith(start), line


@pytest.mark.parametrize("shape", ["3,8,8", " 3, 8 ,8", "3x8x8", "(3, 8, 8)", "[3,8,8]", "3 8 8", "3*8*8"])
def test_input_spellings_that_mean_one_shape(shape: str) -> None:
    result = run("explain", "Conv2d(3, 4, 3)", "--input", shape)
    assert result.exit_code == 0, result.output
    assert "on input (3, 8, 8) -> output (4, 6, 6)" in result.output


# --------------------------------------------------------------------------------------------
# convert -o


@pytest.mark.parametrize("name", ["r.txt", "model.safetensors", "model.onnx", "noext"])
def test_convert_refuses_an_output_that_is_not_a_pt_file(tmp_path: Path, name: str) -> None:
    result = run("convert", "Linear(8, 3)", "--to", "pointwise", "-o", str(tmp_path / name))
    line = error_line(result, 2)
    assert line.startswith("Error: Invalid value for '-o' / '--output': Cannot write a torch.save "
                           "checkpoint"), line
    assert "expected a .pt or .pth file" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["out.pt", "OUT.PTH"])
def test_convert_writes_pt_and_pth(tmp_path: Path, name: str) -> None:
    result = run("convert", "Linear(8, 3)", "--to", "pointwise", "-o", str(tmp_path / name))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Wrote {tmp_path / name}")


# --------------------------------------------------------------------------------------------
# Advice about Python-only arguments becomes the command line's


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(72, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.fc(x.flatten(1))


def data_dependent() -> nn.Module:
    """A model torch.fx cannot trace, loaded as ``test_cli_fresh_clone:data_dependent``."""
    return _DataDependent().eval()


PYTHON_ONLY = ("output_map", "input_map", "leaf_modules", "parameter_rounding", "example_inputs")


def test_verify_outputs_of_other_sizes_get_command_line_advice() -> None:
    line = error_line(run("verify", "Conv2d(1, 4, 3)", "Conv2d(1, 5, 3)", "--input", "1,8,8"), 1)
    assert line.startswith("Error: The outputs cannot be compared element by element: the reference "
                           "gives (2, 4, 6, 6)"), line
    assert "give --input a shape at which both give the same values" in line
    assert not any(name in line for name in PYTHON_ONLY), line


def test_verify_suggests_the_parameter_rounding_option(tmp_path: Path) -> None:
    spec, out = "Conv2d(1, 4, 3, padding=1, padding_mode='reflect')", tmp_path / "folded.pt"
    assert run("convert", spec, "--input", "1,8,8", "--to", "linear", "-o", str(out)).exit_code == 0
    result = run("verify", spec, str(out))
    assert result.exit_code == 1, result.output
    assert "pass --parameter-rounding to accept that" in result.output
    assert not any(name in result.output for name in PYTHON_ONLY), result.output
    assert run("verify", spec, str(out), "--parameter-rounding").exit_code == 0


def test_convert_of_an_untraceable_model_gets_command_line_advice(tmp_path: Path) -> None:
    result = run("convert", "test_cli_fresh_clone:data_dependent", "--input", "1,8,8", "--to", "fcn",
                 "-o", str(tmp_path / "fcn.pt"))
    line = error_line(result, 1)
    assert line.startswith("Error: Cannot trace"), line
    assert "The command line cannot keep submodules whole (leaf modules)" in line
    assert "leaf_modules=" not in line


@pytest.mark.parametrize("message", [
    "The outputs differ after output_map, flattened. If both hold the same values in other layouts, "
    "pass output_map to relate them, e.g. output_map=lambda y: y.permute(0, 2, 3, 1).",
    "Running the candidate failed: boom. If it expects another layout than the reference, pass "
    "input_map, e.g. input_map=lambda x: x.reshape(-1, 1, 2, 2).",
    "Cannot trace M: boom. To convolutionalize it, pass leaf_modules=[Block] so that it is opaque.",
    "a layout difference (NCHW vs NHWC); if intended, relate the layouts with output_map.",
])
def test_no_python_only_argument_is_advised_on_the_command_line(message: str) -> None:
    from fcconv.cli._app import for_the_command_line

    text = for_the_command_line(message)
    assert "=lambda" not in text and "=[" not in text, text
    first = re.split(r"[.;]", message)[0].replace("after output_map, ", "")
    assert re.split(r"[.;]", text)[0] == first, text  # what happened is kept


# --------------------------------------------------------------------------------------------
# demo --canvas: a test image for heatmap with the embedded model


def test_demo_canvas_is_a_picture_heatmap_reads(tmp_path: Path) -> None:
    from PIL import Image

    from fcconv.demo import CANVAS_SIZE
    from fcconv.demo.digits import make_canvas

    canvas, out = tmp_path / "canvas.png", tmp_path / "map.png"
    result = run("demo", "--canvas", str(canvas), "--seed", "3")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Wrote {canvas}: 192x64 pixels, white ink on black, ")
    assert f"fcconv heatmap fcconv.demo.digits:load_digits_model {canvas} --input 1,12,12" in result.output
    with Image.open(canvas) as picture:
        assert (picture.format, picture.mode, picture.size) == ("PNG", "L", CANVAS_SIZE[::-1])
        pixels = torch.from_numpy(np.asarray(picture).copy())
    expected = make_canvas(*CANVAS_SIZE, seed=3).image[0]  # ink 1, background 0
    assert torch.equal(pixels, (expected * 255).round().to(torch.uint8))  # white ink on black
    result = run("heatmap", "fcconv.demo.digits:load_digits_model", str(canvas), "--input", "1,12,12",
                 "--labels", "fcconv.demo.digits:CLASS_NAMES", "--hide", "background", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "Image 192x64, window (12, 12), stride (2, 2): a 27x91 map" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canvas.png", "map.png"]


@pytest.mark.parametrize("name", ["canvas.jpg", "canvas"])
def test_demo_canvas_must_be_a_png_or_a_tiff(tmp_path: Path, name: str) -> None:
    line = error_line(run("demo", "--canvas", str(tmp_path / name)), 2)
    assert line.startswith("Error: Invalid value for '--canvas': Cannot write the canvas to "), line
    assert "expected a .png, .tif or .tiff file" in line
    assert list(tmp_path.iterdir()) == []


def test_demo_canvas_as_a_tiled_tiff_of_any_size(tmp_path: Path) -> None:
    import tifffile

    canvas = tmp_path / "big.tif"
    result = run("demo", "--canvas", str(canvas), "--canvas-size", "300x420")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Wrote {canvas}: 420x300 pixels, white ink on black, ")
    assert "-o digits-map.zarr" in result.output
    with tifffile.TiffFile(canvas) as tif:
        page = tif.pages[0]
        assert (page.shape, page.dtype.name, page.is_tiled) == ((300, 420), "uint8", True)


@pytest.mark.parametrize("size", ["5x5", "300", "300x", "0x400", "3,4,5"])
def test_demo_canvas_size_is_checked(tmp_path: Path, size: str) -> None:
    line = error_line(run("demo", "--canvas", str(tmp_path / "c.tif"), "--canvas-size", size), 2)
    assert line.startswith("Error: Invalid value for '--canvas-size': expected HxW"), line
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# verify: the --grad example of --help, and progress on stderr


def test_verify_grad_example_of_the_help_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    examples = [line.strip() for line in run("verify", "--help").output.splitlines() if "digits" in line]
    assert examples == [
        "fcconv convert fcconv.demo.digits:load_digits_model --input 1,12,12 --to fcn -o digits-fcn.pt",
        "fcconv verify fcconv.demo.digits:load_digits_model digits-fcn.pt --grad",
    ]
    for example in examples:
        result = run(*example.split()[1:])
        assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("digits-fcn.pt on (1, 12, 12): equivalent")
    assert "input gradients agree" in result.output
    assert result.stderr == ""  # small models: no progress bar when stderr is not a terminal


def test_verify_of_large_models_shows_progress_on_stderr_when_piped() -> None:
    result = run("verify", "Linear(1000, 1000)", "Linear(1000, 1000)", "--input", "1000,1")
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("on (1000, 1): equivalent")
    assert "compare: 100%" in result.stderr and "4/4" in result.stderr
    quiet = run("verify", "Linear(1000, 1000)", "Linear(1000, 1000)", "--input", "1000,1", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""
