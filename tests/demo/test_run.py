"""``fcconv demo``: the textbook numbers, dense == sliding, detection, the picture, the command line."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fcconv import compare
from fcconv._io import IMAGE_SUFFIXES, check_output_path
from fcconv.cli.demo import command
from fcconv.demo import (
    FIGURE_DPI,
    FIGURE_SIZE,
    DemoResult,
    Detection,
    detect,
    match_detections,
    run_demo,
    textbook,
)
from fcconv.demo.digits import BACKGROUND, NUM_CLASSES, Canvas, load_digits_model, make_canvas
from fcconv.errors import FcconvError
from fcconv.models import SlidingWindow, convolutionalize, sliding_window

FIGURE_PIXELS = (int(FIGURE_SIZE[0] * FIGURE_DPI), int(FIGURE_SIZE[1] * FIGURE_DPI))  # (1200, 800)
SEED_NUMBERS = ("-0.4775", "-2.1469")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, list[str]]:
    lines: list[str] = []
    result = run_demo(tmp_path_factory.mktemp("demo") / "demo.png", progress=False, echo=lines.append)
    return result, lines


@pytest.fixture()
def demo(demo_run: tuple[DemoResult, list[str]]) -> DemoResult:
    return demo_run[0]


def _picture_ok(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == FIGURE_PIXELS
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.var() > 100.0  # not blank: a white page has variance 0


# ------------------------------------------------------------------------------------------------
# Act 1: the textbook


def test_textbook_gives_the_seed_numbers_bit_identically():
    book = textbook()
    assert [round(v, 4) for v in book.linear] == [-0.4775, -2.1469]
    assert book.conv == book.linear and book.pointwise == book.linear
    assert book.conv_identical and book.pointwise_identical


def test_textbook_leaves_the_global_random_state_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    textbook()
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------------------------
# Act 2: the dense map and detection


def test_dense_map_has_the_geometry_of_the_canvas(demo: DemoResult):
    assert demo.window == (12, 12) and demo.stride == (2, 2)
    assert demo.exact_sliding_window
    assert demo.grid_shape == ((64 - 12) // 2 + 1, (192 - 12) // 2 + 1)  # (27, 91)


def test_dense_map_equals_sliding_window_up_to_rounding(demo: DemoResult):
    eq = demo.equality
    assert demo.equivalent and eq.report.equivalent and eq.report.bound_ok
    assert eq.report.float64_max_rel < 1e-10  # measured 5.7e-16
    assert eq.same_winner_float32 == 1.0 and eq.report.max_abs < 1e-3


def test_compare_catches_a_sliding_window_shifted_by_one_pixel():
    model = load_digits_model()
    canvas = make_canvas(seed=1).image[None, :, :40, :40]
    fcn = convolutionalize(model, (1, 12, 12))

    class Shifted(torch.nn.Module):  # each window read one pixel to the right
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            padded = torch.nn.functional.pad(x, (0, 1))[..., 1:]
            return sliding_window(self.model, padded, window=fcn.window, stride=fcn.stride, progress=False)

    assert compare(SlidingWindow(model, window=fcn.window, stride=fcn.stride), fcn, inputs=canvas).equivalent
    assert not compare(Shifted(), fcn, inputs=canvas).equivalent


def test_detection_precision_and_recall_above_the_measured_floor(demo: DemoResult):
    # Measured: 23 of 24 right on seed 0; mean 98.9%, minimum 91.7% over seeds 0-99.
    assert demo.precision >= 0.9 and demo.recall >= 0.9
    assert len(demo.found) == len(demo.canvas.labels) == 24
    assert sum(d.correct for d in demo.detections) == sum(demo.found)


def test_timings_and_flop_counts_are_reported(demo: DemoResult):
    # Times are printed, not asserted (speed goals live in bench/); the work saved is deterministic.
    assert demo.dense_seconds > 0 and demo.sliding_seconds > 0
    assert demo.speedup == demo.sliding_seconds / demo.dense_seconds
    assert demo.sliding_flops / demo.dense_flops > 5  # measured 8.8


def test_detect_keeps_the_strongest_cell_and_suppresses_its_neighbours():
    probabilities = torch.zeros(NUM_CLASSES, 5, 10)
    probabilities[BACKGROUND] = 1.0
    for (i, j), label, p in [((2, 2), 3, 0.9), ((2, 3), 5, 0.8), ((2, 8), 7, 0.6), ((0, 0), 1, 0.4)]:
        probabilities[:, i, j] = 0.0
        probabilities[label, i, j], probabilities[BACKGROUND, i, j] = p, 1 - p

    def window_of(cell: tuple[int, int]) -> tuple[int, int, int, int]:
        i, j = cell
        return (2 * i, 2 * j, 2 * i + 12, 2 * j + 12)

    found = detect(probabilities, window_of, threshold=0.5, radius=5.0)
    assert [(d.cell, d.label) for d in found] == [((2, 2), 3), ((2, 8), 7)]  # (2, 3) suppressed, (0, 0) weak
    assert found[0].center == (10.0, 10.0) and found[0].box == (6.0, 6.0, 14.0, 14.0)


def test_match_detections_needs_the_right_digit_within_the_tolerance():
    canvas = Canvas(image=torch.zeros(1, 32, 64), boxes=((6, 6, 14, 14), (6, 30, 14, 38)), labels=(3, 4))
    detections = [
        Detection((0, 0), (11.0, 11.0), 3, 0.9),  # 1 px off: right
        Detection((0, 1), (10.0, 34.0), 9, 0.8),  # right place, wrong digit
        Detection((0, 2), (10.0, 50.0), 4, 0.7),  # right digit, wrong place
    ]
    marked, found = match_detections(detections, canvas, tolerance=2.0)
    assert [d.correct for d in marked] == [True, False, False]
    assert found == [True, False]


# ------------------------------------------------------------------------------------------------
# The picture and the summary


def test_picture_has_the_documented_size_and_is_not_blank(demo: DemoResult):
    assert demo.picture.exists()
    _picture_ok(demo.picture)
    leftovers = [p.name for p in demo.picture.parent.iterdir() if p != demo.picture]
    assert leftovers == []  # the temporary file was renamed, not left behind


def test_summary_prints_the_seed_numbers_and_the_measurements(demo_run: tuple[DemoResult, list[str]]):
    demo, printed = demo_run
    text = "\n".join(printed)
    for number in SEED_NUMBERS:
        assert text.count(number) == 3
    assert text.count("bit-identical to the Linear") == 2 and "NOT" not in text
    assert "equal up to rounding in all 27027 values" in text
    assert "faster" in text and "fewer FLOPs" in text and "precision" in text and "recall" in text
    assert str(demo.picture) in text
    assert len(printed) <= 20  # short


# ------------------------------------------------------------------------------------------------
# Bad output paths


def test_check_output_path_accepts_a_writable_png(tmp_path: Path):
    assert check_output_path(tmp_path / "x.png", suffixes=IMAGE_SUFFIXES) == tmp_path / "x.png"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing/out.png", "Cannot write the demo picture to .*: folder .* does not exist"),
        ("out.txt", "Cannot write the demo picture to .*: expected a .png, .pdf"),
        ("", "Cannot write the demo picture to .*: it is a folder"),
    ],
)
def test_check_output_path_rejects_bad_paths(tmp_path: Path, name: str, message: str):
    with pytest.raises(FcconvError, match="^" + message):
        check_output_path(tmp_path / name if name else tmp_path, what="the demo picture",
                          suffixes=IMAGE_SUFFIXES)


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write to: a locked one, or for root (who ignores modes) /sys."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        return locked
    sys_folder = Path("/sys")
    try:
        with tempfile.NamedTemporaryFile(dir=sys_folder):
            pass
    except OSError:
        return sys_folder
    pytest.skip("no unwritable folder to test with")


def test_run_demo_refuses_an_unwritable_folder_before_any_work(tmp_path: Path):
    folder = _unwritable_folder(tmp_path)
    message = "^Cannot write the demo picture to .*(not writable|Permission denied)"
    with pytest.raises(FcconvError, match=message):
        run_demo(folder / "demo.png", progress=False, echo=None)
    assert not (folder / "demo.png").exists()


# ------------------------------------------------------------------------------------------------
# The command line


def test_command_help_has_an_example():
    result = CliRunner().invoke(command, ["--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output and "fcconv demo --output" in result.output


def test_real_entry_point_runs_the_demo(tmp_path: Path):
    app = pytest.importorskip("fcconv.cli").app
    out = tmp_path / "picture.png"
    result = CliRunner().invoke(app, ["demo", "--output", str(out), "--no-progress", "--seed", "0"])
    assert result.exit_code == 0, result.output
    for number in SEED_NUMBERS:
        assert number in result.output
    _picture_ok(out)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("missing/out.png", "does not exist"),
        ("not-a-folder.txt/out.png", "does not exist"),
        ("out.gif", "expected a .png, .pdf"),
    ],
)
def test_bad_output_is_a_usage_error_and_leaves_no_file(tmp_path: Path, output: str, message: str):
    app = pytest.importorskip("fcconv.cli").app
    (tmp_path / "not-a-folder.txt").write_text("a file")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["demo", "--output", str(tmp_path / output), "--no-progress"])
    assert result.exit_code == 2  # a usage error, as for `fcconv convert -o` and `heatmap -o`
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    assert errors[0].startswith(
        "Error: Invalid value for '--output' / '-o': Cannot write the demo picture to "
    )
    assert message in errors[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_unwritable_output_folder_exits_non_zero_with_one_error_line(tmp_path: Path):
    app = pytest.importorskip("fcconv.cli").app
    folder = _unwritable_folder(tmp_path)
    result = CliRunner().invoke(app, ["demo", "--output", str(folder / "demo.png"), "--no-progress"])
    # 2 where the folder check sees it; 1 where only creating the file fails (e.g. a read-only mount)
    assert result.exit_code in (1, 2)
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Cannot write the demo picture to " in errors[0], result.output
    assert not (folder / "demo.png").exists()


def test_fcconv_demo_in_a_subprocess_without_scikit_learn(tmp_path: Path):
    # The demo runs from the installed package alone; scikit-learn is blocked to prove it is not needed.
    block = tmp_path / "block"
    block.mkdir()
    (block / "sklearn.py").write_text("raise ImportError('scikit-learn is for training only')\n")
    path = os.pathsep.join(p for p in (str(block), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "MPLBACKEND": "Agg"}
    out = tmp_path / "fcconv-demo.png"
    proc = subprocess.run(
        [sys.executable, "-m", "fcconv.cli", "demo", "--no-progress", "-o", str(out)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for number in SEED_NUMBERS:
        assert number in proc.stdout
    _picture_ok(out)
