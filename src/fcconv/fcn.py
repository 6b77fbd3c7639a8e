"""Whole models: turn a classifier into a fully convolutional network that yields score maps.

:func:`convolutionalize` rewrites a trained classifier (Caffe's "net surgery", OverFeat, FCN) so
that, on an image larger than the training resolution, one forward pass returns a map of class
scores, one cell per window of the training size, slid with the network's total stride. The pass is
built on torch.fx: the model is traced, shapes come from one run on ``meta`` tensors at
``input_shape`` (the training resolution), and only the classifier head changes:

* the first ``Linear`` after a flatten of a ``(C, h, w)`` map becomes a conv with kernel ``(h, w)``
  (:func:`fcconv.layers.linear_to_conv`), later ``Linear`` layers become pointwise convs
  (:func:`fcconv.layers.linear_to_pointwise`);
* element-wise modules and functions of the head carry over; ``BatchNorm1d`` becomes
  ``BatchNorm{n}d`` and ``LayerNorm`` over the features a layer norm over channels;
* an adaptive pooling that is the identity at training size is dropped; the global pooling that
  feeds the head becomes a stride-1 pooling whose kernel is the training feature size;
* global poolings inside the feature extractor (squeeze-and-excitation blocks) stay global.

The model must be in eval mode where it matters: BatchNorm, Dropout or RReLU modules in training
mode are refused (their output depends on the batch or on chance; call ``model.eval()``). A flatten
of a map whose dims were permuted (NHWC, swapped H and W) is refused at the flatten, naming the
permuting node.

:func:`sliding_window` is the naive reference: the model on every crop, in batches.

Example:
    >>> fcn = convolutionalize(torchvision.models.resnet18().eval(), (3, 224, 224))
    >>> fcn(torch.rand(1, 3, 448, 448)).shape
    torch.Size([1, 1000, 8, 8])
"""

from __future__ import annotations

import copy
import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from tqdm.auto import tqdm

from fcconv import _fx
from fcconv._shapes import check_input_shape, format_shape
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.layers import linear_to_conv, linear_to_pointwise

__all__ = [
    "FullyConvolutional",
    "UnfoldConv1d",
    "UnfoldConv2d",
    "UnfoldConv3d",
    "ChannelLayerNorm",
    "convolutionalize",
    "sliding_window",
]

_HEADS = ("auto", "conv", "matmul")
# With head="auto" on CPU the unfold + matmul path is used while its column buffer stays below this.
_AUTO_MATMUL_MAX_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------------------------
# Modules the pass creates


def _unfold_matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A stride-1, unpadded, ungrouped convolution computed as unfold (im2col) + one matmul.

    All windows of all samples form the columns of one ``(C*k, N*L)`` matrix, so the weight, the
    bulk of the memory traffic of a classifier head, is read once.
    """
    kernel = tuple(weight.shape[2:])
    ndim = len(kernel)
    n, out_channels = x.shape[0], weight.shape[0]
    out_spatial = tuple(s - k + 1 for s, k in zip(x.shape[2:], kernel))
    cells = math.prod(out_spatial)
    w2d = weight.reshape(out_channels, -1)
    if all(k == 1 for k in kernel):
        cols = x.reshape(n, x.shape[1], cells)  # a pointwise conv: no unfolding, a view
    elif ndim == 2:
        cols = F.unfold(x, kernel)  # (N, C*kh*kw, L), channel-major like the weight
    else:
        patches = x
        for i, k in enumerate(kernel):
            patches = patches.unfold(2 + i, k, 1)  # (N, C, *out_spatial, *kernel)
        order = (0, 1, *range(2 + ndim, 2 + 2 * ndim), *range(2, 2 + ndim))
        cols = patches.permute(order).reshape(n, w2d.shape[1], cells)
    matrix = cols[0] if n == 1 else cols.transpose(0, 1).reshape(w2d.shape[1], n * cells)
    out = torch.addmm(bias[:, None], w2d, matrix) if bias is not None else w2d @ matrix
    if n == 1:
        return out.reshape(1, out_channels, *out_spatial)
    return out.reshape(out_channels, n, *out_spatial).transpose(0, 1).contiguous()


class _UnfoldMixin:
    """Forward of a large-kernel head conv as unfold + matmul, chosen by ``method``."""

    method: str = "auto"
    weight: Tensor
    bias: Tensor | None
    in_channels: int

    def _use_matmul(self, x: Tensor) -> bool:
        if self.method == "matmul":
            return True
        if self.method == "conv" or x.device.type != "cpu":
            return False
        kernel = math.prod(self.weight.shape[2:])
        cells = math.prod(max(s - k + 1, 0) for s, k in zip(x.shape[2:], self.weight.shape[2:]))
        return x.shape[0] * self.in_channels * kernel * cells * x.element_size() <= _AUTO_MATMUL_MAX_BYTES

    def forward(self, x: Tensor) -> Tensor:
        if self._use_matmul(x):
            return _unfold_matmul(x, self.weight, self.bias)
        return super().forward(x)  # type: ignore[misc]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", method={self.method!r}"  # type: ignore[misc]


class UnfoldConv1d(_UnfoldMixin, nn.Conv1d):
    """``nn.Conv1d`` computed as unfold + matmul (``method='matmul'``), or chosen per device."""


class UnfoldConv2d(_UnfoldMixin, nn.Conv2d):
    """``nn.Conv2d`` computed as unfold + matmul (``method='matmul'``), or chosen per device.

    Its parameters and state dict are those of the ``nn.Conv2d``; ``method='auto'`` uses the matmul
    on CPU (oneDNN's convs are slow on the small maps of a classifier head: 3.6x for vgg's 7x7
    head conv, 3x for its 4096 -> 4096 pointwise ones, with two threads) and ``F.conv2d``
    elsewhere.
    """


class UnfoldConv3d(_UnfoldMixin, nn.Conv3d):
    """``nn.Conv3d`` computed as unfold + matmul (``method='matmul'``), or chosen per device."""


_UNFOLD_CLASSES: dict[int, Any] = {1: UnfoldConv1d, 2: UnfoldConv2d, 3: UnfoldConv3d}


def _as_unfold_conv(conv: nn.modules.conv._ConvNd, method: str) -> nn.Module:
    """The same conv, parameters shared, computed by unfold + matmul where ``method`` says so."""
    cls = _UNFOLD_CLASSES[len(conv.kernel_size)]
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size,
              bias=conv.bias is not None, device="meta")
    new.weight = conv.weight
    new.register_parameter("bias", conv.bias)
    new.method = method
    return new.train(conv.training)


def channel_layer_norm(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
                       bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """``F.layer_norm`` over dim 1 (channels) of an ``(N, C, *spatial)`` map, at every position."""
    return F.layer_norm(x.movedim(1, -1), normalized_shape, weight, bias, eps).movedim(-1, 1)


class ChannelLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm(C)`` applied over the channels of an ``(N, C, *spatial)`` map.

    Same parameters and state dict as the ``nn.LayerNorm`` it replaces; on ``(N, C)`` it is that
    LayerNorm.
    """

    def forward(self, x: Tensor) -> Tensor:
        return channel_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


