"""``fcconv heatmap ... -o scores.zarr``: the tiled path of the command line, through its entry point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from tiling_support import digits_model, make_canvas

import fcconv
from fcconv.cli import app
from fcconv.cli.tiles import PixelScale

tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")
pytest.importorskip("matplotlib")

MODEL = ("tiling_support:digits_model", "--input", "1,12,12")


def _run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), prog_name="fcconv")


def _one_line_error(result: Result, start: str, code: int = 1) -> None:
    assert result.exit_code == code, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {start}"), result.stderr


@pytest.fixture(scope="module")
def canvas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 96x200 canvas of held-out digits as an 8-bit grayscale tiled TIFF."""
    pixels = (make_canvas(96, 200, seed=3).image[0].numpy() * 255).round().astype(np.uint8)
    path = tmp_path_factory.mktemp("cli") / "canvas.tif"
    tifffile.imwrite(path, pixels, tile=(32, 32))
    return path


def test_zarr_map_preview_and_resume(canvas: Path, tmp_path: Path) -> None:
    out, preview = tmp_path / "scores.zarr", tmp_path / "preview.png"
    args = (*MODEL, str(canvas), "-o", str(out), "--tile", "40", "--preview", str(preview),
            "--labels", "tiling_support:CLASS_NAMES", "--hide", "background", "-q")
    result = _run("heatmap", *args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"Wrote {out}" in result.output and preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fcn = fcconv.convolutionalize(digits_model(), (1, 12, 12))
    scale = PixelScale(1 / 255, None, None, torch.float32)
    expected = fcconv.tiled_map(fcn, canvas, tile=40, transform=scale, progress=False)
    np.testing.assert_array_equal(fcconv.tiling.open_map(out)[...], expected)
    again = _run("heatmap", *args)  # resumes: an existing store of the same run is accepted
    assert again.exit_code == 0, again.output
    _one_line_error(_run("heatmap", *MODEL, str(canvas), "-o", str(out), "--tile", "64", "-q"),
                    f"out {str(out)!r} holds another run's map (it differs in: tile")
    replaced = _run("heatmap", *MODEL, str(canvas), "-o", str(out), "--tile", "64", "--overwrite", "-q")
    assert replaced.exit_code == 0, replaced.output


def test_bad_input(canvas: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "scores.zarr")
    _one_line_error(_run("heatmap", *MODEL, str(canvas), "-o", out, "--level", "2"),
                    "level 2 does not exist in")
    _one_line_error(_run("heatmap", *MODEL, str(canvas), "-o", out, "--tile", "8"),
                    "tile (8, 8) is too small for this model")
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    _one_line_error(_run("heatmap", *MODEL, str(notes), "-o", out), "Cannot read")
    both = _run("heatmap", *MODEL, str(canvas), "-o", out, "--workers", "1", "--scheduler", "x:1")
    assert both.exit_code == 2 and "Error: Give --workers (a local cluster) or --scheduler" in both.stderr
    assert not (tmp_path / "scores.zarr").exists()


def _shards(out: Path) -> list[Path]:
    return sorted(p for p in (out / "0" / "c").rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize(("sent", "name", "code"), [(signal.SIGINT, "Ctrl-C (SIGINT)", 130),
                                                    (signal.SIGTERM, "SIGTERM", 143)])
def test_a_signal_keeps_finished_tiles_and_the_same_command_resumes(tmp_path: Path, one_thread: None,
                                                                    sent: int, name: str, code: int) -> None:
    # one_thread: the expected map is computed here as the CLI computes it (OMP_NUM_THREADS=1), bit for bit.
    pixels = (make_canvas(512, 768, seed=4).image[0].numpy() * 255).round().astype(np.uint8)
    tifffile.imwrite(tmp_path / "canvas.tif", pixels, tile=(64, 64))
    command = [sys.executable, "-m", "fcconv.cli", "heatmap", *MODEL, "canvas.tif", "--tile", "40",
               "-o", "scores.zarr", "-q"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    out = tmp_path / "scores.zarr"
    deadline = time.monotonic() + 120
    while len(_shards(out)) < 3 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(sent)
    _, err = first.communicate(timeout=120)
    assert first.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"Stopped by {name}: ") and last.endswith("; run the same command to resume."), err
    kept = int(last.split(": ")[1].split(" of ")[0])
    assert 3 <= kept < int(last.split(" of ")[1].split()[0])
    assert not (out / ".fcconv" / "lock.json").exists()  # the lock went with the run
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert kept < len(_shards(out))
    fcn = fcconv.convolutionalize(digits_model(), (1, 12, 12))
    scale = PixelScale(1 / 255, None, None, torch.float32)
    expected = fcconv.tiled_map(fcn, pixels, tile=40, transform=scale, progress=False)
    np.testing.assert_array_equal(fcconv.tiling.open_map(out)[...], expected)


def test_the_cli_says_which_damaged_chunk_it_recomputes(canvas: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.zarr"
    args = ("heatmap", *MODEL, str(canvas), "-o", str(out), "--tile", "40", "-q")
    assert _run(*args).exit_code == 0
    shard = _shards(out)[1]
    shard.write_bytes(shard.read_bytes()[:20])
    again = _run(*args)
    assert again.exit_code == 0, again.output
    relative = shard.relative_to(out).as_posix()
    assert f"Chunk {relative} (tile (0, 1)) is damaged" in again.stderr
    fcconv.tiling.open_map(out)  # verified
