"""Tiled maps against the untiled map, patch-by-patch classification, image size and workers (issue 10).

Measured side by side in one run, each printed with its target:

1. Halo cost: the recompute factor (input pixels the tiles read / image pixels) and the tiled time
   against 1.15 x recompute factor x the untiled time, on an image that fits in memory.
2. Against patch-by-patch classification (``fcconv.sliding_window``, the classifier on every crop
   at the same stride): speed-up at least 0.8 x the ratio of multiply-accumulates
   (``torch.utils.flop_counter.FlopCounterMode``).
3. Memory: peak RSS of a run in a fresh process, zarr source to zarr sink, at 2048^2 and 8192^2
   pixels: within 25% of each other (it follows the tile, not the image).
4. dask.distributed: 2 single-thread worker processes against 1, throughput ratio (2 cores here).

Sections 1-4 measure halo tiles (``method="tiles"``); 5-8 the row streaming of issue 15:

5. Recompute factor at the default settings on 8192^2 for resnet50, densenet121, convnext_tiny
   (plans only): <= 1.10 each.
6. Throughput (output cells per second) of the streamed map against the untiled ``fcn(image)`` on
   a smaller image, resnet18 and convnext_tiny: >= 0.85.
7. Peak RSS above the model's own, fresh processes, zarr in and out, resnet50: tall (4x the height)
   within 10% of square; 2x the width at most 2.2x; the ``plan_for`` estimate printed beside.
8. Streaming against halo tiles at the default tile on resnet50: speed-up >= 1.5.
9. Tissue mask (issue 17): an SVS-style slide with 50% background, ``mask="otsu"`` against no mask
   (halo tiles: a mask skips whole tasks): time <= 0.6 x the unmasked run, every computed cell
   identical to the unmasked map.
10. Prefetch (issue 17): the same slide, no mask, halo tiles, ``prefetch=True`` (the next blocks read
   in a thread while the model runs) against ``prefetch=False``: throughput side by side, maps identical.

Times are minima over repeats (on a shared machine the minimum is the least disturbed run).

Usage: python bench/tiled.py [--quick] [--only 1,2,...] [--stream-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fcconv
from fcconv.demo.digits import load_digits_model
from fcconv.tiling import plan_for

RESULTS: list[tuple[str, bool]] = []


def best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def macs(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops()) // 2


def check(name: str, ok: bool, text: str) -> None:
    RESULTS.append((name, ok))
    print(f"  [{'PASS' if ok else 'FAIL'}] {text}")


def halo_cost(fcn: nn.Module, size: int, tile: int, repeats: int) -> None:
    print(f"1. Halo cost: digits model (stride 2, window 12) on {size}x{size}, tile {tile}")
    image = np.random.default_rng(0).random((1, size, size), dtype=np.float32)
    x = torch.from_numpy(image)[None]

    def untiled() -> object:
        with torch.inference_mode():
            return fcn(x)

    def tiled() -> object:
        return fcconv.tiled_map(fcn, image, tile=tile, progress=False, method="tiles")

    times = {"untiled": float("inf"), "tiled": float("inf")}
    for _ in range(repeats):  # interleaved, so that both see the same load
        times["untiled"] = min(times["untiled"], best_time(untiled, 1))
        times["tiled"] = min(times["tiled"], best_time(tiled, 1))
    plan = plan_for(fcn, image, tile=tile, method="tiles")
    factor = plan.recompute_factor()
    limit = 1.15 * factor * times["untiled"]
    print(f"  {len(plan)} tiles of {plan.cells_per_tile} cells, recompute factor {factor:.3f}")
    check("halo", times["tiled"] <= limit,
          f"tiled {times['tiled']:.2f} s <= 1.15 x {factor:.3f} x untiled {times['untiled']:.2f} s "
          f"= {limit:.2f} s")


def against_patches(model: nn.Module, fcn: nn.Module, size: int, tile: int, repeats: int) -> None:
    print(f"2. Against patch-by-patch classification (sliding_window, batch 256) on {size}x{size}")
    image = np.random.default_rng(1).random((1, size, size), dtype=np.float32)
    x = torch.from_numpy(image)[None]
    window, stride = fcn.window, fcn.stride  # type: ignore[union-attr]

    def patches() -> object:
        with torch.inference_mode():
            return fcconv.sliding_window(model, x, window=window, stride=stride, batch_size=256,
                                         progress=False)

    def tiled() -> object:
        return fcconv.tiled_map(fcn, image, tile=tile, progress=False, method="tiles")

    plan = plan_for(fcn, image, tile=tile, method="tiles")
    crops = int(np.prod(plan.grid))
    patch_macs = crops * macs(lambda: model(torch.zeros(1, 1, *window)))
    tiled_macs = 0
    for t in plan:
        block = torch.zeros(1, 1, *(b - a for a, b in zip(t.read_start, t.read_stop)))
        tiled_macs += macs(lambda block=block: fcn(block))
    ratio = patch_macs / tiled_macs
    times = {"patches": float("inf"), "tiled": float("inf")}
    for _ in range(repeats):
        times["patches"] = min(times["patches"], best_time(patches, 1))
        times["tiled"] = min(times["tiled"], best_time(tiled, 1))
    speedup = times["patches"] / times["tiled"]
    print(f"  {crops} crops: {patch_macs / 1e9:.2f} GMAC patch by patch, {tiled_macs / 1e9:.2f} GMAC tiled "
          f"(MAC ratio {ratio:.1f}); {times['patches']:.2f} s against {times['tiled']:.2f} s")
    check("patches", speedup >= 0.8 * ratio, f"speed-up {speedup:.1f} >= 0.8 x MAC ratio = {0.8 * ratio:.1f}")


_MEMORY_RUN = """
import json, resource, sys, torch
from torch import nn
import fcconv
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
                    nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                    nn.Flatten(), nn.Linear(8 * 4 * 4, 2)).eval()
