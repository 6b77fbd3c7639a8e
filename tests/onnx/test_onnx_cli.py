"""``fcconv export`` and ``fcconv onnx ...`` through the real entry point: exit codes, messages, files."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402

from fcconv.cli import app  # noqa: E402

TESTS = Path(__file__).parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _models_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))  # cli_models
    monkeypatch.delenv("FCCONV_DEBUG", raising=False)


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), prog_name="fcconv")


def one_line_error(result: Result, start: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {start}"), result.stderr


def ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_export_to_fcn_conv_only(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = run("export", "cli_models:factory", "--input", "1,8,8", "--to", "fcn", "--conv-only",
                 "-o", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert "checked in onnxruntime at 2 size(s)" in result.output
    assert "input (1, 1, 10, 11) -> (1, 3, 3, 4): max abs difference" in result.output
    assert "float64 verdict (onnx.reference, 2 size(s)): same function, max rel" in result.output
    assert "ops: Conv 3, Relu 2" in result.output and "conv-only (no Gemm, no MatMul): yes" in result.output
    assert not ops(out) & {"Gemm", "MatMul"}


def test_export_static(tmp_path: Path) -> None:
    out = tmp_path / "s.onnx"
    result = run("export", "cli_models:factory", "--input", "1,8,8", "--static", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "symbolic input dims: none (static shapes)" in result.output and "Gemm 1" in result.output
    assert "float64 verdict (onnx.reference, 1 size(s)): same function" in result.output
    result = run("export", "cli_models:factory", "--input", "1,8,8", "--static", "--certify", "float32",
                 "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "float64 verdict: not run (certify='float32')" in result.output
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 1, 8, 8]


def test_export_errors_are_one_line(tmp_path: Path) -> None:
    out = str(tmp_path / "x.onnx")
    one_line_error(run("export", "cli_models:factory", "--input", "3,8,8", "-o", out),
                   "torch.onnx.export failed on Sequential at input (2, 3, 8, 8)")
    one_line_error(run("export", "cli_models:nothing", "--input", "1,8,8", "-o", out), "")
    assert list(tmp_path.iterdir()) == []
    result = run("export", "cli_models:factory", "-o", str(tmp_path / "x.onnx"))
    assert result.exit_code == 2 and "--input" in result.stderr


def _plain_export(path: Path) -> None:
    import cli_models

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(cli_models.factory().eval(), (torch.randn(1, 1, 8, 8),), str(path), dynamo=False)


def test_onnx_convolutionalize_and_linear_to_conv(tmp_path: Path) -> None:
    src = tmp_path / "src.onnx"
    _plain_export(src)
    result = run("onnx", "convolutionalize", str(src), "--input", "1,8,8", "-o", str(tmp_path / "fcn.onnx"))
    assert result.exit_code == 0, result.output
    assert "rewritten: Flatten -> Identity 1, Gemm -> Conv 4x4 1" in result.output
    assert "input (1, 1, 8, 8) -> (1, 3, 1, 1): max abs difference" in result.output
    assert ("input (1, 1, 9, 10) -> (1, 3, 2, 3): each cell against the original file on its crop "
            "(stride 1x1)" in result.output)
    assert "float64 verdict (onnx.reference, 2 size(s)): same function" in result.output
    result = run("onnx", "linear-to-conv", str(src), "-o", str(tmp_path / "lc.onnx"))
    assert result.exit_code == 0, result.output
    assert "rewritten: Gemm -> Conv 1" in result.output
    assert "float64 verdict (onnx.reference, 1 size(s)): same function" in result.output
    assert "conv-only (no Gemm, no MatMul): yes" in result.output


def test_onnx_errors_are_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_text("hello")
    for args in (["convolutionalize", str(junk), "--input", "1,8,8"], ["linear-to-conv", str(junk)]):
        one_line_error(run("onnx", *args, "-o", str(tmp_path / "out.onnx")),
                       f"{str(junk)!r} is not a valid ONNX")
    one_line_error(run("onnx", "linear-to-conv", str(junk), "-o", str(junk)),
                   f"-o {str(junk)!r} is the input file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx"]


@pytest.mark.parametrize("name", ["export", "onnx"])
def test_help_shows_examples(name: str) -> None:
    result = run(name, "--help")
    assert result.exit_code == 0 and "Examples:" in result.output and f"fcconv {name} " in result.output


def test_missing_extra_is_one_line(tmp_path: Path) -> None:
    """Without onnxscript, the commands say which extra to install (in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['onnxscript'] = None\n"
            "from fcconv.cli import main\n"
            f"main(['export', 'Linear(4, 2)', '--input', '4,1,1', '-o', {str(tmp_path / 'x.onnx')!r}])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (
        "Error: fcconv.onnx needs the package 'onnxscript', which is not installed. "
        "Install the extra: pip install 'fcconv[onnx]'.")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", ["1,9,8", "3,8,8", "1,8", "1,8,8,8"])
def test_a_wrong_input_names_the_input_the_file_takes(tmp_path: Path, shape: str) -> None:
    src = tmp_path / "src.onnx"
    _plain_export(src)
    result = run("onnx", "convolutionalize", str(src), "--input", shape, "-o", str(tmp_path / "fcn.onnx"))
    if shape.count(",") == 2:
        one_line_error(result, "The model's input 'input.1' is (1, 1, 8, 8); the input shape")
        assert "Give its per-sample training shape (1,8,8)" in result.stderr
    else:
        one_line_error(result, "fcconv.onnx.convolutionalize handles images (C, H, W)")
    assert "onnxruntime" not in result.stderr and not (tmp_path / "fcn.onnx").exists()


def test_linear_to_conv_refuses_a_node_left_unless_allow_partial(tmp_path: Path) -> None:
    from test_onnx_rewrite import hand_made

    hand_made(tmp_path / "src.onnx")
    out = str(tmp_path / "dst.onnx")
    one_line_error(run("onnx", "linear-to-conv", str(tmp_path / "src.onnx"), "-o", out),
                   "2 Gemm/MatMul node(s) of")
    assert not (tmp_path / "dst.onnx").exists()
    result = run("onnx", "linear-to-conv", str(tmp_path / "src.onnx"), "-o", out, "--allow-partial")
    assert result.exit_code == 0, result.output
    assert "LEFT MatMul 'data_matmul': its weight B is computed, not a constant" in result.output


def test_convolutionalize_prints_an_unverified_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from test_onnx_checks import _export, _padded

    monkeypatch.setitem(sys.modules, "onnx2torch", None)
    _export(_padded(), tmp_path / "src.onnx", 13)
    result = run("onnx", "convolutionalize", str(tmp_path / "src.onnx"), "--input", "3,8,8", "-o",
                 str(tmp_path / "fcn.onnx"))
    assert result.exit_code == 0, result.output
    assert "UNVERIFIED at input (1, 3, 13, 13): node" in result.output
