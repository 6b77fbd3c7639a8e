"""What a map store survives: damaged chunks, stale images, disk full, foreign stores, two runs at once.

Each test reproduces one fault of issue 14 and checks the outcome docs/tiling.md ("What survives
what") promises.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiling_support import assert_same_map, untiled

import fcconv
from fcconv import FcconvError
from fcconv.tiling import _store

zarr = pytest.importorskip("zarr")


def _shards(out: Path) -> list[Path]:
    return sorted(p for p in (out / "0" / "c").rglob("*") if p.is_file())


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def test_the_store_is_the_contracts_group(tmp_path: Path,
        digits_fcn: fcconv.FullyConvolutional) -> None:
    image = np.random.default_rng(0).random((1, 70, 90))
    out = tmp_path / "m.zarr"
    stored = fcconv.tiled_map(digits_fcn, image, tile=30, out=out, progress=False, method="tiles")
    attributes = dict(zarr.open_group(str(out), mode="r").attrs)["fcconv"]
    assert attributes["version"] == 1 and attributes["complete"] is True
    assert attributes["geometry"] == {"stride": [2, 2], "window": [12, 12], "window_offset": [0, 0],
                                      "image_shape": [1, 70, 90], "level": 0, "downsample": 1.0, "mpp": None}
    assert attributes["identity"]["tile"] == [30, 30]
    plan = fcconv.tiling.plan_for(digits_fcn, image, tile=30, method="tiles")
    opened = fcconv.tiling.open_map(out)
    assert opened.shards == opened.chunks == (11, *plan.cells_per_tile)  # 11 classes: one inner chunk
    assert len(_shards(out)) == len(plan) == len(list((out / ".fcconv" / "chunks").glob("c.*")))
    np.testing.assert_array_equal(opened[...], stored[...])
    assert_same_map(opened[...], untiled(digits_fcn, image))


def test_damaged_chunks_are_recomputed_with_one_line_each(tmp_path: Path,
                                                          digits_fcn: fcconv.FullyConvolutional,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    image = np.random.default_rng(1).random((1, 70, 90))
    out = tmp_path / "m.zarr"
    fcconv.tiled_map(digits_fcn, image, tile=30, out=out, progress=False)
    truncated, zeroed, deleted, *_ = _shards(out)
    truncated.write_bytes(truncated.read_bytes()[:50])
    zeroed.write_bytes(bytes(zeroed.stat().st_size))
    deleted.unlink()
    for name in (truncated, zeroed, deleted):  # named with the fix, never "unexpected RuntimeError"
        damaged = rf"^The map .* has 3 damaged chunk\(s\): .*{name.name}.*run the same"
        with pytest.raises(FcconvError, match=damaged):
            fcconv.tiling.open_map(out)
    named = r"^Cannot read rows 0 to .* damaged chunk\(s\) 0/c/0/0/0 .* run the "
    with pytest.raises(FcconvError, match=named):
        fcconv.tiling.winners(zarr.open_group(str(out), mode="r")["0"])
    with caplog.at_level(logging.WARNING, logger="fcconv.tiling"):
        again = fcconv.tiled_map(digits_fcn, image, tile=30, out=out, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "fcconv.tiling"]
    assert len(lines) == 3 and all(line.startswith("Chunk 0/c/0/") for line in lines)
    assert [why in " ".join(lines) for why in ("is damaged", "was deleted")] == [True, True]
    assert_same_map(again[...], untiled(digits_fcn, image))
    fcconv.tiling.open_map(out)  # verified


def test_a_shard_written_without_its_checksum_is_redone(tmp_path: Path,
                                                        digits_fcn: fcconv.FullyConvolutional,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    image = np.random.default_rng(2).random((1, 50, 50))
    out = tmp_path / "m.zarr"
    fcconv.tiled_map(digits_fcn, image, tile=30, out=out, progress=False)
    next((out / ".fcconv" / "chunks").glob("c.*")).unlink()  # killed between the shard and its record
    with caplog.at_level(logging.WARNING, logger="fcconv.tiling"):
        fcconv.tiled_map(digits_fcn, image, tile=30, out=out, progress=False)
    assert [r.getMessage().endswith("has no checksum (the run stopped while writing it): recomputing it.")
            for r in caplog.records if r.name == "fcconv.tiling"] == [True]


def test_two_windows_of_one_memmap_are_two_images(tmp_path: Path,
        digits_fcn: fcconv.FullyConvolutional) -> None:
    data = np.random.default_rng(3).random((1, 40, 120))
    np.save(tmp_path / "image.npy", data)
    mm = np.load(tmp_path / "image.npy", mmap_mode="r")
    out = tmp_path / "m.zarr"
    fcconv.tiled_map(digits_fcn, mm[:, :, 0:60], tile=30, out=out, progress=False)
    with pytest.raises(FcconvError, match=r"^out .* holds another run's map \(it differs in: image\)"):
        fcconv.tiled_map(digits_fcn, mm[:, :, 60:120], tile=30, out=out, progress=False)
    second = fcconv.tiled_map(digits_fcn, mm[:, :, 60:120], tile=30, out=tmp_path / "b.zarr", progress=False)
    assert_same_map(second[...], untiled(digits_fcn, data[:, :, 60:120]))


def test_a_zarr_image_rewritten_in_place_is_refused(tmp_path: Path,
                                                    digits_fcn: fcconv.FullyConvolutional) -> None:
    data = np.random.default_rng(4).random((1, 40, 60))
    image = zarr.open_array(str(tmp_path / "image.zarr"), mode="w", shape=data.shape, chunks=(1, 20, 20),
                            dtype="f8")
    image[...] = data
    out = tmp_path / "m.zarr"
    fcconv.tiled_map(digits_fcn, tmp_path / "image.zarr", tile=30, out=out, progress=False)
    time.sleep(0.01)
    image[:, :20, :20] = data[:, :20, :20] + 1  # one chunk file rewritten
    for given in (tmp_path / "image.zarr", zarr.open_array(str(tmp_path / "image.zarr"), mode="r")):
        with pytest.raises(FcconvError, match=r"^out .* holds another run's map \(it differs in: image\)"):
            fcconv.tiled_map(digits_fcn, given, tile=30, out=out, progress=False)


def test_disk_full_while_creating_leaves_nothing(tmp_path: Path, digits_fcn: fcconv.FullyConvolutional,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    image = np.random.default_rng(5).random((1, 40, 40))
    out = tmp_path / "m.zarr"
    build = _store._build

    def full(root: Path, *args: object) -> None:
        build(root, *args)  # half the store is written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_store, "_build", full)
    full_disk = r"^Cannot write out .*m\.zarr': No space left on device; nothing was"
    with pytest.raises(FcconvError, match=full_disk):
        fcconv.tiled_map(digits_fcn, image, tile=30, out=out, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(_store, "_build", build)
    assert_same_map(fcconv.tiled_map(digits_fcn, image, tile=30, out=out, progress=False)[...],
                    untiled(digits_fcn, image))


def test_stubs_of_a_failed_creation_are_recreated(tmp_path: Path,
        digits_fcn: fcconv.FullyConvolutional) -> None:
    image = np.random.default_rng(6).random((1, 40, 40))
    empty, blank, bare = tmp_path / "empty.zarr", tmp_path / "blank.zarr", tmp_path / "bare.zarr"
    empty.mkdir()
    blank.mkdir()
    (blank / "zarr.json").write_bytes(b"")  # what fcconv 0.2 left when the disk was full
    bare.mkdir()
    (bare / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    for stub in (empty, blank, bare):
        assert_same_map(fcconv.tiled_map(digits_fcn, image, tile=30, out=stub, progress=False)[...],
                        untiled(digits_fcn, image))


def test_disk_full_mid_run_then_resume(tmp_path: Path, digits_fcn: fcconv.FullyConvolutional,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    image = np.random.default_rng(7).random((1, 60, 60))
    out = tmp_path / "m.zarr"
    write, calls = _store._write_durably, []

    def full_after_three(path: Path, text: str) -> None:
        calls.append(path)
        if len(calls) > 3 and path.parent.name == "chunks":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, text)

    monkeypatch.setattr(_store, "_write_durably", full_after_three)
    with pytest.raises(OSError, match="No space left"):
        fcconv.tiled_map(digits_fcn, image, tile=30, out=out, progress=False)
    monkeypatch.setattr(_store, "_write_durably", write)
    assert_same_map(fcconv.tiled_map(digits_fcn, image, tile=30, out=out, progress=False)[...],
                    untiled(digits_fcn, image))


def test_overwrite_replaces_only_maps_fcconv_wrote(tmp_path: Path,
        digits_fcn: fcconv.FullyConvolutional) -> None:
    image = np.random.default_rng(8).random((1, 40, 40))
    foreign_array = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=(3,), dtype="f8")
    foreign_array[...] = 7
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w").attrs["x"] = 1
    folder = tmp_path / "photos.zarr"
    folder.mkdir()
    (folder / "keep.jpg").write_bytes(b"x")
    for out in ("a.zarr", "g.zarr", "photos.zarr"):
        foreign = r"^out .* is not a zarr map written by fcconv \(even with overwrite"
        with pytest.raises(FcconvError, match=foreign):
            fcconv.tiled_map(digits_fcn, image, tile=30, out=tmp_path / out, overwrite=True, progress=False)
    assert zarr.open_array(str(tmp_path / "a.zarr"))[0] == 7 and (folder / "keep.jpg").is_file()
    old = zarr.open_array(str(tmp_path / "old.zarr"), mode="w", shape=(3, 2, 2), dtype="f8",
                          attributes={"fcconv_tiled_map": {"tile": [30, 30]}})
    with pytest.raises(FcconvError, match=r"^out .* is a map of fcconv 0\.2 .* Pass overwrite=True"):
        fcconv.tiled_map(digits_fcn, image, tile=30, out=tmp_path / "old.zarr", progress=False)
    with pytest.raises(FcconvError, match=r"^.*old\.zarr' is a map of fcconv 0\.2"):
        fcconv.tiling.open_map(tmp_path / "old.zarr")
    assert old.shape == (3, 2, 2)
    fcconv.tiled_map(digits_fcn, image, tile=30, out=tmp_path / "old.zarr", overwrite=True, progress=False)
    fcconv.tiling.open_map(tmp_path / "old.zarr")


_HOLDER = """
import sys, time
import numpy as np
from fcconv.tiling import _store
_store.open_output(sys.argv[1], shape=(2, 4, 4), chunks=(2, 4, 4), dtype=np.dtype("f8"),
                   identity={"holder": 1}, overwrite=True)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
