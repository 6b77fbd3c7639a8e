"""The command line, driven through its real entry point: exit codes, messages, files.

Every failure must print ONE line ``Error: ...`` (exit 1; usage errors exit 2), leave no file behind,
and show a traceback only with FCCONV_DEBUG=1.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

import cli_models
from fcconv.certify import assert_equivalent
from fcconv.cli import COMMANDS, app
from fcconv.cli._app import LazyGroup
from fcconv.cli._spec import build_layer
from fcconv.errors import FcconvError
from fcconv.layers import conv_to_linear

HERE = Path(__file__).parent
OWN_COMMANDS = ("explain", "convert", "heatmap", "verify", "bench")


@pytest.fixture(autouse=True)
def _models_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.delenv("FCCONV_DEBUG", raising=False)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner(env=env).invoke(app, list(args), prog_name="fcconv")


def assert_one_line_error(result: Result, start: str, code: int = 1) -> str:
    """The command failed with status ``code`` and exactly one line ``Error: <start>...`` on stderr."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: {start}"), lines[0]
    return lines[0]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# The app


def test_help_lists_every_command() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for name in (*OWN_COMMANDS, "demo"):
        assert f"  {name} " in result.output
    assert "Examples:" in result.output and "FCCONV_DEBUG=1" in result.output


@pytest.mark.parametrize("name", OWN_COMMANDS)
def test_help_of_every_command_shows_an_example(name: str) -> None:
    result = run(name, "--help")
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output
    assert f"fcconv {name} " in result.output


def test_version() -> None:
    import fcconv

    result = run("--version")
    assert result.exit_code == 0
    assert fcconv.__version__ in result.output


def test_unknown_command_is_a_usage_error() -> None:
    result = run("explian")
    assert result.exit_code == 2
    assert "No such command 'explian'" in result.stderr


def test_help_imports_no_command_module() -> None:
    code = (
        "import sys; from fcconv.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "loaded = [m for m in sys.modules if m.startswith('fcconv.cli.')]\n"
        "print(sorted(m for m in loaded if not m.startswith('fcconv.cli._')),"
        " 'matplotlib' in sys.modules, 'torchvision' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[] False False"), out