# ----------------------------------------------------------------------------------------------
# The wrapper


def _check_spatial(values: object, ndim: int, what: str) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,) * ndim
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != ndim or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise FcconvError(
            f"{what} must be {ndim} integer(s), one per spatial dim; got {values!r}."
        )
    return tuple(int(v) for v in values)


class FullyConvolutional(nn.Module):
    """A classifier turned fully convolutional, with the geometry of its score map.

    ``forward(x)`` takes ``(N, C, *spatial)`` with every spatial size at least ``min_size`` and
    returns the dense score map ``(N, outputs, *grid_shape(spatial))``. Cell ``i`` (one index per
    spatial dim) scores the crop ``window_of(i)``: ``window`` pixels from ``i * stride``.

    Attributes:
        graph_module: the converted ``torch.fx.GraphModule``.
        input_shape: the per-sample training shape ``(C, *spatial)`` the model was converted at.
        stride: pixels between neighbouring cells, per spatial dim (the product of all strides).
        window: the input size that one cell sees, per spatial dim: the training size when the
            model gives one output per training image.
        min_size: the smallest input size that gives one cell, per spatial dim.
        exact_sliding_window: True when no layer pads (nor uses ``ceil_mode``) and no global
            pooling is left inside the network: then every cell equals the model run on its crop,
            up to rounding; with padding, cells see the neighbouring pixels where a crop sees
            zeros at its border, and a squeeze-and-excitation block pools the whole image.
        head: ``"auto"``, ``"conv"`` or ``"matmul"``, how the large-kernel head conv computes.
        outputs: the number of channels of the score map (classes).
    """

    def __init__(self, graph_module: fx.GraphModule, *, input_shape: Sequence[int],
                 stride: Sequence[int], window: Sequence[int], min_size: Sequence[int],
                 exact_sliding_window: bool, head: str = "auto", outputs: int | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.input_shape = tuple(int(s) for s in input_shape)
        self.stride = tuple(int(s) for s in stride)
        self.window = tuple(int(s) for s in window)
        self.min_size = tuple(int(s) for s in min_size)
        self.exact_sliding_window = bool(exact_sliding_window)
        self.head = head
        self.outputs = outputs
        self.training = graph_module.training

    @property
    def ndim(self) -> int:
        """Number of spatial dims."""
        return len(self.input_shape) - 1

    def forward(self, x: Tensor) -> Any:
        if x.dim() != self.ndim + 2 or x.shape[1] != self.input_shape[0] or any(
                s < m for s, m in zip(x.shape[2:], self.min_size)):
            raise FcconvError(
                f"FullyConvolutional expects inputs (N, {self.input_shape[0]}, *spatial) with "
                f"{self.ndim} spatial dim(s) of at least {format_shape(self.min_size)}; got "
                f"{format_shape(x.shape)}. Pass a batch of images at least that large."
            )
        return self.graph_module(x)

    def grid_shape(self, spatial: Sequence[int] | int) -> tuple[int, ...]:
        """The spatial size of the score map for an input of spatial size ``spatial``.

        Example:
            >>> fcn.grid_shape((448, 448))   # resnet18 converted at 224
            (8, 8)
        """
        sizes = _check_spatial(spatial, self.ndim, "spatial")
        if any(s < m for s, m in zip(sizes, self.min_size)):
            raise FcconvError(
                f"An input of spatial size {format_shape(sizes)} gives no cell: each dim must be "
                f"at least min_size = {format_shape(self.min_size)}."
            )
        return tuple((s - m) // t + 1 for s, m, t in zip(sizes, self.min_size, self.stride))

    def window_of(self, cell: Sequence[int] | int) -> tuple[int, ...]:
        """The crop that cell ``cell`` scores, in input pixels, ends exclusive.

        In 2d ``(top, left, bottom, right)``; in general ``(*starts, *ends)`` with
        ``starts = cell * stride`` and ``ends = starts + window``. For padded models the last
        cells of a map may extend past the image (the zero padding fills them).

        Example:
            >>> fcn.window_of((1, 2))        # resnet18 converted at 224: stride 32
            (32, 64, 256, 288)
        """
        index = _check_spatial(cell, self.ndim, "cell")
        if any(i < 0 for i in index):
            raise FcconvError(f"cell indices must be >= 0; got {format_shape(index)}.")
        starts = tuple(i * t for i, t in zip(index, self.stride))
        return starts + tuple(s + w for s, w in zip(starts, self.window))

    def geometry(self) -> dict[str, Any]:
        """The geometry as plain ints, tuples, bools and str, to save beside the state dict.

        ``{"state_dict": fcn.state_dict(), "geometry": fcn.geometry()}`` is a checkpoint that
        :meth:`from_state_dict` reloads with ``torch.load(..., weights_only=True)``.
        """
        return {
            "input_shape": self.input_shape,
            "stride": self.stride,
            "window": self.window,
            "min_size": self.min_size,
            "exact_sliding_window": self.exact_sliding_window,
            "head": self.head,
            "outputs": self.outputs,
        }

    @classmethod
    def from_state_dict(cls, model: nn.Module, state_dict: Mapping[str, Any],
                        geometry: Mapping[str, Any] | None = None, *,
                        leaf_modules: object = ()) -> FullyConvolutional:
        """Rebuild a saved FCN: convert ``model`` (the architecture) again and load the weights.

        Args:
            model: an instance of the original architecture (its weights and its mode do not
                matter: it may be in training mode; the FCN has its mode, call ``.eval()`` on the
                result for inference).
            state_dict: ``fcn.state_dict()``, or a checkpoint ``{"state_dict": ..., "geometry": ...}``.
            geometry: ``fcn.geometry()``; taken from the checkpoint when omitted.
            leaf_modules: as for :func:`convolutionalize`.

        Raises:
            FcconvError: if the geometry is missing or differs from the rebuilt one.

        Example:
            >>> ckpt = torch.load("fcn.pt", weights_only=True)
            >>> fcn = FullyConvolutional.from_state_dict(resnet18(), ckpt)
        """
        if geometry is None and "geometry" in state_dict and "state_dict" in state_dict:
            geometry = state_dict["geometry"]
            state_dict = state_dict["state_dict"]
        if geometry is None or "input_shape" not in geometry:
            raise FcconvError(
                "from_state_dict needs the geometry saved with the weights (fcn.geometry(), with "
                "'input_shape'); got none. Save {'state_dict': fcn.state_dict(), 'geometry': "
                "fcn.geometry()}."
            )
        # The weights and statistics are replaced, so the model's mode does not matter here: a
        # freshly built architecture (in training mode) is accepted, and the FCN keeps its mode.
        fcn = _convolutionalize(model, tuple(geometry["input_shape"]), inplace=False,
                                leaf_modules=leaf_modules, head=str(geometry.get("head", "auto")),
                                check_training=False)
        for key in ("stride", "window", "min_size"):
            if key in geometry and tuple(geometry[key]) != getattr(fcn, key):
                raise FcconvError(
                    f"The saved geometry has {key}={tuple(geometry[key])} but the model converts to "
                    f"{key}={getattr(fcn, key)}. Pass an instance of the architecture that was saved."
                )
        fcn.load_state_dict(state_dict)
        return fcn

    def extra_repr(self) -> str:
        return (
            f"input_shape={format_shape(self.input_shape)}, stride={self.stride}, "
            f"window={self.window}, min_size={self.min_size}, outputs={self.outputs}, "
            f"exact_sliding_window={self.exact_sliding_window}, head={self.head!r}"
        )


# ----------------------------------------------------------------------------------------------
# Recognising the head

_FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
_FLATTEN_METHODS = {"flatten", "view", "reshape", "squeeze"}

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.AlphaDropout,
    nn.Hardshrink, nn.Softshrink,
)
_ELEMENTWISE_FUNCTIONS: set[Any] = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, F.sigmoid,
    torch.tanh, F.tanh, F.softplus, F.logsigmoid, F.softsign, torch.clamp, torch.clip,
    F.dropout, F.alpha_dropout, torch.dropout, torch.abs, torch.exp, torch.log, torch.sqrt,
    torch.square, torch.neg, operator.add, operator.sub, operator.mul, operator.truediv,
    operator.neg, operator.pow, operator.iadd, operator.imul, torch.add, torch.mul, torch.sub,
    torch.div, torch.pow,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "abs",
    "exp", "log", "sqrt", "square", "neg", "add", "add_", "sub", "sub_", "mul", "mul_", "div",
    "div_", "pow", "contiguous", "float", "double", "half", "bfloat16", "to", "type_as", "clone",
    "detach",
}
_DIM_FUNCTIONS: dict[Any, tuple[int, str]] = {  # function -> (position of dim, name of dim)
    F.softmax: (1, "dim"), F.log_softmax: (1, "dim"), F.softmin: (1, "dim"),
    torch.softmax: (1, "dim"), torch.log_softmax: (1, "dim"), F.normalize: (2, "dim"),
}
_DIM_METHODS = {"softmax": 0, "log_softmax": 0}
_DIM_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)


