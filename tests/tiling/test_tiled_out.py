"""The zarr map on disk: one chunk per tile, resumed after kill -9, refused when it is another run's."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiling_support import assert_same_map, untiled

import fcconv
from fcconv import FcconvError

zarr = pytest.importorskip("zarr")

_SCRIPT = """
import sys, time
import numpy as np, torch
import fcconv
from tiling_support import load_digits_model

def slow(t):  # a per-pixel transform that takes its time, so that the kill lands mid-run
    time.sleep(0.004)
    return t.to(torch.float64)

fcn = fcconv.convolutionalize(load_digits_model(dtype=torch.float64), (1, 12, 12))
image = np.random.default_rng(0).random((1, 300, 300))
fcconv.tiled_map(fcn, image, tile=24, out=sys.argv[1], transform=slow, progress=False, method=sys.argv[2])
"""


def _chunks(path: Path) -> dict[str, tuple[int, int]]:
    """Shard file -> (inode, mtime): a rewritten shard gets a new inode (zarr writes, then renames)."""
    return {str(p.relative_to(path)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (path / "0" / "c").rglob("*") if p.is_file()}


def _recorded(path: Path) -> set[str]:
    """The shards whose checksum was recorded: those a resume keeps."""
    return {"0/" + p.name.replace(".", "/") for p in (path / ".fcconv" / "chunks").glob("c.*")}


def _run(script: Path, out: Path, method: str = "tiles") -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, str(script), str(out), method], env=env, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "total"), [
    ("tiles", 21 * 21),  # 145 cells per dim, 7 per tile: (24 - 12) // 2 + 1
    ("stream", 3 * 21),  # strips of 7 cells, chunks of 64 map rows: a strip resumes at its first missing one
])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path: Path, method: str, total: int) -> None:
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    killed, fresh = tmp_path / "killed.zarr", tmp_path / "fresh.zarr"
    first = _run(script, killed, method)
    deadline = time.monotonic() + 120
    while (not (killed / "0" / "c").is_dir() or len(_recorded(killed)) < 20) and time.monotonic() < deadline:
        assert first.poll() is None, first.stderr.read().decode() if first.stderr else ""
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    kept = {name: stamp for name, stamp in _chunks(killed).items() if name in _recorded(killed)}
    assert 20 <= len(kept) < total
    for process in (_run(script, killed, method), _run(script, fresh, method)):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()
    resumed = _chunks(killed)
    assert len(resumed) == total
    assert all(resumed[name] == stamp for name, stamp in kept.items())  # finished chunks not redone
    assert not list(killed.rglob("*.partial"))
    resumed_map, fresh_map = fcconv.tiling.open_map(killed)[...], fcconv.tiling.open_map(fresh)[...]
    if method == "tiles":  # a tile is recomputed whole: bit for bit
        np.testing.assert_array_equal(resumed_map, fresh_map)
    else:  # a resumed strip's bands start elsewhere: the same map, certified in float64
        assert_same_map(resumed_map, fresh_map)


def test_out_equals_numpy_and_a_rerun_computes_nothing(tmp_path: Path,
                                                      padded_fcn: fcconv.FullyConvolutional) -> None:
    image = np.random.default_rng(0).random((2, 90, 75))
    out = tmp_path / "scores.zarr"
    stored = fcconv.tiled_map(padded_fcn, image, tile=40, out=out, progress=False)
    plan = fcconv.tiling.plan_for(padded_fcn, image, tile=40)
    assert stored.shards == (3, *plan.cells_per_tile) and len(_chunks(out)) == len(plan) > 1
    assert stored.chunks == (3, *plan.cells_per_tile)  # inner chunks: min(16, classes) classes
    assert_same_map(stored[...], untiled(padded_fcn, image))
    before = _chunks(out)
    again = fcconv.tiled_map(padded_fcn, image, tile=40, out=str(out), progress=False)
    assert _chunks(out) == before
    np.testing.assert_array_equal(again[...], stored[...])


def test_another_runs_out_is_refused_and_kept(tmp_path: Path, padded_fcn: fcconv.FullyConvolutional) -> None:
    image = np.random.default_rng(1).random((2, 60, 60))
    out = tmp_path / "scores.zarr"
    fcconv.tiled_map(padded_fcn, image, tile=40, out=out, progress=False)
    before = {name: (out / name).read_bytes() for name in _chunks(out)}
    other_model = copy.deepcopy(padded_fcn)
    with torch.no_grad():
        next(other_model.parameters())[0, 0, 0, 0] += 1e-9
    others = {
        "image": dict(image=image + 1e-9),
        "model": dict(fcn=other_model),
        "tile": dict(tile=44),
        "transform": dict(transform=lambda t: t * 1.0),
    }
    for what, change in others.items():
        args = {"fcn": padded_fcn, "image": image, "tile": 40, **change}
        with pytest.raises(FcconvError, match=rf"^out .* holds another run's map \(it differs in: .*{what}"):
            fcconv.tiled_map(args.pop("fcn"), args.pop("image"), out=out, progress=False, **args)
        assert {name: (out / name).read_bytes() for name in _chunks(out)} == before
    bad_input = {"tile .* too small": dict(tile=10), "level 1 applies": dict(level=1),
                 "The image .* smaller": dict(image=image[:, :5])}
    for message, change in bad_input.items():  # refused before the store is opened
        args = {"image": image, "tile": 40, **change}
        with pytest.raises(FcconvError, match=f"^{message}"):
            fcconv.tiled_map(padded_fcn, args.pop("image"), out=out, overwrite=True, progress=False, **args)
        assert {name: (out / name).read_bytes() for name in _chunks(out)} == before
    replaced = fcconv.tiled_map(padded_fcn, image, tile=44, out=out, overwrite=True, progress=False)
    assert replaced.shards != (3, *fcconv.tiling.plan_for(padded_fcn, image, tile=40).cells_per_tile)


def test_out_that_is_not_a_map(tmp_path: Path, padded_fcn: fcconv.FullyConvolutional) -> None:
    image = np.zeros((2, 40, 40))
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    for out in (notes, tmp_path):
        foreign = r"^out .* exists and is not a zarr map written by fcconv \(even with"
        with pytest.raises(FcconvError, match=foreign):
            fcconv.tiled_map(padded_fcn, image, out=out, overwrite=True, progress=False)
    assert notes.read_text() == "keep me"
    with pytest.raises(FcconvError, match=r"^Cannot write out .*notes\.txt/scores\.zarr'"):
        fcconv.tiled_map(padded_fcn, image, out=notes / "scores.zarr", progress=False)
    with pytest.raises(FcconvError, match="^out must be None or a path to a zarr store; got int"):
        fcconv.tiled_map(padded_fcn, image, out=3, progress=False)  # type: ignore[arg-type]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_out(tmp_path: Path, padded_fcn: fcconv.FullyConvolutional) -> None:
    image = np.zeros((2, 40, 40))
    out = tmp_path / "scores.zarr"
    fcconv.tiled_map(padded_fcn, image, out=out, progress=False)
    out.chmod(0o555)
    try:
        with pytest.raises(FcconvError, match=r"^out .* is read-only; nothing was written"):
            fcconv.tiled_map(padded_fcn, image, out=out, progress=False)
    finally:
        out.chmod(0o755)
