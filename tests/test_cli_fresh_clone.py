"""What a new user hits in a fresh clone: odd --input spellings, output names, Python-only advice.

Driven through the real entry point (``fcconv.cli.app``); each test asserts the exit code and the
start of the message.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

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
    assert line.startswith("Error: Invalid value for '-o' / '--output': convert writes a torch.save "
                           "checkpoint"), line
    assert "name it .pt or .pth" in line and repr(name) in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["out.pt", "OUT.PTH"])
def test_convert_writes_pt_and_pth(tmp_path: Path, name: str) -> None:
    result = run("convert", "Linear(8, 3)", "--to", "pointwise", "-o", str(tmp_path / name))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Wrote {tmp_path / name}")