@dataclass(frozen=True)
class _Layout:
    """What a head tensor holds; in the converted graph it is a map ``(N, channels, *grid)``.

    ``kind``: "channels" (a flat ``(N, F)`` of features at training size), "window" (a flat
    ``(N, C*h*w)`` that flattens a ``(C, *spatial)`` map) or "map" (a ``(N, C, *spatial)`` map of
    fixed training size, dims possibly permuted: ``order[i]`` is the canonical dim at position i).
    """

    kind: str
    channels: int
    spatial: tuple[int, ...]
    order: tuple[int, ...] = ()

    @property
    def point(self) -> bool:
        return all(s == 1 for s in self.spatial)

    @property
    def channel_position(self) -> int:
        return self.order.index(1) if self.order else 1


@dataclass
class _Pass:
    """State of one conversion."""

    gm: fx.GraphModule
    source: nn.Module
    inplace: bool
    ndim: int
    head: str
    shapes: dict[fx.Node, _fx.NodeValue]
    # per node, how its dims depend on the input size (from _fx.spatial_descriptors)
    descs: dict[fx.Node, Any] = field(default_factory=dict)
    layouts: dict[fx.Node, _Layout] = field(default_factory=dict)
    converted: dict[str, tuple[Any, nn.Module]] = field(default_factory=dict)
    # Nodes to drop, and what replaces them; applied at the end so that layouts stay keyed by
    # the original nodes while the head is walked.
    replaced: dict[fx.Node, fx.Node] = field(default_factory=dict)

    # -- helpers ---------------------------------------------------------------------------
    def shape(self, node: fx.Node) -> tuple[int, ...]:
        s = self.shapes.get(node)
        assert isinstance(s, tuple)
        return s

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))

    def fail(self, node: fx.Node, why: str, todo: str) -> NotEquivalentError:
        return NotEquivalentError(f"Cannot convolutionalize {_fx.describe(node, self.gm)}: {why}. {todo}.")

    def set_module(self, target: str, module: nn.Module, key: Any) -> None:
        """Put ``module`` at ``target`` (and on the source model when converting in place)."""
        previous = self.converted.get(target)
        if previous is not None:
            if previous[0] != key:
                raise NotEquivalentError(
                    f"Module '{target}' is called twice in the head with different inputs "
                    f"({previous[0]} and {key}); it cannot become one conv. Give each call its "
                    "own module."
                )
            return
        self.converted[target] = (key, module)
        roots = [self.gm, self.source] if self.inplace else [self.gm]
        for root in roots:
            parent_name, _, name = target.rpartition(".")
            try:
                parent = root.get_submodule(parent_name) if parent_name else root
            except AttributeError:
                continue
            setattr(parent, name, module)

    def new_module(self, base: str, module: nn.Module) -> str:
        name, i = base, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        self.gm.add_submodule(name, module)
        return name

    def remove(self, node: fx.Node, replacement: fx.Node) -> None:
        self.replaced[node] = replacement

    def apply_removals(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node not in self.replaced:
                continue
            replacement = self.replaced[node]
            while replacement in self.replaced:
                replacement = self.replaced[replacement]
            node.replace_all_uses_with(replacement)
            self.gm.graph.erase_node(node)


def _is_flatten_like(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target in _FLATTEN_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FLATTEN_METHODS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.Flatten)
    return False


def _flatten_points(gm: fx.GraphModule, shapes: dict[fx.Node, _fx.NodeValue], ndim: int) -> set[fx.Node]:
    """Nodes that flatten an ``(N, C, *spatial)`` map into ``(N, C*prod(spatial))``."""
    points = set()
    for node in gm.graph.nodes:
        out = shapes.get(node)
        if not isinstance(out, tuple) or len(out) != 2 or not _is_flatten_like(node, gm):
            continue
        inputs = node.all_input_nodes
        src = shapes.get(inputs[0]) if inputs else None
        if isinstance(src, tuple) and len(src) == ndim + 2 and out == (src[0], math.prod(src[1:])):
            points.add(node)
    return points


def _pool_module(kind: str, kernel: tuple[int, ...]) -> nn.Module:
    ndim = len(kernel)
    classes: dict[tuple[str, int], Any] = {
        ("avg", 1): nn.AvgPool1d, ("avg", 2): nn.AvgPool2d, ("avg", 3): nn.AvgPool3d,
        ("max", 1): nn.MaxPool1d, ("max", 2): nn.MaxPool2d, ("max", 3): nn.MaxPool3d,
    }
    pool: nn.Module = classes[(kind, ndim)](kernel, stride=1)
    return pool


def _batchnorm_nd(bn: nn.BatchNorm1d, ndim: int) -> nn.Module:
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[ndim]
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats, device="meta")
    # The parameters and buffers themselves move over: the source is our own copy (or, with
    # inplace=True, the user asked for the sharing).
    for name, param in bn.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buffer in bn.named_buffers(recurse=False):
        new.register_buffer(name, buffer)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(bn, name, None) is None:
            new.register_buffer(name, None)
    return new.train(bn.training)