_store.release_output(sys.argv[1])
"""


def _holder(tmp_path: Path, out: Path, seconds: float) -> subprocess.Popen[str]:
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    process = subprocess.Popen([sys.executable, str(script), str(out), str(seconds)], env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "locked\n", process.stderr
    return process


def test_one_writer_at_a_time(tmp_path: Path,
        digits_fcn: fcconv.FullyConvolutional) -> None:
    image = np.random.default_rng(9).random((1, 40, 40))
    out = tmp_path / "m.zarr"
    holder = _holder(tmp_path, out, 60)
    try:
        expected = rf"being written by another run \(pid {holder.pid} on host {socket.gethostname()}, since"
        with pytest.raises(FcconvError, match=rf"^out .* {expected}.* pass wait=True \(--wait\)"):
            fcconv.tiled_map(digits_fcn, image, tile=30, out=out, overwrite=True, progress=False)
        holder.kill()  # SIGKILL: the OS drops its lock, the next run takes over
        holder.wait()
        stored = fcconv.tiled_map(digits_fcn, image, tile=30, out=out, overwrite=True, progress=False)
        assert_same_map(stored[...], untiled(digits_fcn, image))
    finally:
        holder.kill()
        holder.wait()


def test_wait_for_the_other_writer(tmp_path: Path,
        digits_fcn: fcconv.FullyConvolutional) -> None:
    image = np.random.default_rng(10).random((1, 40, 40))
    out = tmp_path / "m.zarr"
    holder = _holder(tmp_path, out, 1.5)
    try:
        stored = fcconv.tiled_map(digits_fcn, image, tile=30, out=out, overwrite=True, wait=True,
                                  progress=False)
        assert holder.wait(timeout=30) == 0
        assert_same_map(stored[...], untiled(digits_fcn, image))
    finally:
        holder.kill()
        holder.wait()


_MEMORY = """
import resource, sys
import numpy as np, torch
from torch import nn
import fcconv

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
fcn = fcconv.convolutionalize(net, (1, 8, 8))
image = np.random.default_rng(0).random((1, 8 + 5 * 400, 8), dtype=np.float32)
peaks = []
for tiles in (40, 400):
    # tile 12: five cells per tile, one tile per five rows of cells
    part = image[:, : 8 + 5 * tiles - 1, :]
    fcconv.tiled_map(fcn, part, tile=12, out=sys.argv[1] + str(tiles), progress=False, method="tiles")
    peaks.append(peak_mb())