fcn = fcconv.convolutionalize(net, (1, 16, 16))
import dask, dask.array, zarr  # imported before the map's own peak is measured

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))

before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM, the peak resident set, to the current one (Linux)
fcconv.tiled_map(fcn, sys.argv[1], tile=int(sys.argv[3]), out=sys.argv[2],
                 transform=lambda t: t.float() / 255, progress=False, method="tiles")
print(json.dumps({"process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "map_peak_mb": status("VmHWM:"), "before_mb": before}))
"""


def _zarr_image(path: Path, size: int) -> None:
    """A size x size uint8 zarr image, written band by band (never whole in memory)."""
    import zarr

    array = zarr.open_array(str(path), mode="w", shape=(size, size), chunks=(1024, 1024), dtype="u1")
    rng = np.random.default_rng(2)
    for top in range(0, size, 1024):
        array[top:top + 1024] = rng.integers(0, 256, (min(1024, size - top), size), dtype=np.uint8)


def memory(sizes: tuple[int, ...], tile: int, folder: Path) -> None:
    print(f"3. Peak RSS, zarr source -> zarr sink, small padded net (stride 4), tile {tile}, "
          "a fresh process each")
    peaks = {}
    for size in sizes:
        source, sink = folder / f"image-{size}.zarr", folder / f"scores-{size}.zarr"
        _zarr_image(source, size)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _MEMORY_RUN, str(source), str(sink), str(tile)],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        peaks[size] = measured["map_peak_mb"]
        print(f"  {size}x{size}: peak RSS during the map {peaks[size]:.0f} MB "
              f"({measured['before_mb']:.0f} MB "
              f"before it; process peak, imports included, {measured['process_peak_mb']:.0f} MB; "
              f"{time.perf_counter() - start:.1f} s)")
    small, large = peaks[sizes[0]], peaks[sizes[-1]]
    check("memory", large <= 1.25 * small,
          f"{sizes[-1]}^2 peak {large:.0f} MB <= 1.25 x {sizes[0]}^2 peak {small:.0f} MB "
          f"= {1.25 * small:.0f} MB")


def workers(fcn: nn.Module, size: int, tile: int, repeats: int) -> None:
    import distributed

    print(f"4. dask.distributed, worker processes of one thread, digits model on {size}x{size}, tile {tile}")
    image = np.random.default_rng(3).random((1, size, size), dtype=np.float32)
    tiles = len(plan_for(fcn, image, tile=tile, method="tiles"))
    rates = {}
    for n in (1, 2):
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        with cluster, distributed.Client(cluster) as client:
            fcconv.tiled_map(fcn, image[:, :256, :256], tile=tile, client=client, progress=False,
                             method="tiles")  # warm-up
            seconds = best_time(lambda client=client: fcconv.tiled_map(
                fcn, image, tile=tile, client=client, progress=False, method="tiles"), repeats)
        rates[n] = tiles / seconds
        print(f"  {n} worker(s): {tiles} tiles in {seconds:.2f} s, {rates[n]:.2f} tiles/s")
    print(f"  throughput ratio 2 workers / 1: {rates[2] / rates[1]:.2f} (2 cores, shared)")


def _torchvision(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return fcconv.convolutionalize(getattr(torchvision.models, name)().eval(), (3, 224, 224))


def stream_factor(size: int) -> None:
    import dask.array as da

    print(f"5. Recompute factor at the default settings on {size}x{size} (plans only, float32)")
    image = da.zeros((3, size, size), chunks=(3, 1024, 1024), dtype=np.float32)
    for name in ("resnet50", "densenet121", "convnext_tiny"):
        plan = plan_for(_torchvision(name), image)
        strips = len(plan.strips) if plan.method == "stream" else len(plan)
        factor = plan.recompute_factor()
        check(f"factor {name}", factor <= 1.10,
              f"{name}: {plan.method}, {strips} strip(s), row buffers "
              f"~{(plan.peak_bytes or 0) / 2**20:.0f} MiB, recompute factor {factor:.3f} <= 1.10")


def stream_throughput(streamed: int, untiled: int, repeats: int) -> None:
    print(f"6. Throughput, streamed {streamed}x{streamed} against untiled fcn(image) on {untiled}x{untiled}")
    for name in ("resnet18", "convnext_tiny"):
        fcn = _torchvision(name)
        big = np.random.default_rng(4).random((3, streamed, streamed), dtype=np.float32)
        small = torch.from_numpy(big[:, :untiled, :untiled].copy())[None]

        def whole(fcn: nn.Module = fcn, small: torch.Tensor = small) -> object:
            with torch.inference_mode():
                return fcn(small)

        plan_for(fcn, big)  # the plan is cached; its fake run is not what is measured
        t_stream = best_time(lambda fcn=fcn, big=big: fcconv.tiled_map(fcn, big, progress=False), repeats)
        t_whole = best_time(whole, repeats)
        cells_stream = int(np.prod(fcn.grid_shape((streamed, streamed))))
        cells_whole = int(np.prod(fcn.grid_shape((untiled, untiled))))
        ratio = (cells_stream / t_stream) / (cells_whole / t_whole)
        check(f"throughput {name}", ratio >= 0.85,
              f"{name}: streamed {cells_stream / t_stream:.1f} cells/s, untiled {cells_whole / t_whole:.1f} "
              f"cells/s: ratio {ratio:.2f} >= 0.85")


_STREAM_MEMORY_RUN = """
import json, sys, torch, torchvision
import fcconv
torch.manual_seed(0)
fcn = fcconv.convolutionalize(torchvision.models.resnet50().eval(), (3, 224, 224))
import dask, dask.array, zarr
from fcconv.tiling import plan_for

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))

plan = plan_for(fcn, sys.argv[1])
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
fcconv.tiled_map(fcn, sys.argv[1], out=sys.argv[2], transform=lambda t: t.float() / 255, progress=False)
print(json.dumps({"above_mb": status("VmHWM:") - before, "estimate_mb": plan.peak_bytes / 2**20}))
"""


def _zarr_rgb(path: Path, height: int, width: int) -> None:
    import zarr

    array = zarr.open_array(str(path), mode="w", shape=(3, height, width), chunks=(3, 1024, 1024), dtype="u1")
    rng = np.random.default_rng(5)
    for top in range(0, height, 1024):
        array[:, top:top + 1024] = rng.integers(0, 256, (3, min(1024, height - top), width), dtype=np.uint8)


def stream_memory(base: int, folder: Path) -> None:
    print("7. Peak RSS above the model's own, resnet50 streamed, zarr in and out, fresh processes")
    above = {}
    for height, width in ((base, base), (4 * base, base), (base, 2 * base)):
        source, sink = folder / f"rgb-{height}-{width}.zarr", folder / f"map-{height}-{width}.zarr"
        _zarr_rgb(source, height, width)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _STREAM_MEMORY_RUN, str(source), str(sink)],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        above[height, width] = measured["above_mb"]
        print(f"  {height}x{width} (HxW): {measured['above_mb']:.0f} MB above the model, plan_for estimate "
              f"{measured['estimate_mb']:.0f} MB of row buffers ({time.perf_counter() - start:.0f} s)")
    square, tall, wide = above[base, base], above[4 * base, base], above[base, 2 * base]
    check("memory tall", tall <= 1.10 * square, f"tall {tall:.0f} MB <= 1.10 x square {square:.0f} MB")
    check("memory wide", wide <= 2.2 * square, f"wide {wide:.0f} MB <= 2.2 x square {square:.0f} MB")


def stream_against_tiles(size: int, tile: int | None) -> None:
    print(f"8. Streaming against halo tiles (tile {tile or 2048}), resnet50 on {size}x{size}")
    fcn = _torchvision("resnet50")
    image = np.random.default_rng(6).random((3, size, size), dtype=np.float32)
    tiles = plan_for(fcn, image, tile=tile, method="tiles", force=True)
    plan_for(fcn, image)
    t_tiles = best_time(lambda: fcconv.tiled_map(fcn, image, tile=tile, method="tiles", force=True,
                                                 progress=False), 1)
    t_stream = best_time(lambda: fcconv.tiled_map(fcn, image, progress=False), 1)
    check("against tiles", t_tiles / t_stream >= 1.5,
          f"halo tiles {t_tiles:.1f} s (factor {tiles.recompute_factor():.2f}), streamed {t_stream:.1f} s: "
          f"speed-up {t_tiles / t_stream:.2f} >= 1.5")


def _svs(path: Path, size: int) -> Path:
    """An SVS-style slide (JPEG tiles 256^2, 3 levels, MPP 0.5, 20x): tissue left, background right."""
    import tifffile

    rng = np.random.default_rng(4)
    image = np.full((size, size, 3), 236, np.uint8)
    image[:, :size // 2] = rng.integers(60, 200, (size, size // 2, 3), dtype=np.uint8)
    head = f"Aperio Image Library v12.0.0\r\n{size}x{size} (256x256) JPEG/RGB"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None,
                  description=f"{head}|AppMag = 20|MPP = 0.5")
        tif.write(image[::16, ::16].copy(), photometric="rgb", metadata=None, description=f"{head}\r\nthumb")
        for k in (2, 4):
            tif.write(image[::k, ::k].copy(), tile=(256, 256), compression="jpeg", photometric="rgb",
                      metadata=None, description=f"{head}\r\nlevel")
    return path


def _rgb_fcn(width: int) -> nn.Module:
    """An RGB net of 32x32 patches, stride 8, ``width`` channels in its first conv."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 16, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(32 * 4 * 4, 10)).eval()
    return fcconv.convolutionalize(net, (3, 32, 32))


def tissue_mask(size: int, tile: int, repeats: int, folder: Path) -> None:
    print(f"9. Tissue mask: {size}x{size} SVS-style slide, 50% background, RGB net (stride 8), tile {tile}")
    fcn = _rgb_fcn(16)
    slide = _svs(folder / "slide.svs", size)

    def run(mask: object) -> np.ndarray:
        return fcconv.tiled_map(fcn, slide, mpp=0.5, tile=tile, transform=lambda t: t.float() / 255,
                                mask=mask, progress=False, method="tiles")

    maps: dict[str, np.ndarray] = {}
    times = {"unmasked": float("inf"), "masked": float("inf")}
    for _ in range(repeats):  # interleaved
        for name, mask in (("unmasked", None), ("masked", "otsu")):
            start = time.perf_counter()
            maps[name] = run(mask)
            times[name] = min(times[name], time.perf_counter() - start)
    computed = ~np.isnan(maps["masked"][0])
    same = bool(np.array_equal(maps["masked"][:, computed], maps["unmasked"][:, computed]))
    ratio = times["masked"] / times["unmasked"]
    print(f"  {computed.mean():.1%} of the cells computed; unmasked {times['unmasked']:.2f} s, masked "
          f"{times['masked']:.2f} s (Otsu mask included), computed cells identical: {same}")
    check("mask", ratio <= 0.6 and same, f"masked / unmasked time {ratio:.2f} <= 0.6, same computed cells")


def prefetch(size: int, tile: int, repeats: int, folder: Path) -> None:
    print(f"10. Prefetch: {size}x{size} SVS-style slide (JPEG tiles), a light RGB net (stride 8), "
          f"tile {tile}")
    fcn = _rgb_fcn(4)
    slide = _svs(folder / "slide.svs", size)
    maps: dict[bool, np.ndarray] = {}
    times = {False: float("inf"), True: float("inf")}
    for _ in range(repeats):  # interleaved
        for ahead in (False, True):
            start = time.perf_counter()
            maps[ahead] = fcconv.tiled_map(fcn, slide, mpp=0.5, tile=tile, prefetch=ahead, progress=False,
                                           method="tiles",
                                           transform=lambda t: t.float() / 255)
            times[ahead] = min(times[ahead], time.perf_counter() - start)
    tiles = len(plan_for(fcn, slide, mpp=0.5, tile=tile, method="tiles"))
    same = bool(np.array_equal(maps[True], maps[False]))
    without, ahead = tiles / times[False], tiles / times[True]
    print(f"  {tiles} tiles: without prefetch {times[False]:.2f} s ({without:.2f} tiles/s), with "
          f"{times[True]:.2f} s ({ahead:.2f} tiles/s): throughput x{ahead / without:.2f}; "
          f"maps identical: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller images, fewer repeats")
    parser.add_argument("--only", default="1,2,3,4,5,6,7,8,9,10", help="the sections to run, e.g. --only 9")
    parser.add_argument("--stream-only", action="store_true", help="only the streaming sections 5-8")
    args = parser.parse_args()
    only = {5, 6, 7, 8} if args.stream_only else {int(k) for k in args.only.split(",")}
    repeats = 2 if args.quick else 3
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
          f"load average {os.getloadavg()[0]:.1f}")
    model = load_digits_model()
    fcn = fcconv.convolutionalize(model, (1, 12, 12))
    if 1 in only:
        halo_cost(fcn, 768 if args.quick else 1536, 256 if args.quick else 512, repeats)
    if 2 in only:
        against_patches(model, fcn, 192 if args.quick else 512, 512, repeats)
    if 3 in only:
        with tempfile.TemporaryDirectory() as folder:
            memory((2048, 4096) if args.quick else (2048, 8192), 1024, Path(folder))
    if 4 in only:
        workers(fcn, 768 if args.quick else 1024, 256, repeats)
    if 5 in only:
        stream_factor(8192)
    if 6 in only:
        stream_throughput(1024 if args.quick else 4096, 1024 if args.quick else 2048, 1 if args.quick else 2)
    if 7 in only:
        with tempfile.TemporaryDirectory() as folder:
            stream_memory(1024 if args.quick else 4096, Path(folder))
    if 8 in only:
        stream_against_tiles(2048 if args.quick else 4096, 1024 if args.quick else None)
    if 9 in only:
        with tempfile.TemporaryDirectory() as folder:
            tissue_mask(1024 if args.quick else 2048, 256, repeats, Path(folder))
    if 10 in only:
        with tempfile.TemporaryDirectory() as folder:
            prefetch(1024 if args.quick else 2048, 512, repeats, Path(folder))
    failed = [name for name, ok in RESULTS if not ok]
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print("all targets met" if not failed else f"missed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