def _channel_layer_norm(ln: nn.LayerNorm) -> nn.Module:
    new = ChannelLayerNorm(ln.normalized_shape, eps=ln.eps,
                           elementwise_affine=ln.elementwise_affine, device="meta")
    if ln.elementwise_affine:
        new.weight = ln.weight
        new.register_parameter("bias", ln.bias)
    return new.train(ln.training)


# ----------------------------------------------------------------------------------------------
# The pass


_TODO_HEAD = (
    "Only Linear, element-wise ops, Dropout, BatchNorm1d, LayerNorm, softmax, flatten/view and "
    "concatenation over features can follow the flatten. Apply this op to the score map "
    "yourself, after the converted model, or pass the module in leaf_modules if it lies in the "
    "feature extractor"
)


def _collapse(p: _Pass, node: fx.Node, src: fx.Node) -> _Layout:
    """Rewrite a node that turns the varying feature map into the fixed head input."""
    gm, ndim = p.gm, p.ndim
    src_shape = p.shape(src)
    channels, spatial = src_shape[1], tuple(src_shape[2:])
    adaptive = _fx.adaptive_output_size(node, gm)
    reduction = _fx.reduction_of(node)
    out_shape = p.shape(node)
    src_desc = p.descs.get(src)
    if isinstance(src_desc, tuple) and _fx.permuted_dims(src_desc) and len(src_shape) == ndim + 2 and (
            _is_flatten_like(node, gm) or (adaptive is not None and any(o != 1 for o in adaptive[2]))):
        raise _permuted_map_error(p, node, _permuting_node(p, src), src_shape, _fx.dim_labels(src_desc, ndim))
    if adaptive is not None and len(src_shape) == ndim + 2:
        _, kind, size = adaptive
        kernel = []
        for s, o in zip(spatial, size):
            if o is None or o == s:
                kernel.append(1)
            elif o == 1:
                kernel.append(s)
            else:
                raise p.fail(
                    node, f"it pools the {format_shape(src_shape[1:])} feature map to "
                    f"{format_shape(out_shape[1:])}, neither the identity nor a global pool, so it "
                    "has no convolutional equivalent",
                    "Convert at the training resolution where it is the identity (e.g. "
                    "input_shape=(3, 224, 224) for torchvision's vgg and alexnet) or global",
                )
        return _replace_by_pool(p, node, src, kind, tuple(kernel), keep=True,
                                layout_spatial=tuple(out_shape[2:]))
    if reduction is not None and len(src_shape) == ndim + 2:
        kind, dims, keepdim = reduction
        rank = len(src_shape)
        if {d % rank for d in dims} == set(range(2, rank)):
            return _replace_by_pool(p, node, src, kind, spatial, keep=keepdim,
                                    layout_spatial=(1,) * ndim)
    if _is_flatten_like(node, gm) and len(out_shape) == 2 and len(src_shape) == ndim + 2:
        p.remove(node, src)
        if all(s == 1 for s in spatial):
            return _Layout("channels", channels, spatial)
        return _Layout("window", channels, spatial)
    raise p.fail(
        node, f"it turns the feature map {format_shape(src_shape[1:])} into "
        f"{format_shape(out_shape[1:]) if out_shape else 'a value'} of a size fixed by the training "
        "input, which fcconv cannot slide",
        "Only a flatten (torch.flatten, view, reshape, nn.Flatten), an adaptive pooling that is "
        "the identity or global, or a mean/amax over all spatial dims can feed the head",
    )


def _canonical_labels(ndim: int) -> tuple[str, ...]:
    return ("N", "C", *{1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}[ndim])


def _permuting_node(p: _Pass, src: fx.Node) -> fx.Node:
    """The first node of the chain ending at ``src`` whose output has permuted spatial dims."""
    node = src
    while True:
        before = [i for i in _fx.data_inputs(node)
                  if isinstance(p.descs.get(i), tuple) and _fx.permuted_dims(p.descs[i])]
        if not before:
            return node
        node = before[0]


def _permuted_map_error(p: _Pass, node: fx.Node, permuted_by: fx.Node, shape: tuple[int, ...],
                        labels: tuple[str, ...] | None) -> NotEquivalentError:
    """A flatten (or fixed pooling) of a map whose dims are not in (N, C, *spatial) order."""
    canonical = _canonical_labels(p.ndim)
    order = f"({', '.join(labels)})" if labels else "a permuted order"
    linear = next((f"model.{n.target}" for n in _downstream(node)
                   if n.op == "call_module" and isinstance(p.module(n), nn.Linear)), "linear")
    todo = (f"Flatten the {''.join(canonical)} map instead (x.flatten(1) before any permute), or "
            f"permute the Linear's weight columns to {''.join(canonical)} order before converting "
            "(both, to keep the model's function)")
    if labels and labels[0] == "N":
        to_canonical = tuple(labels.index(c) for c in canonical)
        view = ", ".join(map(str, shape[1:]))
        todo += (f": {linear}.weight.data = {linear}.weight.data.view(-1, {view})"
                 f".permute{to_canonical}.reshape({linear}.out_features, -1)")
    what = "flattens" if _is_flatten_like(node, p.gm) else "pools"
    return p.fail(
        node, f"it {what} a {format_shape(shape[1:])} map whose dims {_fx.describe(permuted_by, p.gm)} "
        f"put in the order {order} instead of ({', '.join(canonical)}); a flatten of a permuted "
        "(e.g. NHWC, channels-last) map is not supported: fcconv turns the Linear after the flatten "
        f"into a conv over the {''.join(canonical)} map, which expects the features in "
        f"{''.join(canonical)} order", todo)