print(len(fcconv.tiling.plan_for(fcn, image[:, : 8 + 5 * 400 - 1], tile=12, method="tiles")), peaks[0],
      peaks[1])
"""


@pytest.mark.slow
def test_memory_stays_flat_over_a_run(tmp_path: Path) -> None:
    script = tmp_path / "memory.py"
    script.write_text(_MEMORY)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "m")], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    tiles, after_40, after_400 = done.stdout.split()
    assert int(tiles) == 400
    assert float(after_400) <= 1.1 * float(after_40), (after_40, after_400)


def test_inner_chunks_hold_at_most_16_classes() -> None:
    assert _store._layout((20, 50, 60), (20, 8, 9)) == ((32, 8, 9), (16, 8, 9))
    assert _store._layout((3, 50, 60), (3, 8, 9)) == ((3, 8, 9), (3, 8, 9))


@pytest.mark.slow
def test_worker_processes_write_checksummed_chunks_under_the_drivers_lock(
        tmp_path: Path, digits_fcn: fcconv.FullyConvolutional) -> None:
    distributed = pytest.importorskip("distributed")
    image = np.random.default_rng(11).random((1, 60, 70))
    out = tmp_path / "m.zarr"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
                                  ) as cluster, distributed.Client(cluster) as client:
        stored = fcconv.tiled_map(digits_fcn, image, tile=30, out=out, client=client, progress=False)
    assert not (out / ".fcconv" / "lock.json").exists()
    assert_same_map(fcconv.tiling.open_map(out)[...], untiled(digits_fcn, image))
    np.testing.assert_array_equal(stored[...], fcconv.tiling.open_map(out)[...])


def test_bookkeeping_removed_by_hand_trusts_no_shard(tmp_path: Path, digits_fcn: fcconv.FullyConvolutional,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    image = np.random.default_rng(12).random((1, 50, 50))
    out = tmp_path / "m.zarr"
    fcconv.tiled_map(digits_fcn, image, tile=30, out=out, progress=False)
    import shutil

    shutil.rmtree(out / ".fcconv")
    with pytest.raises(FcconvError, match=r"^out .* holds another run's map \(it differs in: tile"):
        fcconv.tiled_map(digits_fcn, image, tile=40, out=out, progress=False)  # still refused, not replaced
    with caplog.at_level(logging.WARNING, logger="fcconv.tiling"):
        again = fcconv.tiled_map(digits_fcn, image, tile=30, out=out, progress=False)
    assert len([r for r in caplog.records if "has no checksum" in r.getMessage()]) == len(_shards(out))
    assert_same_map(again[...], untiled(digits_fcn, image))
