"""ONNX deployment speed, measured side by side in one run (issue 11).

* onnxruntime against PyTorch eager on the dense score map of resnet18 at 448x448 and vgg11 at
  320x320 (the convolutionalized models, exported by ``fcconv.onnx.export``; PyTorch runs the FCN
  with its default head).
* conv-only against the default export, both in onnxruntime, on the plain classifiers resnet18 and
  vgg11 at 224 (the only graphs with a Gemm to replace; a FullyConvolutional exports conv-only
  anyway). Target: conv-only at most 1.2x slower.
* export time of resnet50: ``torch.onnx.export(dynamo=True)`` (target: under 30 s), and
  ``fcconv.onnx.export`` with its onnxruntime checks (printed: the check runs ``fcconv.compare``'s
  float64 rounding-bound propagation on the model, which costs more than the export).

Times are the minimum over repeats, the two sides interleaved (A, B, A, B...) so that load on a
shared machine hits both alike; both runtimes get the same number of threads.

Usage: python bench/onnx.py [--quick] [--threads N]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named onnx.py: keep its folder off sys.path, or "import onnx" would import it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torchvision.models as tvm  # noqa: E402
from torch import nn  # noqa: E402

import fcconv  # noqa: E402
import fcconv.onnx  # noqa: E402

RESULTS: list[tuple[str, bool]] = []


def side_by_side(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Minimum wall times of ``a`` and ``b`` over ``repeats`` interleaved runs, after a warm-up."""
    a(), b()
    best_a = best_b = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a()
        best_a = min(best_a, time.perf_counter() - start)
        start = time.perf_counter()
        b()
        best_b = min(best_b, time.perf_counter() - start)
    return best_a, best_b


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runner(sess: ort.InferenceSession, x: torch.Tensor) -> Callable[[], object]:
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: sess.run(None, feed)


def check(name: str, ok: bool, text: str) -> None:
    RESULTS.append((name, ok))
    print(f"  [{'PASS' if ok else 'FAIL'}] {text}")


def dense_map(name: str, model: nn.Module, size: int, folder: Path, threads: int, repeats: int) -> None:
    fcn = fcconv.convolutionalize(model, (3, 224, 224))
    path = folder / f"{name}-fcn.onnx"
    fcconv.onnx.export(fcn, path, (3, 224, 224), check_sizes=[(size, size)])
    x = torch.randn(1, 3, size, size)
    sess = session(path, threads)
    with torch.no_grad():
        t_torch, t_ort = side_by_side(lambda: fcn(x), runner(sess, x), repeats)
    cells = fcn.grid_shape((size, size))
    print(f"{name} dense map at {size}x{size} ({cells[0]}x{cells[1]} cells): PyTorch eager "
          f"{1e3 * t_torch:.1f} ms, onnxruntime {1e3 * t_ort:.1f} ms, "
          f"onnxruntime/PyTorch = {t_ort / t_torch:.2f}")


def conv_only_vs_default(name: str, model: nn.Module, folder: Path, threads: int, repeats: int) -> None:
    default, conv = folder / f"{name}.onnx", folder / f"{name}-conv.onnx"
    fcconv.onnx.export(model, default, (3, 224, 224))
    report = fcconv.onnx.export(model, conv, (3, 224, 224), conv_only=True)
    x = torch.randn(1, 3, 224, 224)
    t_default, t_conv = side_by_side(runner(session(default, threads), x), runner(session(conv, threads), x),
                                     repeats)
    ratio = t_conv / t_default
    check(f"{name} conv-only", ratio <= 1.2,
          f"{name} at 224, onnxruntime: default {1e3 * t_default:.1f} ms, conv-only {1e3 * t_conv:.1f} ms "
          f"({', '.join(f'{k} {v}' for k, v in report.rewritten.items())}): conv-only/default = "
          f"{ratio:.2f} (target <= 1.2)")


def export_time(folder: Path) -> None:
    model = tvm.resnet50(weights=None).eval()
    x = torch.randn(2, 3, 224, 224)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(folder / "r50-raw.onnx"), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    raw = time.perf_counter() - start
    start = time.perf_counter()
    fcconv.onnx.export(model, folder / "r50.onnx", (3, 224, 224))
    checked = time.perf_counter() - start
    check("resnet50 export", raw < 30,
          f"resnet50 torch.onnx.export(dynamo=True): {raw:.1f} s (target < 30 s)")
    print(f"  fcconv.onnx.export of resnet50 with its checks (onnxruntime within the derived bound, and "
          f"the float64 verdict of onnx.reference): {checked:.1f} s (no target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads for both runtimes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 10
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {cpu}, "
          f"{args.threads} thread(s), min of {repeats} interleaved repeats")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dense_map("resnet18", tvm.resnet18(weights=None).eval(), 448, folder, args.threads, repeats)
        dense_map("vgg11", tvm.vgg11(weights=None).eval(), 320, folder, args.threads, repeats)
        conv_only_vs_default("resnet18", tvm.resnet18(weights=None).eval(), folder, args.threads, repeats)
        conv_only_vs_default("vgg11", tvm.vgg11(weights=None).eval(), folder, args.threads, repeats)
        export_time(folder)
    failed = [name for name, ok in RESULTS if not ok]
    missed = f"; missed: {', '.join(failed)}" if failed else ""
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} targets met{missed}")


if __name__ == "__main__":
    main()
