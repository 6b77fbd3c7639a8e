"""How tight could a worst-case rounding bound be? Measured on a torchvision model, for a few outputs:

* the op-by-op bound that ``fcconv.certify`` derives (a bound per element, pushed through ``|W|``);
* the exact first-order worst case ``sum_k |d y_i / d z_k| r_k``: ``r_k`` the rounding that node ``k``
  of the torch.fx graph adds with exact inputs (the library's own rules, under a fresh ``Tracker``),
  ``d y_i / d z_k`` from one backward pass per output (zero noise added after every node);
* the real ``|float32 - float64|``.

A measurement, not a certificate: the second bound uses derivatives at ReLU and max-pool kinks as if
no rounding could cross them, and costs one backward pass per output.

Usage::

    python scripts/jacobian_bound.py                 # resnet18, random weights, 224 x 224, 8 outputs
    python scripts/jacobian_bound.py --size 64 --outputs 4
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from typing import Any

import torch
import torchvision
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_map

from fcconv.certify.rounding import Tracker

EPS32 = torch.finfo(torch.float32).eps


class NoisyInterpreter(fx.Interpreter):
    """Runs a graph, adding a zero tensor that requires grad after every node that rounds, and keeps
    each such node's own rounding bound (its inputs taken as exact)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.noises: list[Tensor] = []
        self.roundings: list[Tensor] = []

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op not in ("call_function", "call_method", "call_module"):
            return out
        if not (isinstance(out, Tensor) and out.is_floating_point()):
            return out
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args, kwargs = tree_map(lambda a: a.detach().clone() if isinstance(a, Tensor) else a, (args, kwargs))
        tracker = Tracker((EPS32,))
        with torch.no_grad(), tracker:
            local = getattr(self, n.op)(n.target, args, kwargs)
        bound = tracker.bound(local, 0)
        if tracker.unsupported is not None:
            raise RuntimeError(f"no rounding rule for {tracker.unsupported} in node {n.name}")
        if bound is None:
            return out
        noise = torch.zeros_like(out, requires_grad=True)
        self.noises.append(noise)
        self.roundings.append(bound.detach())
        return out + noise


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision classification model")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--outputs", type=int, default=8, help="how many outputs (largest errors first)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(1, 3, args.size, args.size)
    model64 = copy.deepcopy(model).double()
    tracker = Tracker((EPS32,))
    with torch.no_grad():
        y32 = model(x)
        with tracker:
            y64 = model64(x.double())
    op_by_op = tracker.bound(y64, 0)
    err = (y32.double() - y64).abs().flatten()
    interp = NoisyInterpreter(fx.symbolic_trace(model64))
    y = interp.run(x.double()).flatten()
    print(f"{len(interp.noises)} rounding nodes; max |f32 - f64| {float(err.max()):.3g}, "
          f"op-by-op bound max {float(op_by_op.max()) if op_by_op is not None else float('nan'):.3g}")
    for i in err.argsort(descending=True)[: args.outputs].tolist():
        grads = torch.autograd.grad(y[i], interp.noises, retain_graph=True)
        bound = sum(float((g.abs() * r).sum()) for g, r in zip(grads, interp.roundings))
        print(f"output {i}: |f32 - f64| {float(err[i]):.3g}, |y| {float(y[i].detach().abs()):.3g}, "
              f"exact-Jacobian bound {bound:.3g} ({bound / float(err[i]):.3g}x the error)")


if __name__ == "__main__":
    main()