def _downstream(node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``, directly or not, breadth first."""
    seen: dict[fx.Node, None] = {}
    frontier = list(node.users)
    while frontier:
        n = frontier.pop(0)
        if n not in seen:
            seen[n] = None
            frontier.extend(n.users)
    return list(seen)


def _replace_by_pool(p: _Pass, node: fx.Node, src: fx.Node, kind: str, kernel: tuple[int, ...], *,
                     keep: bool, layout_spatial: tuple[int, ...]) -> _Layout:
    channels = p.shape(src)[1]
    if all(k == 1 for k in kernel):
        p.remove(node, src)
    elif node.op == "call_module":
        p.set_module(str(node.target), _pool_module(kind, kernel), ("pool", kernel))
    else:
        target = p.new_module("head_pool", _pool_module(kind, kernel))
        with p.gm.graph.inserting_after(node):
            new = p.gm.graph.call_module(target, (src,))
        p.remove(node, new)
    if keep:
        return _Layout("map", channels, layout_spatial, tuple(range(p.ndim + 2)))
    return _Layout("channels", channels, (1,) * p.ndim)


def _head_inputs(p: _Pass, node: fx.Node) -> list[fx.Node]:
    """The head tensors a head node reads; raises on other tensors that would not broadcast."""
    inputs = []
    for i in _fx.data_inputs(node):
        if i in p.layouts:
            inputs.append(i)
            continue
        s = p.shapes.get(i)
        if not isinstance(s, tuple) or math.prod(s) == 1:
            continue
        if i.op != "get_attr":
            raise p.fail(node, f"it combines the head with '{i.name}' of shape {format_shape(s)} from "
                         "outside the head", _TODO_HEAD)
        if not (node.op == "call_function" and node.target is F.layer_norm):
            raise p.fail(node, f"it combines the features with the tensor '{i.target}' of shape "
                         f"{format_shape(s)}, which would not broadcast over a map", _TODO_HEAD)
    return inputs


def _set_dim(node: fx.Node, position: int, name: str, value: int) -> None:
    if name in node.kwargs or position >= len(node.args):
        node.update_kwarg(name, value)
    else:
        node.update_arg(position, value)


def _convert_head_node(p: _Pass, node: fx.Node) -> _Layout | None:
    """Rewrite one node downstream of the head entry; returns its layout."""
    gm = p.gm
    inputs = _head_inputs(p, node)
    layouts = {p.layouts[i] for i in inputs}
    if len(layouts) != 1:
        raise p.fail(node, "it combines head tensors of different layouts "
                     f"({', '.join(sorted(repr(lay) for lay in layouts))})", _TODO_HEAD)
    layout = layouts.pop()
    src = inputs[0]
    out_shape = p.shapes.get(node)
    kind = layout.kind

    def per_position_dim(dim: Any) -> bool:
        """Does ``dim`` (of the training-size tensor) name the channels/features dim?"""
        if kind == "channels":
            return dim in (1, -1, None)
        if kind == "map":
            rank = p.ndim + 2
            return isinstance(dim, int) and dim % rank == layout.channel_position
        return False

    if node.op == "call_module":
        module = p.module(node)
        target = str(node.target)
        if isinstance(module, nn.Linear):
            if kind == "window":
                conv: nn.Module = linear_to_conv(module, (layout.channels, *layout.spatial),
                                                 share_weights=True)
                if p.head != "conv":
                    conv = _as_unfold_conv(conv, p.head)  # type: ignore[arg-type]
                p.set_module(target, conv, ("window", layout))
            elif kind == "channels":
                pointwise: nn.Module = linear_to_pointwise(module, p.ndim, share_weights=True)
                if p.head != "conv":
                    pointwise = _as_unfold_conv(pointwise, p.head)  # type: ignore[arg-type]
                p.set_module(target, pointwise, ("channels", layout))
            elif kind == "map" and layout.point and layout.channel_position == p.ndim + 1:
                return _Layout("map", module.out_features, layout.spatial, layout.order)
            else:
                raise p.fail(node, f"it acts on the last dim of a {format_shape(p.shape(src)[1:])} map",
                             "Flatten the map before the Linear, or pool it globally")
            return _Layout("channels", module.out_features, (1,) * p.ndim)
        if isinstance(module, _ELEMENTWISE_MODULES):
            return layout
        if isinstance(module, nn.Flatten):
            return _reshape_node(p, node, src, layout)
        if isinstance(module, _DIM_MODULES) and kind in ("channels", "map"):
            if not per_position_dim(module.dim):
                raise p.fail(node, f"dim={module.dim} is not the feature dim", _TODO_HEAD)
            if kind == "channels":
                new = copy.copy(module)
                new.dim = 1
                p.set_module(target, new, ("dim", 1))
            return layout
        if isinstance(module, nn.BatchNorm1d) and kind == "channels":
            p.set_module(target, _batchnorm_nd(module, p.ndim), ("bn", layout.channels))
            return layout
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and kind == "map" and (
                layout.channel_position == 1):
            return layout
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and (
                module.normalized_shape[0] == layout.channels):
            if kind == "channels":
                p.set_module(target, _channel_layer_norm(module), ("ln", layout.channels))
                return layout
            if kind == "map" and layout.channel_position == p.ndim + 1:
                return layout
        if isinstance(module, nn.modules.conv._ConvNd) and kind == "map" and layout.point and (
                layout.channel_position == 1 and all(k == 1 for k in module.kernel_size)):
            return _Layout("map", module.out_channels, layout.spatial, layout.order)
        if isinstance(module, nn.BatchNorm1d) and kind == "window":
            raise p.fail(node, f"it normalises each of the {layout.channels}x"
                         f"{'x'.join(map(str, layout.spatial))} flattened features separately",
                         "Fold it into the following Linear first (eval mode), then convert")
        raise p.fail(node, f"fcconv does not know how {type(module).__name__} acts on the "
                     f"{kind} features of the head", _TODO_HEAD)

    fn_target: Any = node.target
    target = fn_target
    is_fn, is_method = node.op == "call_function", node.op == "call_method"
    if (is_fn and target in _ELEMENTWISE_FUNCTIONS) or (is_method and target in _ELEMENTWISE_METHODS):
        return layout
    if _is_flatten_like(node, gm):
        return _reshape_node(p, node, src, layout)
    if (is_fn and target in _DIM_FUNCTIONS) or (is_method and target in _DIM_METHODS):
        position, name = _DIM_FUNCTIONS[target] if is_fn else (_DIM_METHODS[str(target)] + 1, "dim")
        default = 1 if target is F.normalize else None
        dim = _fx.arg(node, position, name, default)
        if kind not in ("channels", "map") or not per_position_dim(dim):
            raise p.fail(node, f"dim={dim} is not the feature dim", _TODO_HEAD)
        if kind == "channels":
            _set_dim(node, position, name, 1)
        return layout
    if is_fn and target in (torch.cat, torch.concat, torch.concatenate):
        dim = _fx.arg(node, 1, "dim", 0)
        if kind not in ("channels", "map") or dim is None or not per_position_dim(dim):
            raise p.fail(node, f"it concatenates along dim {dim}, not the features", _TODO_HEAD)
        if kind == "channels":
            _set_dim(node, 1, "dim", 1)
        assert isinstance(out_shape, tuple)
        channels = out_shape[1] if kind == "channels" else out_shape[layout.channel_position]
        return _Layout(kind, channels, layout.spatial, layout.order)
    if (is_fn and target is F.layer_norm) or (is_method and target == "layer_norm"):
        shape = tuple(_fx.arg(node, 1, "normalized_shape", ()))
        if shape == (layout.channels,):
            if kind == "channels":
                node.target = channel_layer_norm
                return layout
            if kind == "map" and layout.channel_position == p.ndim + 1:
                return layout
    if kind == "map":
        perm = _fx.permutation_of(node, p.ndim + 2)
        if perm is not None:
            return _Layout("map", layout.channels, layout.spatial, tuple(layout.order[d] for d in perm))
    raise p.fail(node, f"fcconv does not know how it acts on the {kind} features of the head",
                 _TODO_HEAD)


def _reshape_node(p: _Pass, node: fx.Node, src: fx.Node, layout: _Layout) -> _Layout:
    """A flatten/view/reshape in the head: dropped, the map keeps its shape."""
    out = p.shapes.get(node)
    src_shape = p.shape(src)
    if not isinstance(out, tuple):
        raise p.fail(node, "it does not return a tensor", _TODO_HEAD)
    if layout.kind == "map" and len(out) == 2 and (
            layout.point or layout.order == tuple(range(p.ndim + 2))):
        p.remove(node, src)
        kind = "channels" if layout.point else "window"
        return _Layout(kind, layout.channels, layout.spatial)
    if layout.kind in ("channels", "window") and out == src_shape:
        p.remove(node, src)
        return layout
    if layout.kind == "map" and len(out) == 2:
        canonical = _canonical_labels(p.ndim)
        labels = tuple(canonical[d] for d in layout.order)
        permuted_by = src
        while True:  # back to the first permuting node of the head
            before = [i for i in _fx.data_inputs(permuted_by)
                      if i in p.layouts and p.layouts[i].order not in ((), tuple(range(p.ndim + 2)))]
            if not before:
                break
            permuted_by = before[0]
        raise _permuted_map_error(p, node, permuted_by, src_shape, labels)
    if layout.kind == "channels" and len(out) == p.ndim + 2 and out[:2] == src_shape and all(
            s == 1 for s in out[2:]):
        p.remove(node, src)
        return _Layout("map", layout.channels, (1,) * p.ndim, tuple(range(p.ndim + 2)))
    raise p.fail(node, f"it reshapes the head's {format_shape(src_shape[1:])} into "
                 f"{format_shape(out[1:])}", _TODO_HEAD)


def _find_head(gm: fx.GraphModule, shapes: dict[fx.Node, _fx.NodeValue],
               desc: _fx.Descriptors) -> list[tuple[fx.Node, fx.Node]]:
    """The ``(node, varying input)`` pairs where the feature map becomes the fixed head input.

    A node collapses the map when its input changes with the input size and its output does not;
    it enters the head when nothing downstream changes with the input size either (a
    squeeze-and-excitation pooling does not: its output multiplies the map again).
    """
    varying = {n for n, d in desc.desc.items() if _fx.depends_on_input_size(d)}
    downstream_varying: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        if any(u in varying or u in downstream_varying for u in node.users if u.op != "output"):
            downstream_varying.add(node)
    entries = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or node in varying:
            continue
        if not isinstance(shapes.get(node), tuple) or node in downstream_varying:
            continue
        srcs = [i for i in _fx.data_inputs(node) if i in varying and isinstance(shapes.get(i), tuple)]
        if srcs:
            entries.append((node, srcs[0]))
    return entries


def _convert(p: _Pass, desc: _fx.Descriptors) -> None:
    gm = p.gm
    entries = _find_head(gm, p.shapes, desc)
    entry_nodes = {e for e, _ in entries}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    head: set[fx.Node] = set(entry_nodes)
    for node in gm.graph.nodes:
        if node not in head and any(i in head for i in node.all_input_nodes) and node.op != "output":
            head.add(node)
    sources = dict(entries)
    for node in sorted(head, key=order.__getitem__):
        if node in sources:
            p.layouts[node] = _collapse(p, node, sources[node])
            continue
        if not isinstance(p.shapes.get(node), tuple):
            # sizes and other non-tensor values computed from head tensors (x.size(0), ...)
            continue
        layout = _convert_head_node(p, node)
        if layout is not None:
            p.layouts[node] = layout
    p.apply_removals()
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def _node_failure(error: _fx.NodeFailure, gm: fx.GraphModule, shape: Sequence[int], when: str,
                  todo: str) -> NotEquivalentError:
    return NotEquivalentError(
        f"{when} {format_shape(shape)} fails at {_fx.describe(error.node, gm)}: "
        f"{type(error.error).__name__}: {error.error}. {todo}"
    )


_TODO_LARGER = (
    "That op only works at the training size (a reshape to fixed sizes, a Linear along a spatial "
    "dim, a pooling to a fixed size), so the model cannot slide over larger inputs; make it "
    "size-independent, or pass its module in leaf_modules if it already is"
)


@dataclass
class _Geometry:
    stride: tuple[int, ...]
    min_size: tuple[int, ...]
    window: tuple[int, ...]
    exact: bool
    outputs: int | None


def _output_grid(gm: fx.GraphModule, channels: int, spatial: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    try:
        shapes = _fx.record_shapes(gm, (channels, *spatial))
    except _fx.NodeFailure as error:
        raise _node_failure(error, gm, (channels, *spatial), "The converted model on input",
                            _TODO_LARGER) from None
    out = _fx.first_tensor_output(gm)
    shape = shapes.get(out) if out is not None else None
    if not isinstance(shape, tuple) or len(shape) != ndim + 2:
        raise NotEquivalentError(
            f"The converted model returns {shape if shape else 'no tensor'} on input "
            f"{format_shape((channels, *spatial))}, not a score map (N, outputs, *grid). The "
            "model must end in a classifier head (flatten or global pooling, then Linear layers) "
            "or be fully convolutional already."
        )
    return tuple(shape[2:])


def _search_geometry(gm: fx.GraphModule, input_shape: tuple[int, ...], g0: tuple[int, ...]
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Stride and min_size found by probing sizes (for graphs the descriptors cannot model)."""
    channels, s0 = input_shape[0], input_shape[1:]
    ndim = len(s0)
    strides, mins = [], []
    for k in range(ndim):
        def grid(size: int, k: int = k) -> int:
            spatial = tuple(size if j == k else s for j, s in enumerate(s0))
            return _output_grid(gm, channels, spatial, ndim)[k]

        def next_step(start: int, value: int, k: int = k) -> int:
            """The smallest size above ``start`` whose grid exceeds ``value``."""
            delta = 1
            while grid(start + delta) <= value:
                delta *= 2
                if delta > 4096:
                    raise NotEquivalentError(
                        f"The converted model's output does not grow with the input along spatial "
                        f"dim {k}: not a sliding-window score map (is a global pooling left?)."
                    )
            lo, hi = start + delta // 2, start + delta
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if grid(mid) > value:
                    hi = mid
                else:
                    lo = mid
            return hi

        s1 = next_step(s0[k], g0[k])
        s2 = next_step(s1, g0[k] + 1)
        if grid(s1) != g0[k] + 1 or grid(s2) != g0[k] + 2:
            raise NotEquivalentError(
                f"The converted model's output grows by more than one cell per input pixel along "
                f"spatial dim {k} (upsampling): it has no integer stride, so no sliding-window "
                "geometry."
            )
        stride = s2 - s1
        strides.append(stride)
        mins.append(s1 - g0[k] * stride)
    return tuple(strides), tuple(mins)


def _geometry(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> _Geometry:
    ndim = len(input_shape) - 1
    channels, s0 = input_shape[0], tuple(input_shape[1:])
    try:
        shapes = _fx.record_shapes(gm, input_shape)
    except _fx.NodeFailure as error:
        raise _node_failure(error, gm, input_shape, "The converted model on its training input",
                            "This is a bug in fcconv; please report it with the model") from None
    out = _fx.first_tensor_output(gm)
    out_shape = shapes.get(out) if out is not None else None
    if not isinstance(out_shape, tuple) or len(out_shape) != ndim + 2:
        returns = format_shape(out_shape) if isinstance(out_shape, tuple) else "no tensor"
        raise NotEquivalentError(
            f"{type(gm).__name__} returns {returns} on input {format_shape(input_shape)} (batch 2), "
            "and fcconv found no classifier head to convert: no flatten or global pooling of the "
            "feature map feeds the output. The model must end in such a head or be fully "
            "convolutional already."
        )
    g0 = tuple(out_shape[2:])
    desc = _fx.spatial_descriptors(gm, shapes, ndim, _flatten_points(gm, shapes, ndim))
    if desc.linear_on_space:
        node = desc.linear_on_space[0]
        src = node.all_input_nodes[0]
        src_shape = shapes.get(src)
        raise NotEquivalentError(
            f"Cannot convolutionalize {_fx.describe(node, gm)}: it acts on the last dim of a "
            f"tensor of shape {format_shape(src_shape) if isinstance(src_shape, tuple) else '?'} "
            "(batch 2) that changes with the input size, a spatial dim, so it cannot slide. "
            "Flatten the feature map (torch.flatten(x, 1)) before the first Linear, or pool it "
            "globally, and convert again."
        )
    entries = _fx.output_geometry(desc.desc.get(out) if out is not None else None, ndim)  # type: ignore[arg-type]
    # Exact only if every cell sees its window alone: no padding, and no pooling of the whole
    # map left inside the network (squeeze-and-excitation blocks see the whole image).
    exact = not desc.pads and not desc.unknown and not desc.collapses
    if entries is not None:
        stride = tuple(e.T for e in entries)
        min_size = tuple(e.T - e.C for e in entries)
        predicted = tuple(e.size(s) for e, s in zip(entries, s0))
        # Check the closed form at the two sizes around a step of the grid.
        below = tuple(m + (g + 1) * t - 1 for m, g, t in zip(min_size, g0, stride))
        above = tuple(b + 1 for b in below)
        ok = (predicted == g0
              and _output_grid(gm, channels, below, ndim) == tuple(g + 1 for g in g0)
              and _output_grid(gm, channels, above, ndim) == tuple(g + 2 for g in g0))
        if not ok:
            entries = None
    if entries is None:
        exact = False
        stride, min_size = _search_geometry(gm, input_shape, g0)
    window = tuple(s - (g - 1) * t for s, g, t in zip(s0, g0, stride))
    return _Geometry(stride, min_size, window, exact, out_shape[1])


# Modules whose output, in training mode, depends on the rest of the batch or on chance.
_TRAINING_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.RReLU,
)
# Functions that fx traces with ``training=self.training`` frozen to a constant.
_TRAINING_FUNCTIONS: set[Any] = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.batch_norm, F.rrelu,
}


