"""The modules the whole-model pass creates: head convs computed as unfold + matmul, a LayerNorm over
channels, and the pooling and BatchNorm that replace their flat counterparts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HEAD_IMPLS",
    "ChannelLayerNorm",
    "UnfoldConv1d",
    "UnfoldConv2d",
    "UnfoldConv3d",
    "as_unfold_conv",
    "batchnorm_nd",
    "channel_layer_norm",
    "channel_layer_norm_module",
    "pool_module",
]

HEAD_IMPLS = ("auto", "conv", "matmul")
"""How the convs that replace a head's Linear layers compute (``convolutionalize(head_impl=...)``)."""
# With head_impl="auto" on CPU the unfold + matmul path is used while its column buffer stays below this.
_AUTO_MATMUL_MAX_BYTES = 256 * 2**20



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


def as_unfold_conv(conv: nn.modules.conv._ConvNd, method: str) -> nn.Module:
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


def pool_module(kind: str, kernel: tuple[int, ...]) -> nn.Module:
    """A stride-1 ``'avg'`` or ``'max'`` pooling with kernel ``kernel``."""
    classes: dict[tuple[str, int], Any] = {
        ("avg", 1): nn.AvgPool1d, ("avg", 2): nn.AvgPool2d, ("avg", 3): nn.AvgPool3d,
        ("max", 1): nn.MaxPool1d, ("max", 2): nn.MaxPool2d, ("max", 3): nn.MaxPool3d,
    }
    pool: nn.Module = classes[(kind, len(kernel))](kernel, stride=1)
    return pool


def batchnorm_nd(bn: nn.BatchNorm1d, ndim: int) -> nn.Module:
    """``bn`` as a BatchNorm over ``ndim`` spatial dims, parameters and buffers moved over."""
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[ndim]
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats, device="meta")
    # The parameters and buffers themselves move over: the source is our own copy (or, with
    # inplace=True, the user asked for the sharing).
    for name, param in bn.named_parameters(recurse=False, remove_duplicate=False):
        setattr(new, name, param)
    for name, buffer in bn.named_buffers(recurse=False, remove_duplicate=False):
        new.register_buffer(name, buffer)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(bn, name, None) is None:
            new.register_buffer(name, None)
    return new.train(bn.training)


def channel_layer_norm_module(ln: nn.LayerNorm) -> nn.Module:
    """``ln`` (over the features) as a :class:`ChannelLayerNorm`, parameters shared."""
    new = ChannelLayerNorm(ln.normalized_shape, eps=ln.eps,
                           elementwise_affine=ln.elementwise_affine, device="meta")
    if ln.elementwise_affine:
        new.weight = ln.weight
        new.register_parameter("bias", ln.bias)
    return new.train(ln.training)
