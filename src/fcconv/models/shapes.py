"""The shape of every node of a graph, from one run on shape-only ``meta`` tensors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from fcconv._shapes import format_shape, module_dtype_device
from fcconv.errors import NotEquivalentError
from fcconv.models.tracing import describe

__all__ = ["NodeFailure", "NodeValue", "Shape", "node_failure", "record_shapes", "record_sizes"]

Shape = tuple[int, ...]
NodeValue = Shape | list[Shape | None] | None


class NodeFailure(Exception):
    """A node raised while the graph ran on an example input."""

    def __init__(self, node: fx.Node, error: BaseException) -> None:
        super().__init__(f"{node.name}: {error}")
        self.node = node
        self.error = error


def _value_shape(value: object) -> NodeValue:
    if isinstance(value, Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, Tensor) for v in value):
        return [tuple(v.shape) for v in value]
    return None


# Modules whose output has the shape of their input: on meta tensors they are skipped (batch_norm
# on meta runs a Python decomposition, the bulk of the cost of a meta run).
_SAME_SHAPE_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.LeakyReLU, nn.Mish,
)


def _check_input_dim(module: nn.Module, x: Tensor) -> None:
    """What a skipped batch norm would refuse on real tensors (a BatchNorm1d on a 4-d map)."""
    with contextlib.suppress(NotImplementedError):  # a _BatchNorm subclass that does not say
        module._check_input_dim(x)  # type: ignore[operator]


# Why not torch.fx.passes.shape_prop.ShapeProp: with a FakeTensorMode it gives the same shapes but,
# measured on torchvision models at 224 (one CPU thread), took 0.7-1.4 s for resnet50, 0.2 s for
# vgg16_bn and 1.0 s for mobilenet_v3_small, against 0.04, 0.01 and 0.05 s here: it deep-copies the
# model into fake tensors and runs every BatchNorm's decomposition, and the geometry search runs the
# graph up to a few dozen times. Here parameters are swapped for meta tensors (functional_call),
# same-shape modules are skipped on meta, and an op without a meta kernel falls back to real zeros.
class _ShapeRecorder(fx.Interpreter):
    """Runs a graph and records the shape of every node; a failing node is reported by name."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.shapes: dict[fx.Node, NodeValue] = {}
        self.sizes: dict[fx.Node, Any] = {}  # ints and sizes read from tensors (x.size(2), x.shape)

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if len(args) == 1 and not kwargs and isinstance(args[0], Tensor) and args[0].is_meta:
            module = self.fetch_attr(target)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and args[0].dim() in (2, 3, 4, 5):
                _check_input_dim(module, args[0])
                return args[0]
            if type(module) in _SAME_SHAPE_MODULES:
                return args[0]
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except NodeFailure:
            raise
        except Exception as error:
            raise NodeFailure(n, error) from error
        self.shapes[n] = _value_shape(result)
        if isinstance(result, (int, float, torch.Size)) or (
                isinstance(result, tuple) and all(isinstance(v, int) for v in result)):
            self.sizes[n] = result
        return result


class _Runner(nn.Module):
    """Holds the graph module so that ``functional_call`` can swap in meta parameters."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, x: Tensor) -> tuple[dict[fx.Node, NodeValue], dict[fx.Node, Any]]:
        recorder = _ShapeRecorder(self.gm)
        recorder.run(x)
        return recorder.shapes, recorder.sizes


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def record_shapes(gm: fx.GraphModule, input_shape: Sequence[int], *, batch: int = 2,
                  meta_only: bool = False) -> dict[fx.Node, NodeValue]:
    """:func:`record_sizes`'s shapes."""
    return record_sizes(gm, input_shape, batch=batch, meta_only=meta_only)[0]


def record_sizes(gm: fx.GraphModule, input_shape: Sequence[int], *, batch: int = 2,
                 meta_only: bool = False) -> tuple[dict[fx.Node, NodeValue], dict[fx.Node, Any]]:
    """The shape of every node of ``gm`` on an input of per-sample shape ``input_shape``, and the
    value of every node that returns an int, a float or a size.

    Runs on ``meta`` tensors (no computation); where an op has no meta kernel, runs again on real
    zeros, in eval mode, without gradients, leaving every module's mode as it was.

    Raises:
        NodeFailure: if a node fails on real tensors too (or on meta with ``meta_only``).
    """
    found_dtype, found_device = module_dtype_device(gm)
    dtype = found_dtype or torch.get_default_dtype()
    device = found_device or torch.device("cpu")
    state = {**dict(gm.named_parameters(remove_duplicate=False)),
             **dict(gm.named_buffers(remove_duplicate=False))}
    copies: dict[int, Tensor] = {}  # tied tensors (one Parameter under two names) stay tied
    meta = {f"gm.{k}": copies.setdefault(id(v), v.detach().to("meta")) for k, v in state.items()}
    runner = _Runner(gm)
    x = torch.empty((batch, *input_shape), dtype=dtype, device="meta")
    try:
        with torch.no_grad(), _eval_mode(gm):
            result: tuple[dict[fx.Node, NodeValue], dict[fx.Node, Any]] = torch.func.functional_call(
                runner, meta, (x,))
        return result
    except NodeFailure:
        if meta_only:
            raise
    with torch.no_grad(), _eval_mode(gm):
        result = runner(torch.zeros((batch, *input_shape), dtype=dtype, device=device))
    return result


def node_failure(error: NodeFailure, gm: fx.GraphModule, shape: Sequence[int], when: str,
                  todo: str) -> NotEquivalentError:
    """The user's error for a node that failed while the graph ran on ``shape``."""
    return NotEquivalentError(
        f"{when} {format_shape(shape)} fails at {describe(error.node, gm)}: "
        f"{type(error.error).__name__}: {error.error}. {todo}"
    )
