"""Dense score maps against the sliding window, measured side by side (issue 4).

For resnet18 at 448x448 (64 windows of 224 at stride 32) and vgg11 at 320x320 (16 windows), the
converted model's one forward pass is timed against ``fcconv.sliding_window`` (batched crops), and
the time ratio is printed next to the ratio of multiply-accumulates counted by
``torch.utils.flop_counter.FlopCounterMode``. Also: the converted resnet18 against the original
resnet18's own forward at 448, the conversion time of resnet50, the three heads of vgg11, and how
much the dense map of these padded networks agrees with the sliding window (top-1, cosine).

Every time is the minimum over repeats, in one run, on one machine (shared machines are noisy:
the minimum is the least disturbed run). Targets (head_impl="auto"): time ratio >= MAC ratio,
converted/original <= 1.1, conversion < 1 s.

Usage: python bench/dense_vs_sliding.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

from fcconv.models import convolutionalize, sliding_window

RESULTS: list[tuple[str, bool]] = []


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time over ``repeats`` runs, after one warm-up run (``torch.utils.benchmark.Timer``)."""
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    timer.timeit(1)
    return min(timer.timeit(1).mean for _ in range(repeats))


def flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def check(name: str, ok: bool, text: str) -> None:
    RESULTS.append((name, ok))
    print(f"  [{'PASS' if ok else 'FAIL'}] {text}")