def _training_error(model: nn.Module, found: list[str]) -> FcconvError:
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    mode = "is in training mode and contains" if model.training else "contains, in training mode,"
    return FcconvError(
        f"{type(model).__name__} {mode} {shown}, whose output depends on "
        "the batch or on chance: converted as they are, each cell of the score map would be "
        "normalised over the whole map or randomly dropped, not scored like its window. Call "
        "model.eval() first (fcconv never changes the model's mode itself)."
    )


def _check_not_training(model: nn.Module) -> None:
    """Refuse a model whose BatchNorm, Dropout or RReLU modules are in training mode."""
    found = [f"{type(m).__name__} '{name}'" if name else type(m).__name__
             for name, m in model.named_modules()
             if isinstance(m, _TRAINING_MODULES) and m.training]
    if found:
        raise _training_error(model, found)


def _check_no_training_calls(model: nn.Module, gm: fx.GraphModule) -> None:
    """Refuse traced calls like ``F.dropout(x, training=self.training)`` of a model in training mode."""
    if not model.training:
        return
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _TRAINING_FUNCTIONS:
            continue
        pair = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        if pair is not None and pair.kwargs.get("training", node.target is not F.batch_norm) is True:
            found.append(f"node '{node.name}' ({node.target.__name__}(..., training=True))")
    if found:
        raise _training_error(model, found)


