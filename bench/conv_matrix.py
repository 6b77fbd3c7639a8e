"""Benchmark: building a conv's exact matrix from its kernel vs differentiating the conv.

For each case it times, interleaved round by round (so that every contender sees the same machine
load and allocator state) and keeping the minimum over the rounds:

* ``conv_matrix`` with ``layout="dense"`` and ``layout="csr"`` (ours);
* the baselines ``torch.func.jacrev``, ``torch.func.jacfwd`` and
  ``torch.autograd.functional.jacobian(vectorize=True)``, each checked equal to ours entry for entry
  (a baseline that disagrees is excluded, so a wrong one cannot win; ``jacobian`` runs outside
  ``torch.inference_mode``, under which it silently returns zeros);
* ``torch.zeros`` of the dense matrix's size, the cost of merely allocating it with torch;

then prints the ratios side by side and PASS/FAIL for the targets of issue 2:

* dense >= 4x faster than the best baseline (cases 2 and 3), and within 2.5x of ``torch.zeros``;
* csr >= 10x faster than the best baseline, with memory proportional to the nonzeros;
* ``linear_to_conv(fc6, (512, 7, 7), share_weights=True)`` on VGG16's ``Linear(25088, 4096)``
  allocates no weight memory (measured with ``torch.profiler``) and takes constant time.

Usage::

    python bench/conv_matrix.py              # 10 rounds (baselines: 3)
    python bench/conv_matrix.py --quick      # 3 rounds (baselines: 1), a smoke test
    python bench/conv_matrix.py --repeat 20 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fcconv.layers import conv_matrix, conv_module_geometry, conv_output_shape, linear_to_conv
from fcconv.matrix import conv_matrix_nnz


@dataclass
class Case:
    name: str
    conv: Any
    input_shape: tuple[int, ...]
    dense_target: bool  # the "dense >= 4x faster" target applies (cases 2 and 3)


def cases() -> list[Case]:
    torch.manual_seed(0)
    return [
        Case("Conv2d(3,16,3,padding=1) on 3x32x32", nn.Conv2d(3, 16, 3, padding=1), (3, 32, 32), False),
        Case("Conv2d(16,32,3,stride=2,padding=1) on 16x32x32",
             nn.Conv2d(16, 32, 3, stride=2, padding=1), (16, 32, 32), True),
        Case("Conv2d(8,8,5,dilation=2,groups=2,padding=4) on 8x24x24",
             nn.Conv2d(8, 8, 5, dilation=2, groups=2, padding=4), (8, 24, 24), True),
    ]


def _malloc_trim() -> Callable[[int], object]:
    """glibc's ``malloc_trim``, or a no-op elsewhere."""
    try:
        trim: Callable[[int], object] = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):
        return lambda pad: None


TRIM = _malloc_trim()


def timed(fn: Callable[[], object]) -> float:
    """One run of ``fn`` from the same state every time: garbage collected, and freed heap memory
    handed back to the OS, so that every large allocation gets fresh pages. Without this a matrix
    may or may not land in memory an earlier one left mapped, and ``torch.zeros`` takes 3 ms or 35 ms
    for the same 81 MiB depending on what ran before. (Not ``torch.utils.benchmark.Timer``: it would
    free the result, a matrix of up to hundreds of MiB, inside the timed region.)"""
    gc.collect()
    TRIM(0)
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result  # freed outside the timed region
    return elapsed


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, slow: set[str],
                slow_rounds: int) -> dict[str, float]:
    """The minimum time of each contender over ``rounds`` rounds (``slow_rounds`` for ``slow`` ones)."""
    for fn in contenders.values():
        fn()  # warm-up
    best = {name: math.inf for name in contenders}
    for r in range(rounds):
        for name, fn in contenders.items():
            if name not in slow or r < slow_rounds:
                best[name] = min(best[name], timed(fn))
    return best


def baselines(conv: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Callable[[], Tensor]]:
    """The three autograd Jacobians of the conv w.r.t. its flattened input: (out, in) matrices."""
    x = torch.zeros(math.prod(input_shape))

    def f(flat: Tensor) -> Tensor:
        return conv(flat.view(1, *input_shape)).flatten()

    def jacrev() -> Tensor:
        return torch.func.jacrev(f)(x)

    def jacfwd() -> Tensor:
        return torch.func.jacfwd(f)(x)

    def jacobian() -> Tensor:
        # Not under inference_mode: there it silently returns zeros.
        return torch.autograd.functional.jacobian(f, x, vectorize=True)

    return {"jacrev": jacrev, "jacfwd": jacfwd, "autograd.jacobian": jacobian}


def csr_bytes(m: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in (m.values(), m.col_indices(), m.crow_indices()))


@dataclass
class Row:
    name: str
    dense_speedup: float
    dense_over_zeros: float
    csr_speedup: float
    csr_bytes_per_nnz: float
    dense_over_csr_bytes: float


