"""Where the rounding bound grows: op by op through a torchvision model, the factor by which each op
multiplies the largest float32 bound, then the final bound against the real ``|float32 - float64|``.

Usage::

    python scripts/bound_growth.py                  # resnet18, random weights, 224 x 224
    python scripts/bound_growth.py --model vgg11 --size 64
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from typing import Any

import torch
import torchvision

from fcconv.certify.rounding import Tracker

EPS32 = torch.finfo(torch.float32).eps


class GrowthLog(Tracker):
    """A tracker that records, per op, the largest bound of its output and of its first input."""

    def __init__(self) -> None:
        super().__init__((EPS32,))
        self.log: list[tuple[str, float, float | None]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        before = None if first is None else self.bound(first, 0)
        before_max = None if before is None else float(before.max())
        out = super().__torch_dispatch__(func, types, args, kwargs)
        leaf = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            bound = self.bound(leaf, 0)
            if bound is not None:
                self.log.append((func.overloadpacket.__name__, float(bound.max()), before_max))
        return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision classification model")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    x = torch.randn(1, 3, args.size, args.size)
    tracker = GrowthLog()
    with torch.no_grad():
        y32 = model(x)
        model64 = copy.deepcopy(model).double()
        with tracker:
            y64 = model64(x.double())
    if tracker.unsupported is not None:
        print(f"stopped at {tracker.unsupported}: no bound beyond it")
    for name, after, before in tracker.log:
        factor = "" if not before else f"x{after / before:.3g}"
        print(f"{name:28s} bound {after:10.3g} {factor}")
    bound = tracker.bound(y64, 0)
    err = (y32.double() - y64).abs()
    if bound is not None:
        print(f"output: max |f32 - f64| {float(err.max()):.3g}, max bound {float(bound.max()):.3g}, "
              f"bound / error {float(bound.max() / err.max()):.3g}, holds: {bool((err <= bound).all())}")


if __name__ == "__main__":
    main()