def convolutionalize(model: nn.Module, input_shape: Sequence[int], *, inplace: bool = False,
                     leaf_modules: object = (), head: str = "auto") -> FullyConvolutional:
    """Turn a classifier into a fully convolutional network that returns dense score maps.

    The model is traced with torch.fx and run once on ``meta`` tensors at ``input_shape``; the
    head that follows the last feature map is rewritten (see the module docstring), nothing else.
    At ``input_shape`` the result returns the model's scores as a ``(N, outputs, 1, 1)`` map; on a
    larger input, one score vector per window: cell ``i`` scores the crop ``fcn.window_of(i)``.

    Before: ``features -> AdaptiveAvgPool2d(1) -> flatten -> Linear(512, 1000)``.
    After: ``features -> AvgPool2d(7, stride=1) -> Conv2d(512, 1000, 1)``.

    Args:
        model: the classifier, in eval mode: a model whose BatchNorm, Dropout (or RReLU)
            modules are in training mode is refused, as their output depends on the batch or on
            chance (call ``model.eval()`` first; fcconv never changes the model's mode). A
            model in training mode without them converts, and the FCN keeps every module's mode.
            Torchvision classifiers in eval mode work as they are.
        input_shape: the per-sample training shape ``(C, *spatial)``, e.g. ``(3, 224, 224)``;
            1, 2 or 3 spatial dims.
        inplace: if False (default) the model is deep-copied first and never changes. If True it
            is not copied: the returned FCN shares its parameters and its Linear, BatchNorm1d,
            LayerNorm and pooling submodules are replaced by their convolutional versions, so its
            own forward no longer works on flat features.
        leaf_modules: module types, module instances or qualified names that tracing keeps
            whole (for submodules with data-dependent control flow); they must work on larger
            inputs as they are.
        head: how the convs that replace the Linear layers compute: ``"conv"`` standard
            ``nn.ConvNd`` (portable, exportable), ``"matmul"`` unfold + one matmul
            (:class:`UnfoldConv2d`), ``"auto"`` (default) the matmul on CPU, where oneDNN's
            convs are slow on the small maps of a head (vgg's 7x7 over 512 channels on 10x10),
            and the conv on other devices.

    Returns:
        A :class:`FullyConvolutional` with the converted ``graph_module`` and its geometry.

    Raises:
        FcconvError: on a malformed ``input_shape`` or ``head``, or a model in training mode
            that contains BatchNorm, Dropout or RReLU modules (or traced ``F.dropout``,
            ``F.batch_norm`` calls with ``training=True``).
        NotEquivalentError: if tracing fails (the message names the module and suggests
            ``leaf_modules``), or a node cannot be converted or slid (the message names it).

    Example:
        >>> fcn = convolutionalize(torchvision.models.vgg11().eval(), (3, 224, 224))
        >>> fcn(torch.rand(1, 3, 320, 320)).shape, fcn.stride
        (torch.Size([1, 1000, 4, 4]), (32, 32))
    """
    return _convolutionalize(model, input_shape, inplace=inplace, leaf_modules=leaf_modules,
                             head=head, check_training=True)