def agreement(dense: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement over cells and mean cosine similarity of the score vectors."""
    top1 = (dense.argmax(1) == reference.argmax(1)).float().mean().item()
    cosine = F.cosine_similarity(dense, reference, dim=1).mean().item()
    return top1, cosine


def dense_vs_sliding(name: str, model: nn.Module, size: int, *, repeats: int, sliding_repeats: int,
                     batch_size: int) -> None:
    fcn = convolutionalize(model, (3, 224, 224), head_impl="auto")
    x = torch.randn(1, 3, size, size)
    window, stride = fcn.window, fcn.stride
    cells = fcn.grid_shape((size, size))
    n_windows = cells[0] * cells[1]

    def dense() -> torch.Tensor:
        return fcn(x)

    def sliding() -> torch.Tensor:
        return sliding_window(model, x, window=window, stride=stride, batch_size=batch_size, progress=False)

    with torch.no_grad():
        dense_flops, sliding_flops = flops(dense), flops(sliding)
        top1, cosine = agreement(dense(), sliding())
        # Interleaved rounds, so that both see the same load on a shared machine; minimum of each.
        t_dense = t_sliding = float("inf")
        for _ in range(sliding_repeats):
            t_dense = min(t_dense, best_time(dense, repeats))
            t_sliding = min(t_sliding, best_time(sliding, 1))
        t_dense = min(t_dense, best_time(dense, repeats))
    mac_ratio = sliding_flops / dense_flops
    time_ratio = t_sliding / t_dense
    print(f"{name} at {size}x{size}: {n_windows} windows of {window[0]} at stride {stride[0]}, "
          f"grid {cells}, sliding batch {batch_size}")
    print(f"  dense   {t_dense * 1e3:9.1f} ms   {dense_flops / 2e9:8.2f} GMAC")
    print(f"  sliding {t_sliding * 1e3:9.1f} ms   {sliding_flops / 2e9:8.2f} GMAC")
    print(f"  agreement with the sliding window (padded network): top-1 {top1:.3f}, cosine {cosine:.4f}")
    check(f"{name} ratio", time_ratio >= mac_ratio,
          f"time ratio {time_ratio:.2f}x  vs  MAC ratio {mac_ratio:.2f}x  (target: time >= MAC)")


def converted_vs_original(repeats: int) -> None:
    model = tvm.resnet18(weights=None).eval()
    fcn = convolutionalize(model, (3, 224, 224))
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        # interleaved, so that both see the same machine load
        t_fcn, t_model = float("inf"), float("inf")
        fcn(x), model(x)
        for _ in range(repeats):
            t_fcn = min(t_fcn, best_time(lambda: fcn(x), 1))
            t_model = min(t_model, best_time(lambda: model(x), 1))
    print(f"resnet18 at 448x448: converted (8x8 map) {t_fcn * 1e3:.1f} ms, original (1 vector) "
          f"{t_model * 1e3:.1f} ms")
    ratio = t_fcn / t_model
    check("resnet18 overhead", ratio <= 1.1, f"converted / original = {ratio:.3f}  (target <= 1.1)")


def conversion_time(repeats: int) -> None:
    model = tvm.resnet50(weights=None).eval()
    t = best_time(lambda: convolutionalize(model, (3, 224, 224)), repeats)
    t_copy = best_time(lambda: __import__("copy").deepcopy(model), repeats)
    print(f"resnet50 conversion: {t * 1e3:.0f} ms (of which the deep copy of the model alone takes "
          f"{t_copy * 1e3:.0f} ms)")
    check("resnet50 conversion", t < 1.0, f"conversion {t:.3f} s  (target < 1 s)")


def heads(repeats: int, rounds: int) -> None:
    model = tvm.vgg11(weights=None).eval()
    x = torch.randn(1, 3, 320, 320)
    names = ("auto", "conv", "matmul")
    fcns = {head: convolutionalize(model, (3, 224, 224), head_impl=head) for head in names}
    layers = {head: fcn.graph_module.get_submodule("classifier.0") for head, fcn in fcns.items()}
    with torch.no_grad():
        features = model.features(x)  # the (512, 10, 10) map the 7x7 head conv slides over
        t_model = dict.fromkeys(names, float("inf"))
        t_layer = dict.fromkeys(names, float("inf"))
        for _ in range(rounds):  # interleaved, so that all heads see the same load
            for head in names:
                t_model[head] = min(t_model[head], best_time(lambda h=head: fcns[h](x), repeats))
                t_layer[head] = min(t_layer[head], best_time(lambda h=head: layers[h](features), repeats))
        reference = fcns["conv"](x)
        for head in names:
            out = fcns[head](x)
            diff = (out - reference).abs().max().item() / reference.abs().max().item()
            print(f"  head_impl={head!r:9s} whole dense map {t_model[head] * 1e3:8.1f} ms, head layer "
                  f"{layers[head].__class__.__name__} 512->4096 7x7 on 10x10: "
                  f"{t_layer[head] * 1e3:7.1f} ms  (max rel. diff. to 'conv' {diff:.1e})")
    print(f"  head layer conv / matmul = {t_layer['conv'] / t_layer['matmul']:.2f}x, whole map "
          f"{t_model['conv'] / t_model['matmul']:.2f}x, on {x.device.type}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = 3
    sliding_repeats = 2 if args.quick else 6
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; {sliding_repeats} interleaved rounds of {repeats} dense "
          "runs and 1 sliding run, minimum")
    print()
    resnet18 = tvm.resnet18(weights=None).eval()
    dense_vs_sliding("resnet18", resnet18, 448, repeats=repeats, sliding_repeats=sliding_repeats,
                     batch_size=32)
    vgg11 = tvm.vgg11(weights=None).eval()
    dense_vs_sliding("vgg11", vgg11, 320, repeats=repeats, sliding_repeats=sliding_repeats,
                     batch_size=16)
    print()
    converted_vs_original(repeats)
    print()
    conversion_time(3 if args.quick else 5)
    print()
    print("vgg11 heads (head_impl='auto' picks matmul on CPU, conv elsewhere):")
    heads(repeats, 2 if args.quick else 4)
    print()
    failed = [name for name, ok in RESULTS if not ok]
    summary = f"{len(RESULTS) - len(failed)}/{len(RESULTS)} targets met"
    print(summary + (f"; FAIL: {', '.join(failed)}" if failed else "; PASS"))


if __name__ == "__main__":
    main()
