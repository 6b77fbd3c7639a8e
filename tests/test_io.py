"""Outputs that are not regular files (a FIFO, a socket, a device) are refused by every writer."""

from __future__ import annotations

import os
import re
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from fcconv._io import atomic_output, check_output_path, check_output_store
from fcconv.cli import app
from fcconv.errors import FcconvError


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.close()  # the socket file stays


def _device(path: Path) -> None:
    try:  # a character device like /dev/null: needs root and CAP_MKNOD
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError) as error:
        pytest.skip(f"cannot create a device node here: {error}")


MAKERS: dict[str, Callable[[Path], None]] = {"FIFO": _fifo, "socket": _socket, "device": _device}
KINDS = {"FIFO": "a FIFO (named pipe)", "socket": "a socket", "device": "a character device"}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: a socket's path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        yield Path(folder)


@pytest.fixture(params=sorted(MAKERS))
def special(request: pytest.FixtureRequest, short_dir: Path) -> Callable[[str], tuple[Path, str]]:
    """Make a special file of one kind at a name in ``short_dir``; returns it and its kind's words."""

    def make(name: str) -> tuple[Path, str]:
        path = short_dir / name
        MAKERS[request.param](path)
        return path, KINDS[request.param]

    return make


def _still_special(path: Path) -> bool:
    return not stat.S_ISREG(os.stat(path).st_mode)


def test_python_writers_refuse_special_files(special: Callable[[str], tuple[Path, str]]) -> None:
    path, kind = special("out.png")
    kind = re.escape(kind)
    with pytest.raises(FcconvError, match=rf"^Cannot write the output to '.*out\.png': it exists and is "
                                          rf"{kind}, not a regular file; writing would replace it\. Choose"):
        check_output_path(path)
    refused = pytest.raises(FcconvError, match=rf"^Cannot write the picture to .*: it exists and is {kind}")
    with refused, atomic_output(path, what="the picture") as tmp:
        tmp.write_text("x")
    store, _ = special("map.zarr")
    with pytest.raises(FcconvError, match=rf"^Cannot write the map to '.*map\.zarr': it exists and is "
                                          rf"{kind}"):
        check_output_store(store)
    assert _still_special(path) and _still_special(store)
    assert sorted(p.name for p in path.parent.iterdir()) == ["map.zarr", "out.png"]  # no temporary left


def test_a_file_made_special_during_the_write_is_not_replaced(short_dir: Path) -> None:
    path = short_dir / "out.txt"
    with pytest.raises(FcconvError, match=r"^Cannot write '.*out\.txt': it exists and is a FIFO"), \
            atomic_output(path) as tmp:
        tmp.write_text("x")
        os.mkfifo(path)
    assert _still_special(path) and [p.name for p in short_dir.iterdir()] == ["out.txt"]


def test_a_store_may_be_a_folder(tmp_path: Path) -> None:
    (tmp_path / "done.zarr").mkdir()
    assert check_output_store(tmp_path / "done.zarr") == tmp_path / "done.zarr"


def test_tiled_map_and_the_preview_refuse_special_outputs(special: Callable[[str], tuple[Path, str]]
                                                          ) -> None:
    np = pytest.importorskip("numpy")
    pytest.importorskip("zarr")
    pytest.importorskip("matplotlib")
    import torch

    import fcconv
    from fcconv.demo.digits import load_digits_model
    from fcconv.tiling import write_preview

    fcn = fcconv.convolutionalize(load_digits_model(dtype=torch.float64), (1, 12, 12))
    image = np.zeros((1, 30, 30))
    out, kind = special("m.zarr")
    kind = re.escape(kind)
    with pytest.raises(FcconvError, match=rf"^Cannot write the map to '.*m\.zarr': it exists and is {kind}"):
        fcconv.tiled_map(fcn, image, out=out, progress=False)
    preview, _ = special("p.png")
    scores = fcconv.tiled_map(fcn, image, progress=False)
    with pytest.raises(FcconvError, match=rf"^Cannot write the preview to '.*p\.png': it exists and is "
                                          rf"{kind}"):
        write_preview(scores, image, preview, fcn=fcn)
    assert _still_special(out) and _still_special(preview)


def _commands(target: Path) -> list[list[str]]:
    """Every command that writes, with ``target`` as its output."""
    digits = ["fcconv.demo.digits:load_digits_model", "--input", "1,12,12"]
    name = target.name
    if name.endswith(".png"):
        return [["demo", "-o", str(target)], ["demo", "--canvas", str(target)],
                ["heatmap", *digits, "in.png", "-o", str(target)],
                ["heatmap", *digits, "in.tif", "-o", str(target.with_suffix(".zarr")), "--preview",
                 str(target)]]
    if name.endswith(".pt"):
        return [["convert", "Linear(8, 3)", "--to", "pointwise", "-o", str(target)]]
    if name.endswith(".zarr"):
        return [["heatmap", *digits, "in.tif", "-o", str(target)]]
    return [["export", *digits, "-o", str(target)],
            ["onnx", "convolutionalize", "in.onnx", "--input", "1,12,12", "-o", str(target)],
            ["onnx", "linear-to-conv", "in.onnx", "-o", str(target)]]


@pytest.mark.parametrize("name", ["out.png", "out.pt", "out.zarr", "out.onnx"])
def test_every_cli_writer_refuses_special_outputs(special: Callable[[str], tuple[Path, str]], name: str
                                                  ) -> None:
    target, kind = special(name)
    for command in _commands(target):
        result = CliRunner().invoke(app, command, prog_name="fcconv")
        assert result.exit_code == 2, (command, result.output)
        assert f"it exists and is {kind}, not a regular file" in result.stderr, (command, result.stderr)
        assert _still_special(target)