def _convolutionalize(model: nn.Module, input_shape: Sequence[int], *, inplace: bool,
                      leaf_modules: object, head: str, check_training: bool) -> FullyConvolutional:
    """:func:`convolutionalize`; ``check_training=False`` converts a model in training mode too."""
    if not isinstance(model, nn.Module):
        raise FcconvError(
            f"convolutionalize expects an nn.Module; got {type(model).__name__}. Pass the model."
        )
    shape = check_input_shape(input_shape)
    if head not in _HEADS:
        raise FcconvError(f"head must be one of {', '.join(map(repr, _HEADS))}; got {head!r}.")
    ndim = len(shape) - 1
    if check_training:
        _check_not_training(model)
    # Module instances become their qualified names here, so they survive the deep copy.
    types, names = _fx.leaf_matchers(model, leaf_modules)
    leaves = [*types, *sorted(names)]
    source = model if inplace else copy.deepcopy(model)
    gm = _fx.trace(source, leaves)
    if check_training:
        _check_no_training_calls(model, gm)
    try:
        shapes = _fx.record_shapes(gm, shape)
    except _fx.NodeFailure as error:
        raise _node_failure(error, gm, shape, f"{type(model).__name__} on its training input",
                            "Pass the per-sample shape the model was trained on as input_shape, "
                            "e.g. (3, 224, 224)") from None
    desc = _fx.spatial_descriptors(gm, shapes, ndim, _flatten_points(gm, shapes, ndim))
    state = _Pass(gm, source, inplace, ndim, head, shapes, dict(desc.desc))
    _convert(state, desc)
    geometry = _geometry(gm, shape)
    return FullyConvolutional(
        gm, input_shape=shape, stride=geometry.stride, window=geometry.window,
        min_size=geometry.min_size, exact_sliding_window=geometry.exact, head=head,
        outputs=geometry.outputs,
    )


# ----------------------------------------------------------------------------------------------
# The naive reference


def sliding_window(model: Callable[[Tensor], Tensor], image: Tensor, *, window: Sequence[int] | int,
                   stride: Sequence[int] | int, batch_size: int = 32, progress: bool = True) -> Tensor:
    """Run ``model`` on every crop of ``image``, in batches: the reference for a dense score map.

    Crop ``i`` (one index per spatial dim) starts at ``i * stride`` and has size ``window``; the
    grid has ``(size - window) // stride + 1`` cells per dim. Runs without autograd.

    Args:
        model: maps a batch of crops ``(B, C, *window)`` to scores ``(B, outputs)`` (trailing
            dims of size 1 are accepted).
        image: ``(N, C, *spatial)`` (or one unbatched ``(C, *spatial)``).
        window: crop size, an int or one per spatial dim.
        stride: step between crops, an int or one per spatial dim.
        batch_size: crops per forward pass.
        progress: show a tqdm progress bar.

    Returns:
        ``(N, outputs, *grid)``, laid out like :class:`FullyConvolutional`'s dense map.

    Raises:
        FcconvError: on malformed arguments, a window larger than the image, or a model that
            does not return one vector per crop.

    Example:
        >>> ref = sliding_window(model, image, window=fcn.window, stride=fcn.stride)
        >>> torch.testing.assert_close(fcn(image), ref)   # exact for unpadded models
    """
    if not isinstance(image, Tensor) or image.dim() < 2:
        raise FcconvError(
            f"image must be a tensor (N, C, *spatial); got "
            f"{format_shape(image.shape) if isinstance(image, Tensor) else type(image).__name__}."
        )
    if image.dim() == 2:
        raise FcconvError(
            f"image must be (N, C, *spatial) or (C, *spatial) with 1 to 3 spatial dims; got "
            f"{format_shape(image.shape)}."
        )
    unbatched = False
    if image.dim() in (3, 4) and not isinstance(window, int) and isinstance(window, Sequence) and (
            len(window) == image.dim() - 1):
        image, unbatched = image.unsqueeze(0), True
    ndim = image.dim() - 2
    win = _check_spatial(window, ndim, "window")
    step = _check_spatial(stride, ndim, "stride")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise FcconvError(f"batch_size must be a positive integer; got {batch_size!r}.")
    spatial = tuple(image.shape[2:])
    if any(w < 1 for w in win) or any(s < 1 for s in step):
        raise FcconvError(f"window and stride must be positive; got {win} and {step}.")
    if any(w > s for w, s in zip(win, spatial)):
        raise FcconvError(
            f"window {format_shape(win)} is larger than the image's spatial size "
            f"{format_shape(spatial)}. Pass a larger image or a smaller window."
        )
    grid = tuple((s - w) // t + 1 for s, w, t in zip(spatial, win, step))
    cells = list(itertools.product(*(range(g) for g in grid)))
    crops = [(n, cell) for n in range(image.shape[0]) for cell in cells]
    outputs: list[Tensor] = []
    with torch.no_grad(), tqdm(total=len(crops), unit="crop", desc="sliding window",
                               disable=not progress) as bar:
        for start in range(0, len(crops), batch_size):
            batch = []
            for n, cell in crops[start:start + batch_size]:
                index = (n, slice(None)) + tuple(
                    slice(c * t, c * t + w) for c, t, w in zip(cell, step, win))
                batch.append(image[index])
            scores = model(torch.stack(batch))
            if not isinstance(scores, Tensor) or scores.dim() < 2 or any(
                    s != 1 for s in scores.shape[2:]):
                got = format_shape(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                raise FcconvError(
                    "sliding_window needs a model that returns one score vector (B, outputs) per "
                    f"crop; got {got} for {len(batch)} crops of {format_shape(win)}."
                )
            outputs.append(scores.reshape(scores.shape[0], scores.shape[1]))
            bar.update(len(batch))
    flat = torch.cat(outputs)  # (N * cells, outputs)
    result = flat.reshape(image.shape[0], *grid, flat.shape[1]).movedim(-1, 1)
    return result[0] if unbatched else result