def run_case(case: Case, rounds: int, slow_rounds: int) -> tuple[Row, list[tuple[str, bool]]]:
    conv, shape = case.conv, case.input_shape
    conv.requires_grad_(False)  # the Jacobian is w.r.t. the input only
    rows, cols = math.prod(conv_output_shape(conv, shape)), math.prod(shape)
    print(f"\n== {case.name}: matrix {rows} x {cols} ({rows * cols * 4 / 2**20:.1f} MiB in float32)")

    dense = conv_matrix(conv, shape)
    csr = conv_matrix(conv, shape, layout="csr")
    if not torch.equal(csr.to_dense(), dense):
        raise SystemExit("conv_matrix csr != dense: fix fcconv before timing it")
    contenders: dict[str, Callable[[], object]] = {
        "torch.zeros": lambda: torch.zeros(rows, cols),
        "conv_matrix dense": lambda: conv_matrix(conv, shape),
        "conv_matrix csr": lambda: conv_matrix(conv, shape, layout="csr"),
    }
    valid = {}
    for name, fn in baselines(conv, shape).items():
        result = fn()
        valid[name] = result.shape == dense.shape and torch.equal(result, dense)
        contenders[name] = fn
    t = interleaved(contenders, rounds, set(valid), slow_rounds)
    for name, seconds in t.items():
        note = "" if name not in valid else ("  equal to ours" if valid[name] else "  WRONG: excluded")
        print(f"  {name:<20} {seconds * 1e3:10.2f} ms{note}")
    best_name = min((n for n in valid if valid[n]), key=t.__getitem__)
    best = t[best_name]

    geom = conv_module_geometry(conv, shape[1:])
    nnz = conv_matrix_nnz(geom, conv.padding_mode, c_out=conv.out_channels,
                          c_in_per_group=conv.weight.shape[1])
    nbytes = csr_bytes(csr)
    # Proportional to the nonzeros: a value (4 B) and a column index (8 B) per nonzero, plus one
    # row pointer (8 B) per row; nothing that grows with rows x cols.
    bound = nnz * (4 + 8) + (rows + 1) * 8
    row = Row(case.name, best / t["conv_matrix dense"], t["conv_matrix dense"] / t["torch.zeros"],
              best / t["conv_matrix csr"], nbytes / nnz, rows * cols * 4 / nbytes)
    print(f"  best baseline: {best_name}; csr: {nbytes} B for {nnz} nonzeros (bound {bound} B)")
    results = []
    if case.dense_target:
        results.append((f"{case.name}: dense >= 4x faster than the best baseline ({best_name})",
                        row.dense_speedup >= 4))
    results.append((f"{case.name}: dense within 2.5x of torch.zeros", row.dense_over_zeros <= 2.5))
    results.append((f"{case.name}: csr >= 10x faster than the best baseline ({best_name})",
                    row.csr_speedup >= 10))
    results.append((f"{case.name}: csr memory proportional to the nonzeros",
                    csr._nnz() == nnz and nbytes <= bound))
    return row, results


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop lines on file descriptor 2."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocated_bytes(fn: Callable[[], object]) -> int:
    """Bytes that ``fn`` allocates on the CPU, by ``torch.profiler`` (each op's own allocations)."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def run_fc6(rounds: int) -> list[tuple[str, bool]]:
    print("\n== linear_to_conv(fc6 = Linear(25088, 4096), (512, 7, 7))")
    fc6: Any = nn.utils.skip_init(nn.Linear, 25088, 4096)  # uninitialised: the values do not matter
    fc6.weight.data.zero_()  # touch the pages once, so that copying them is not page faults alone
    t = interleaved({
        "share": lambda: linear_to_conv(fc6, (512, 7, 7), share_weights=True),
        "copy": lambda: linear_to_conv(fc6, (512, 7, 7)),
    }, rounds, {"copy"}, max(1, rounds // 3))
    shared = allocated_bytes(lambda: linear_to_conv(fc6, (512, 7, 7), share_weights=True))
    copied = allocated_bytes(lambda: linear_to_conv(fc6, (512, 7, 7), share_weights=False))
    conv: Any = linear_to_conv(fc6, (512, 7, 7), share_weights=True)
    aliases = conv.weight.data_ptr() == fc6.weight.data_ptr() and conv.bias.data_ptr() == fc6.bias.data_ptr()
    weight_bytes = fc6.weight.numel() * fc6.weight.element_size()
    print(f"  share_weights=True {t['share'] * 1e6:10.1f} us, allocates {shared} B; "
          f"copy {t['copy'] * 1e3:.2f} ms, allocates {copied} B (weight: {weight_bytes} B)")
    print(f"  ratios: copy/share time {t['copy'] / t['share']:.0f}x | "
          f"share allocates {shared / weight_bytes:.6f} of the weight | data_ptr shared: {aliases}")
    return [("fc6 share_weights=True allocates no weight memory (aliases)", aliases and shared < 2**16)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=10,
                        help="timed rounds (min kept); the slow baselines run a third as many")
    parser.add_argument("--quick", action="store_true", help="3 rounds, baselines once: a smoke test")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    rounds = 3 if args.quick else max(1, args.repeat)
    slow_rounds = max(1, rounds // 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.script inside torch.func
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"minimum of {rounds} interleaved rounds ({slow_rounds} for the baselines)")
    table, results = [], []
    for case in cases():
        row, res = run_case(case, rounds, slow_rounds)
        table.append(row)
        results += res
    results += run_fc6(rounds)

    print("\nRatios (higher speed-up is better; dense/zeros: time of conv_matrix dense over torch.zeros)")
    print(f"  {'case':<56} {'dense speed-up':>14} {'dense/zeros':>11} {'csr speed-up':>12} "
          f"{'csr B/nnz':>9} {'dense B/csr B':>13}")
    for r in table:
        print(f"  {r.name:<56} {r.dense_speedup:13.1f}x {r.dense_over_zeros:11.2f} {r.csr_speedup:11.1f}x "
              f"{r.csr_bytes_per_nnz:9.1f} {r.dense_over_csr_bytes:12.0f}x")
    print()
    for label, ok in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {label}")
    failed = sum(not ok for _, ok in results)
    print(f"\n{len(results) - failed}/{len(results)} targets PASS")


if __name__ == "__main__":
    main()