def test_python_dash_m_runs_the_app() -> None:
    command = [sys.executable, "-m", "fcconv.cli", "explain", "Linear(4, 2)", "--input", "1,2,2"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "scenario 1" in result.stdout


def test_a_broken_command_module_breaks_only_its_command() -> None:
    group = LazyGroup("fcconv", lazy_commands={
        "explain": COMMANDS["explain"],
        "broken": ("cli_models_no_such_module", "A command whose module is missing."),
        "buggy": ("cli_models", "A module without a command object."),
    })
    runner = CliRunner()
    listing = runner.invoke(group, ["--help"])
    assert listing.exit_code == 0 and "broken" in listing.output and "A command whose" in listing.output
    result = runner.invoke(group, ["broken", "x"])
    assert_one_line_error(result, "The 'broken' command is not available")
    assert "cli_models_no_such_module" in result.stderr
    assert_one_line_error(runner.invoke(group, ["buggy"]), "The 'buggy' command is not available")
    assert runner.invoke(group, ["explain", "Linear(4, 2)", "--input", "4,1,1"]).exit_code == 0


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fcconv.cli.explain as explain_module

    def crash(module: nn.Module, shape: tuple[int, ...]) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(explain_module, "explain", crash)
    result = run("explain", "Linear(4, 2)", "--input", "4,1,1")
    line = assert_one_line_error(result, "unexpected RuntimeError: boom second line")
    assert "FCCONV_DEBUG=1" in line
    debug = run("explain", "Linear(4, 2)", "--input", "4,1,1", env={"FCCONV_DEBUG": "1"})
    assert debug.exit_code == 1
    assert isinstance(debug.exception, RuntimeError)


def test_debug_traceback_through_the_console_script(tmp_path: Path) -> None:
    env = {**os.environ, "FCCONV_DEBUG": "1"}
    result = subprocess.run([sys.executable, "-m", "fcconv.cli", "explain", "Foo(1)", "--input", "1,2,2"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "fcconv.errors.FcconvError: Cannot read the layer spec 'Foo(1)'" in result.stderr
    plain = subprocess.run([sys.executable, "-m", "fcconv.cli", "explain", "Foo(1)", "--input", "1,2,2"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode == 1
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()]
    assert plain.stderr.startswith("Error: Cannot read the layer spec 'Foo(1)'")


# --------------------------------------------------------------------------------------------
# explain


def test_explain_prints_the_explanation() -> None:
    result = run("explain", "Linear(25088, 4096)", "--input", "512x7x7")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(
        "Linear(in_features=25088, out_features=4096, bias=True) on input (512, 7, 7)"
    )
    assert "Conv2d(512, 4096, kernel_size=7)" in result.output
    assert result.stderr == ""


def test_explain_pointwise_and_json() -> None:
    import json

    result = run("explain", "Conv2d(4,2,kernel_size=1)", "--input", "4,1,1", "--json")
    assert result.exit_code == 0, result.output
    fields = json.loads(result.output)
    assert fields["relation"] in ("pointwise", "kernel_covers_input")
    assert "pointwise" in fields["holds"] and fields["input_shape"] == [4, 1, 1]
    assert fields["equivalent_layer"].startswith("Linear(4, 2)") and fields["built_by"].startswith("fcconv.")


def test_explain_takes_a_factory_too() -> None:
    result = run("explain", "cli_models:conv_layer", "--input", "2,5,5")
    assert result.exit_code == 0, result.output
    assert "Conv2d(2, 3" in result.output


@pytest.mark.parametrize(
    "spec",
    ["Conv2d(4,2", "Foo(1, 2)", "Linear(4, 2, bias=open('x'))", "Linear(4, 2)[0]", "Linear(4, 2, 3, 4, 5)"],
)
def test_explain_malformed_spec(spec: str) -> None:
    assert_one_line_error(run("explain", spec, "--input", "4,1,1"), "Cannot read the layer spec")


def test_explain_refuses_code_injection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for attack in (
        "__import__('os').system('touch pwned')",
        "Linear(__import__('os').system('touch pwned'), 2)",
        "Linear(4, 2, bias=__import__('os').system('touch pwned'))",
    ):
        assert_one_line_error(run("explain", attack, "--input", "4,1,1"), "Cannot read the layer spec")
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("shape", ["3,x", "0,2,2", "1", "1,2,3,4,5", "", "3,2.5,2", "-3,2,2"])
def test_wrong_input_shape_is_a_usage_error(shape: str) -> None:
    result = run("explain", "Linear(4, 2)", "--input", shape)
    assert result.exit_code == 2
    assert "Invalid value for '--input'" in result.stderr
    assert "3,224,224" in result.stderr


def test_explain_shape_that_does_not_fit() -> None:
    result = run("explain", "Linear(4, 2)", "--input", "5,1,1")
    assert_one_line_error(result, "Cannot relate Linear(in_features=4)")


def test_missing_input_is_a_usage_error() -> None:
    result = run("explain", "Linear(4, 2)")
    assert result.exit_code == 2
    assert "Missing option '--input'" in result.stderr


# --------------------------------------------------------------------------------------------
# convert


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_convert_conv_to_linear(tmp_path: Path) -> None:
    out = tmp_path / "linear.pt"
    spec = "Conv2d(2, 3, 3, padding=1)"
    result = run("convert", spec, "--input", "2,5,5", "--to", "linear", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert f"Wrote {out}" in result.output
    saved = _load(out)
    assert saved["to"] == "linear" and saved["source"] == spec and saved["input_shape"] == (2, 5, 5)
    assert saved["geometry"]["output_shape"] == (3, 5, 5)
    assert saved["module"] == "Linear(50, 75, bias=True)"
    assert isinstance(saved["fcconv_version"], str)
    linear = build_layer(saved["module"])
    linear.load_state_dict(saved["state_dict"])
    conv = build_layer(spec, seed=0)  # the command's default seed: the same weights
    assert_equivalent(conv, linear, (2, 5, 5), input_map=lambda v: v.flatten(1))
    assert files_in(tmp_path) == ["linear.pt"]


def test_convert_linear_to_pointwise(tmp_path: Path) -> None:
    out = tmp_path / "pw.pt"
    result = run("convert", "cli_models:linear_layer", "--to", "pointwise", "--input", "8,4", "-o", str(out))
    assert result.exit_code == 0, result.output
    saved = _load(out)
    conv = build_layer(saved["module"])
    assert isinstance(conv, nn.Conv1d) and conv.kernel_size == (1,)
    conv.load_state_dict(saved["state_dict"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        linear = cli_models.linear_layer()
    assert_equivalent(linear, conv, (4, 8), input_map=lambda v: v.transpose(1, 2),
                      output_map=lambda y: y.transpose(1, 2))


def test_convert_checkpoint_with_factory(tmp_path: Path) -> None:
    source = cli_models.conv_layer()
    ckpt = tmp_path / "conv.pt"
    torch.save(source.state_dict(), ckpt)
    before = digest(ckpt)
    out = tmp_path / "out.pt"
    result = run("convert", str(ckpt), "--factory", "cli_models:conv_layer", "--input", "2,4,4",
                 "--to", "linear", "-o", str(out))
    assert result.exit_code == 0, result.output
    expected = conv_to_linear(source, (2, 4, 4))
    assert torch.equal(_load(out)["state_dict"]["weight"], expected.weight.detach())
    assert _load(out)["structure"] == "cli_models:conv_layer"
    assert digest(ckpt) == before


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["torchvision:resnet181", "--to", "fcn", "--input", "3,32,32"],
         "Unknown torchvision model 'resnet181'"),
        (["resnet18", "--to", "fcn", "--input", "3,32,32"], "Unknown model 'resnet18'"),
        (["no_such_pkg_xyz:make", "--to", "fcn", "--input", "3,32,32"], "Cannot import 'no_such_pkg_xyz'"),
        (["Conv2d(2,3", "--to", "linear", "--input", "2,4,4"], "Cannot read the layer spec"),
        (["nope.pt", "--to", "linear", "--input", "2,4,4"], "Checkpoint file 'nope.pt' not found"),
        (["Linear(8, 3)", "--to", "linear", "--input", "8,1,1"], "MODEL is already a Linear"),
        (["Conv2d(2, 3, 3)", "--to", "pointwise"], "MODEL is already a convolution"),
        (["Conv2d(2, 3, 3)", "--to", "linear"], "--to linear needs --input"),
        (["Linear(8, 3)", "--to", "pointwise", "--input", "4,2,2"], "--to pointwise applies the Linear"),
        (["cli_models:factory", "--to", "linear", "--input", "1,8,8"], "--to linear converts one conv layer"),
        (["Conv2d(2, 3, 3)", "--to", "linear", "--input", "3,4,4"], "conv_to_linear: Conv2d(in_channels=2)"),
    ],
)
def test_convert_errors_leave_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
                                      start: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run("convert", *args, "-o", "out.pt"), start)
    assert files_in(tmp_path) == []


def test_convert_torchvision_name_resolves() -> None:
    pytest.importorskip("torchvision")
    result = run("convert", "torchvision:squeezenet1_1", "--to", "linear", "--input", "3,64,64", "-o", "x.pt")
    assert_one_line_error(result, "--to linear converts one conv layer; MODEL is a SqueezeNet")


def test_convert_missing_or_corrupt_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 20)
    before = digest(bad)
    out = tmp_path / "out.pt"
    result = run("convert", str(bad), "--factory", "cli_models:factory", "--to", "fcn", "--input", "1,8,8",
                 "-o", str(out))
    assert_one_line_error(result, f"Cannot read '{bad}': not a PyTorch checkpoint, or a corrupt one")
    pickled = tmp_path / "pickled.pt"
    torch.save(nn.Linear(2, 2), pickled)
    result = run("convert", str(pickled), "--factory", "Linear(2, 2)", "--to", "pointwise", "-o", str(out))
    assert_one_line_error(result, f"'{pickled}' is not a weights-only checkpoint")
    weights = tmp_path / "w.pt"
    torch.save(cli_models.factory().state_dict(), weights)
    result = run("convert", str(weights), "--to", "fcn", "--input", "1,8,8", "-o", str(out))
    assert_one_line_error(result, f"'{weights}' holds weights only")
    result = run("convert", str(weights), "--factory", "cli_models:conv_layer", "--to", "linear",
                 "--input", "2,4,4", "-o", str(out))
    assert_one_line_error(result, f"The weights of '{weights}' do not fit the model from cli_models:")
    assert digest(bad) == before
    assert files_in(tmp_path) == ["bad.pt", "pickled.pt", "w.pt"]


def test_convert_unwritable_output(tmp_path: Path) -> None:
    args = ["convert", "Linear(8, 3)", "--to", "pointwise", "-o"]
    result = run(*args, str(tmp_path / "missing" / "out.pt"))
    assert result.exit_code == 2 and "does not exist" in result.stderr
    result = run(*args, str(tmp_path))
    assert result.exit_code == 2 and "is a directory" in result.stderr
    (tmp_path / "file").write_text("x")
    result = run(*args, str(tmp_path / "file" / "out.pt"))
    assert result.exit_code == 2
    assert files_in(tmp_path) == ["file"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_convert_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = run("convert", "Linear(8, 3)", "--to", "pointwise", "-o", str(folder / "out.pt"))
        assert result.exit_code == 2 and "is not writable" in result.stderr
    finally:
        folder.chmod(0o700)


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.pt"
    out.write_bytes(b"previous result")

    def full_disk(obj: object, f: object) -> None:
        Path(str(f)).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    result = run("convert", "Linear(8, 3)", "--to", "pointwise", "-o", str(out))
    assert_one_line_error(result, f"Cannot write a torch.save checkpoint to '{out}': No space left on device")
    assert files_in(tmp_path) == ["out.pt"]
    assert out.read_bytes() == b"previous result"


def test_convert_never_overwrites_its_input(tmp_path: Path) -> None:
    ckpt = tmp_path / "conv.pt"
    torch.save(cli_models.conv_layer().state_dict(), ckpt)
    before = digest(ckpt)
    result = run("convert", str(ckpt), "--factory", "cli_models:conv_layer", "--to", "linear",
                 "--input", "2,4,4", "-o", str(ckpt))
    assert_one_line_error(result, f"-o '{ckpt}' is the input file")
    assert digest(ckpt) == before


def test_convert_output_is_written_with_usual_permissions(tmp_path: Path) -> None:
    out = tmp_path / "pw.pt"
    assert run("convert", "Linear(8, 3)", "--to", "pointwise", "-o", str(out)).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_convert_to_fcn_and_load_it_back(tmp_path: Path) -> None:
    from fcconv.cli._loading import load_model

    out = tmp_path / "fcn.pt"
    result = run("convert", "cli_models:factory", "--input", "1,8,8", "--to", "fcn", "-o", str(out))
    assert result.exit_code == 0, result.output
    saved = _load(out)
    assert saved["to"] == "fcn" and saved["input_shape"] == (1, 8, 8)
    assert tuple(saved["geometry"]["window"]) == (8, 8)
    assert tuple(saved["geometry"]["stride"]) == (1, 1)
    fcn = load_model(str(out)).module
    source = load_model("cli_models:factory").module
    assert_equivalent(source, fcn, (1, 8, 8))
    big = torch.randn(1, 1, 11, 13)
    assert fcn(big).shape == (1, 3, 4, 6)


def test_fcn_file_from_a_checkpoint_rebuilds_with_its_factory(tmp_path: Path) -> None:
    from fcconv.cli._loading import load_model

    trained = cli_models.other_factory()
    ckpt, out = tmp_path / "w.pt", tmp_path / "fcn.pt"
    torch.save(trained.state_dict(), ckpt)
    result = run("convert", str(ckpt), "--factory", "cli_models:factory", "--input", "1,8,8", "--to", "fcn",
                 "-o", str(out))
    assert result.exit_code == 0, result.output
    assert _load(out)["structure"] == "cli_models:factory"
    fcn = load_model(str(out)).module
    assert_equivalent(trained.eval(), fcn, (1, 8, 8))
    with pytest.raises(FcconvError, match="^The weights of .* do not fit the model cli_models:factory conv"):
        load_model(str(out), factory="cli_models:factory", kwargs="classes=4")


def test_convert_single_linear_to_fcn_is_the_covering_conv(tmp_path: Path) -> None:
    out = tmp_path / "fc.pt"
    result = run("convert", "Linear(12, 5)", "--input", "3,2,2", "--to", "fcn", "-o", str(out))
    assert result.exit_code == 0, result.output
    saved = _load(out)
    assert tuple(saved["geometry"]["window"]) == (2, 2)


def test_convert_to_fcn_needs_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("convert", "cli_models:factory", "--to", "fcn", "-o", "o.pt")
    assert_one_line_error(result, "--to fcn needs --input")
    assert files_in(tmp_path) == []


# --------------------------------------------------------------------------------------------
# bench


def test_bench_lists_the_repository_benchmarks() -> None:
    result = run("bench", "--list")
    assert result.exit_code == 0, result.output
    assert "conv_matrix" in result.output


def test_bench_unknown_name() -> None:
    assert_one_line_error(run("bench", "no_such_bench"), "'no_such_bench' is not a benchmark")


def test_bench_not_found_outside_a_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcconv.cli.bench as bench

    monkeypatch.setattr(bench, "_candidates", lambda: [tmp_path / "bench"])
    assert_one_line_error(run("bench"), "No benchmarks found")


def test_bench_streams_output_and_passes_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcconv.cli.bench as bench

    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "fake.py").write_text("import sys\nprint('ratio 3.0x', sys.argv[1:])\n")
    (folder / "failing.py").write_text("print('half way'); raise SystemExit(3)\n")
    (folder / "_helper.py").write_text("raise SystemExit(9)\n")
    monkeypatch.setattr(bench, "_candidates", lambda: [folder])
    result = run("bench", "fake", "--quick", "--args", "--repeat 2")
    assert result.exit_code == 0, result.output
    assert "ratio 3.0x ['--quick', '--repeat', '2']" in result.output
    result = run("bench")
    assert "half way" in result.output and "ratio 3.0x" in result.output
    assert_one_line_error(result, "Benchmark failed: failing.py (exit status 3)")


# --------------------------------------------------------------------------------------------
# verify


def test_verify_a_conversion_is_equivalent(tmp_path: Path) -> None:
    out = tmp_path / "linear.pt"
    converted = run("convert", "Conv2d(2, 3, 3)", "--input", "2,5,5", "--to", "linear", "-o", str(out))
    assert converted.exit_code == 0
    result = run("verify", "Conv2d(2, 3, 3)", str(out))
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(f"Conv2d(2, 3, 3) vs {out} on (2, 5, 5): equivalent")


def test_verify_prints_the_error_ratio_and_runs_in_bfloat16(tmp_path: Path) -> None:
    out = tmp_path / "linear.pt"
    converted = run("convert", "Conv2d(2, 3, 3)", "--input", "2,5,5", "--to", "linear", "-o", str(out))
    assert converted.exit_code == 0
    result = run("verify", "Conv2d(2, 3, 3)", str(out))
    assert result.exit_code == 0 and "error ratio (float32)" in result.output, result.output
    half = run("verify", "Conv2d(2, 3, 3)", str(out), "--dtype", "bfloat16")
    assert half.exit_code == 0, half.output
    assert "error ratio (bfloat16)" in half.output and " ok" in half.output.split("error ratio (bfloat16)")[1]


def test_verify_different_models_exits_1() -> None:
    result = run("verify", "cli_models:factory", "cli_models:other_factory", "--input", "1,8,8")
    assert result.exit_code == 1
    assert "NOT equivalent" in result.output
    assert result.stderr == ""


def test_verify_an_fcn_conversion_with_grad(tmp_path: Path) -> None:
    out = tmp_path / "fcn.pt"
    converted = run("convert", "cli_models:factory", "--input", "1,8,8", "--to", "fcn", "-o", str(out))
    assert converted.exit_code == 0
    result = run("verify", "cli_models:factory", str(out), "--grad")
    assert result.exit_code == 0, result.output
    assert "equivalent" in result.output.splitlines()[-1]


def test_verify_needs_an_input_shape() -> None:
    result = run("verify", "Linear(4, 2)", "Linear(4, 2)")
    assert result.exit_code == 2
    assert "Missing option '--input'" in result.stderr


def test_verify_a_candidate_that_cannot_run_gets_command_line_advice() -> None:
    result = run("verify", "Conv2d(1, 10, 3)", "Conv2d(2, 10, 3)", "--input", "1,8,8")
    line = assert_one_line_error(
        result, "Running the candidate Conv2d(2, 10, 3) on inputs of shape (2, 1, 8, 8)"
    )
    assert "--input" in line
    assert "input_map" not in line and "example_inputs" not in line  # Python advice has no place here


def test_verify_bad_reference() -> None:
    assert_one_line_error(run("verify", "resnet18", "Linear(4, 2)", "--input", "4,1,1"), "Unknown model")


# --------------------------------------------------------------------------------------------
# heatmap


def _digits_png(path: Path) -> None:
    from PIL import Image

    from fcconv.demo.digits import make_canvas

    canvas = make_canvas(32, 64, seed=1)
    pixels = (canvas.image[0] * 255).round().to(torch.uint8).numpy()
    Image.fromarray(pixels, mode="L").save(path)


def test_heatmap_of_the_digits_model(tmp_path: Path) -> None:
    from PIL import Image

    image, out = tmp_path / "canvas.png", tmp_path / "map.png"
    _digits_png(image)
    result = run("heatmap", "fcconv.demo.digits:load_digits_model", str(image), "--input", "1,12,12",
                 "--labels", "fcconv.demo.digits:CLASS_NAMES", "--hide", "background", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "window (12, 12), stride (2, 2): a 11x27 map" in result.output
    assert "Top classes: background" in result.output
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        colours = picture.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # not blank
    assert files_in(tmp_path) == ["canvas.png", "map.png"]
    result = run("heatmap", "fcconv.demo.digits:load_digits_model", str(image), "--input", "1,12,12",
                 "--hide", "background", "-o", str(tmp_path / "other.png"))
    assert_one_line_error(result, "--hide 'background' is not a class name; the names are 0, 1, 2")
    assert files_in(tmp_path) == ["canvas.png", "map.png"]


def test_heatmap_errors_leave_no_file(tmp_path: Path) -> None:
    from PIL import Image

    small, out = tmp_path / "small.png", tmp_path / "map.png"
    Image.new("L", (6, 6)).save(small)
    args = ["heatmap", "cli_models:factory"]
    assert_one_line_error(run(*args, str(small), "--input", "1,8,8", "-o", str(out)),
                          "The image is 6x6 pixels, smaller than the model's window 8x8")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    result = run(*args, str(text), "--input", "1,8,8", "-o", str(out))
    assert_one_line_error(result, f"Cannot read '{text}' as an image")
    assert_one_line_error(run(*args, str(tmp_path / "none.png"), "--input", "1,8,8", "-o", str(out)), "Image")
    result = run(*args, str(small), "--input", "2,8,8", "--kwargs", "channels=2", "-o", str(out))
    assert_one_line_error(result, "heatmap reads images as grayscale")
    assert files_in(tmp_path) == ["notes.png", "small.png"]


def test_heatmap_needs_input_and_a_picture_format(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    result = run("heatmap", "cli_models:factory", str(image), "-o", str(tmp_path / "out.png"))
    assert result.exit_code == 2 and "Missing option '--input'" in result.stderr
    result = run("heatmap", "cli_models:factory", str(image), "-i", "1,8,8", "-o", str(tmp_path / "o.txt"))
    assert result.exit_code == 2 and "expected a .png" in result.stderr


def test_fcconv_error_is_a_value_error() -> None:
    # The CLI relies on the one error family; a guard against it changing under us.
    assert issubclass(FcconvError, ValueError)
    assert isinstance(app, click.Group)


def test_verify_a_pointwise_conversion_applies_the_linear_over_channels(tmp_path: Path) -> None:
    out = tmp_path / "pw.pt"
    converted = run("convert", "Linear(8, 3)", "--to", "pointwise", "--input", "8,5", "-o", str(out))
    assert converted.exit_code == 0
    result = run("verify", "Linear(8, 3)", str(out))
    assert result.exit_code == 0, result.output
    assert "REFERENCE is a Linear on inputs (8, 5): it is applied over the channels" in result.output


def test_adapt_to_input_reads_a_linear_both_ways() -> None:
    from fcconv.cli.verify import adapt_to_input

    linear = nn.Linear(12, 2)
    flat, note = adapt_to_input(linear, (3, 2, 2))
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(flat(x), linear(x.flatten(1))) and "flattened" in str(note)
    channels, note = adapt_to_input(nn.Linear(3, 2), (3, 4))
    assert channels(torch.randn(5, 3, 4)).shape == (5, 2, 4) and "channels" in str(note)
    conv = nn.Conv2d(3, 2, 1)
    assert adapt_to_input(conv, (3, 2, 2)) == (conv, None)
