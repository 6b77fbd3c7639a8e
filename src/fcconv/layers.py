"""One layer into another: Linear <-> convolution, exactly.

Two equivalences from the textbook, and their general form:

* **the kernel covers the input** (:func:`linear_to_conv`, :func:`conv_to_linear`): a ``Linear`` on a
  flattened ``(C, *spatial)`` input is a conv whose kernel has the size of ``spatial``;
* **pointwise** (:func:`linear_to_pointwise`, :func:`pointwise_to_linear`): a ``Linear`` applied over
  the channels at every position is a conv with kernel size 1;
* any other conv, on a fixed input shape, is a ``Linear`` whose weight is the conv's structured
  (sparse, Toeplitz-like) matrix: :func:`conv_matrix`.

Every function returns new modules and never changes its argument. The results keep the source's
dtype, device, ``requires_grad`` and train/eval mode. With ``share_weights=True`` the new parameters
are *aliases*: views of the source's parameter storage, so writing to one (an in-place update, an
optimizer step) changes the other. They are still separate ``nn.Parameter`` objects: autograd puts a
gradient on the one that was used, not on both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.lazy import LazyModuleMixin

from fcconv._shapes import check_input_shape, format_shape, per_dim
from fcconv._sparse import coo_to_csr, ravel
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.matrix import (
    ConvGeometry,
    check_layout,
    conv_bias_vector,
    conv_geometry,
    conv_weight_matrix,
)

__all__ = [
    "conv_matrix",
    "conv_module_geometry",
    "conv_output_shape",
    "conv_to_linear",
    "linear_to_conv",
    "linear_to_pointwise",
    "pointwise_to_linear",
]

_CONV_CLASSES: dict[int, type[nn.Conv1d | nn.Conv2d | nn.Conv3d]] = {
    1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d,
}
# A dense matrix above this size is refused: it would exhaust memory before it is useful.
_MAX_DENSE_BYTES = 16 * 2**30


def _type_error(module: object, expected: str, fn: str) -> FcconvError:
    return FcconvError(
        f"{fn} expects {expected}; got {type(module).__name__}. "
        "Pass the layer itself, e.g. model.classifier[0], not the model or a tensor."
    )


def _check_initialised(module: nn.Module, fn: str) -> None:
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise FcconvError(
            f"{fn} needs the weights of {type(module).__name__}, which it does not have yet: a "
            "Lazy module infers its shapes on its first call. Run one forward pass on a sample "
            "input first, then convert it."
        )


def _check_linear(module: object, fn: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise _type_error(module, "an nn.Linear", fn)
    _check_initialised(module, fn)
    return module


def _check_conv(module: object, fn: str, *, transpose_ok: bool = False) -> _ConvNd:
    if isinstance(module, _ConvTransposeNd) and not transpose_ok:
        raise NotEquivalentError(
            f"{fn} does not take transposed convolutions; got {type(module).__name__}. "
            "Use fcconv.conv_matrix(module, input_shape) or fcconv.conv_to_linear for its exact "
            "matrix."
        )
    if not isinstance(module, _ConvNd):
        expected = "an nn.Conv1d, nn.Conv2d or nn.Conv3d"
        raise _type_error(module, expected + (" (or ConvTranspose)" if transpose_ok else ""), fn)
    _check_initialised(module, fn)
    return module


def _parameter(data: Tensor, like: Tensor) -> nn.Parameter:
    return nn.Parameter(data, requires_grad=like.requires_grad)


def _weight_data(source: Tensor, shape: Sequence[int], share: bool) -> Tensor:
    """``source`` reshaped to ``shape``: a view of its storage when sharing, else a new copy."""
    data = source.detach()
    if not share:
        return data.reshape(*shape).clone()
    try:
        return data.view(*shape)
    except RuntimeError:
        raise FcconvError(
            f"share_weights=True needs a weight that can be viewed as {format_shape(shape)} without "
            f"a copy; this one of shape {format_shape(data.shape)} has strides {data.stride()}. "
            "Pass share_weights=False to copy it, or make the weight contiguous first."
        ) from None


def _new_conv(ndim: int, c_in: int, c_out: int, kernel: tuple[int, ...], weight: nn.Parameter,
              bias: nn.Parameter | None, like: nn.Module) -> _ConvNd:
    # Built on the meta device so that no memory is allocated or initialised for weights that are
    # replaced at once: the conversion takes constant time with share_weights=True.
    conv = _CONV_CLASSES[ndim](c_in, c_out, kernel, bias=bias is not None, device="meta")  # type: ignore[arg-type]
    conv.weight = weight
    conv.register_parameter("bias", bias)
    return conv.train(like.training)


def _new_linear(in_features: int, out_features: int, weight: nn.Parameter,
                bias: nn.Parameter | None, like: nn.Module) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = weight
    linear.register_parameter("bias", bias)
    return linear.train(like.training)


def _copy_bias(bias: Tensor | None, share: bool) -> nn.Parameter | None:
    if bias is None:
        return None
    return _parameter(bias.detach() if share else bias.detach().clone(), bias)


def linear_to_conv(
    linear: nn.Linear, input_shape: Sequence[int], *, share_weights: bool = False
) -> _ConvNd:
    """Scenario 1: the conv whose kernel covers the whole input, equal to ``linear``.

    For ``x`` of shape ``(N, *input_shape)``: ``conv(x).flatten(1) == linear(x.flatten(1))``, the
    conv's output having spatial size 1 everywhere.

    Args:
        linear: the ``nn.Linear`` with ``in_features == prod(input_shape)``.
        input_shape: per-sample shape ``(C, *spatial)`` of the tensor that is flattened before the
            Linear; 1, 2 or 3 spatial dims pick Conv1d, Conv2d or Conv3d.
        share_weights: if True, the conv's parameters are views of the Linear's storage (aliases,
            no copy, constant time); by default they are copies.

    Returns:
        ``ConvNd(C, out_features, kernel_size=spatial)`` with the Linear's weights.

    Raises:
        FcconvError: if ``linear`` is not an ``nn.Linear`` or ``input_shape`` is malformed.
        NotEquivalentError: if ``in_features != prod(input_shape)``.

    Example:
        >>> conv = linear_to_conv(nn.Linear(4, 2), (1, 2, 2))
        >>> conv
        Conv2d(1, 2, kernel_size=(2, 2), stride=(1, 1))
    """
    linear = _check_linear(linear, "linear_to_conv")
    shape = check_input_shape(input_shape)
    expected = math.prod(shape)
    if linear.in_features != expected:
        raise NotEquivalentError(
            f"Cannot convert Linear(in_features={linear.in_features}) for input_shape "
            f"{format_shape(shape)}: expected in_features = {'*'.join(map(str, shape))} = "
            f"{expected}. Pass the per-sample shape of the tensor that is flattened before "
            "this Linear."
        )
    c_in, spatial = shape[0], shape[1:]
    out = linear.out_features
    weight = _parameter(_weight_data(linear.weight, (out, *shape), share_weights), linear.weight)
    return _new_conv(len(spatial), c_in, out, spatial, weight,
                     _copy_bias(linear.bias, share_weights), linear)


def linear_to_pointwise(
    linear: nn.Linear, *, ndim: int = 2, share_weights: bool = False
) -> _ConvNd:
    """Scenario 2: the kernel-size-1 conv that applies ``linear`` over channels at every position.

    ``conv(x) == linear(x.movedim(1, -1)).movedim(-1, 1)`` for ``x`` of shape ``(N, C, *spatial)``.

    Args:
        linear: the ``nn.Linear``; its ``in_features`` become the conv's input channels.
        ndim: number of spatial dims, 1, 2 or 3 (Conv1d, Conv2d, Conv3d).
        share_weights: if True, the conv's parameters are views of the Linear's storage (aliases).

    Returns:
        ``ConvNd(in_features, out_features, kernel_size=1)``.

    Raises:
        FcconvError: if ``linear`` is not an ``nn.Linear`` or ``ndim`` is not 1, 2 or 3.

    Example:
        >>> linear_to_pointwise(nn.Linear(4, 2))
        Conv2d(4, 2, kernel_size=(1, 1), stride=(1, 1))
    """
    linear = _check_linear(linear, "linear_to_pointwise")
    if ndim not in _CONV_CLASSES or isinstance(ndim, bool):
        raise FcconvError(
            f"ndim must be 1, 2 or 3 (Conv1d, Conv2d, Conv3d); got {ndim!r}."
        )
    out, c_in = linear.out_features, linear.in_features
    weight = _parameter(
        _weight_data(linear.weight, (out, c_in) + (1,) * ndim, share_weights), linear.weight
    )
    return _new_conv(ndim, c_in, out, (1,) * ndim, weight,
                     _copy_bias(linear.bias, share_weights), linear)


def _transpose_geometry(conv: _ConvTransposeNd, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """The output spatial size of a transposed conv: the input size of its adjoint conv."""
    if isinstance(conv.padding, str):
        raise FcconvError(f"Unsupported padding {conv.padding!r} on {type(conv).__name__}.")
    n = len(conv.kernel_size)
    stride, padding, dilation, output_padding = (
        per_dim(getattr(conv, name), n, name, allow_one=True)
        for name in ("stride", "padding", "dilation", "output_padding"))
    return tuple(
        (i - 1) * s - 2 * p + d * (k - 1) + op + 1
        for i, s, p, d, k, op in zip(spatial, stride, padding, dilation, conv.kernel_size, output_padding)
    )


def conv_module_geometry(conv: _ConvNd, in_spatial: Sequence[int]) -> ConvGeometry:
    """:func:`~fcconv.matrix.conv_geometry` with the kernel, stride, padding and dilation of ``conv``.

    For a transposed conv, the geometry of its adjoint conv (the same attributes) on ``in_spatial``.

    Example:
        >>> conv_module_geometry(nn.Conv2d(3, 8, 3, stride=2, padding=1), (32, 32)).out_spatial
        (16, 16)
    """
    return conv_geometry(in_spatial, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation)


def conv_output_shape(conv: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """The per-sample output shape ``(C_out, *out_spatial)`` of a conv on ``input_shape``.

    Args:
        conv: an ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d``.
        input_shape: per-sample input shape ``(C_in, *spatial)``.

    Raises:
        FcconvError: on a wrong module type, rank or channel count, or a kernel larger than the
            padded input.

    Example:
        >>> conv_output_shape(nn.Conv2d(3, 8, 3, stride=2), (3, 9, 9))
        (8, 4, 4)
    """
    conv = _check_conv(conv, "conv_output_shape", transpose_ok=True)
    shape = check_input_shape(input_shape, conv=conv, caller="conv_output_shape")
    if isinstance(conv, _ConvTransposeNd):
        out = _transpose_geometry(conv, shape[1:])
        if any(o <= 0 for o in out):
            raise FcconvError(
                f"{type(conv).__name__} gives an empty output {format_shape(out)} on input_shape "
                f"{format_shape(shape)}. Use a larger input or less padding."
            )
        return (conv.out_channels, *out)
    return (conv.out_channels, *conv_module_geometry(conv, shape[1:]).out_spatial)


def conv_matrix(conv: nn.Module, input_shape: Sequence[int], *, layout: str = "dense") -> Tensor:
    """The exact matrix of a convolution on inputs of shape ``input_shape``.

    ``conv(x).flatten(1) == x.flatten(1) @ M.T + b`` with ``b`` the bias repeated over output
    positions (see :func:`conv_to_linear`). Works for Conv1d/2d/3d with any stride, padding (ints,
    tuples, ``"same"``, ``"valid"``), dilation, groups and ``padding_mode``, and for
    ``ConvTranspose1d/2d/3d`` (whose matrix is the transpose of the matching conv's). Entries are the
    kernel's values, copied, not computed; folded padding modes sum the taps that read one input.

    Args:
        conv: the convolution module.
        input_shape: per-sample input shape ``(C_in, *spatial)``.
        layout: ``"dense"``, ``"csr"`` or ``"coo"`` (torch sparse, memory proportional to the
            nonzeros).

    Returns:
        ``M`` of shape ``(prod(output_shape), prod(input_shape))``, dtype and device of the weight,
        detached from autograd.

    Raises:
        FcconvError: on a wrong module, input shape or layout, or a dense matrix too large to build.

    Example:
        >>> M = conv_matrix(nn.Conv2d(1, 1, 2, bias=False), (1, 3, 3))
        >>> M.shape
        torch.Size([4, 9])
    """
    conv = _check_conv(conv, "conv_matrix", transpose_ok=True)
    check_layout(layout)
    shape = check_input_shape(input_shape, conv=conv, caller="conv_matrix")
    out_shape = conv_output_shape(conv, shape)
    if layout == "dense":
        nbytes = math.prod(out_shape) * math.prod(shape) * conv.weight.element_size()
        if nbytes > _MAX_DENSE_BYTES:
            raise FcconvError(
                f"The dense matrix of {type(conv).__name__} on input_shape {format_shape(shape)} "
                f"would take {nbytes / 2**30:.1f} GiB ({math.prod(out_shape)} x "
                f"{math.prod(shape)}); the limit is {_MAX_DENSE_BYTES // 2**30} GiB. "
                "Use layout='csr', or a smaller input_shape."
            )
    if isinstance(conv, _ConvTransposeNd):
        return _transpose_matrix(conv, shape, out_shape, layout)
    return conv_weight_matrix(
        conv.weight, shape[1:], stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode, layout=layout,
    )


def _transpose_matrix(conv: _ConvTransposeNd, shape: tuple[int, ...], out_shape: tuple[int, ...],
                      layout: str) -> Tensor:
    """A transposed conv's matrix: the adjoint conv's (same weight, output back to input), transposed.

    That conv, on the transposed conv's output, gives at least the input's positions: with
    ``output_padding`` it can give more, rows that no input reads, which are cropped.
    """
    matrix = conv_weight_matrix(
        conv.weight, out_shape[1:], stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, layout="coo" if layout != "dense" else layout,
    )
    adjoint_out = conv_module_geometry(conv, out_shape[1:]).out_spatial
    extra = adjoint_out != shape[1:]
    if layout == "dense":
        if extra:
            view = matrix.view(shape[0], *adjoint_out, -1)
            for d, size in enumerate(shape[1:]):
                view = view.narrow(1 + d, 0, size)
            matrix = view.reshape(math.prod(shape), -1)
        return matrix.t().contiguous()
    row, col = matrix.indices()
    values = matrix.values()
    if extra:
        coords = torch.unravel_index(row, (shape[0], *adjoint_out))
        keep = torch.ones_like(row, dtype=torch.bool)
        for c, size in zip(coords[1:], shape[1:]):
            keep &= c < size
        row = ravel([c[keep] for c in coords], shape)
        col, values = col[keep], values[keep]
    transposed = torch.sparse_coo_tensor(
        torch.stack((col, row)), values, (matrix.shape[1], math.prod(shape)), check_invariants=False
    ).coalesce()  # only reorders: no two entries share a position
    return transposed if layout == "coo" else coo_to_csr(transposed)


def _covering_kernel(conv: _ConvNd, shape: tuple[int, ...]) -> bool:
    """True when the conv's weight, reshaped, is its matrix: one position, nothing cropped."""
    return (
        not isinstance(conv, _ConvTransposeNd)
        and conv.groups == 1
        and tuple(conv.kernel_size) == shape[1:]
        and all(d == 1 or k == 1 for d, k in zip(
            per_dim(conv.dilation, len(conv.kernel_size), "dilation", allow_one=True), conv.kernel_size))
        and not conv_module_geometry(conv, shape[1:]).pads
    )


def conv_to_linear(
    conv: nn.Module, input_shape: Sequence[int], *, share_weights: bool = False
) -> nn.Linear:
    """An ``nn.Linear`` equal to ``conv`` on flattened inputs of shape ``input_shape``.

    ``linear(x.flatten(1)) == conv(x).flatten(1)``. Where the kernel covers the input exactly (the
    inverse of :func:`linear_to_conv`) the weight is the kernel reshaped, bit for bit; where it
    covers it with zero padding, the kernel cropped to the taps that touch the input; elsewhere it is
    :func:`conv_matrix` (``out_numel x in_numel``, mostly zeros).

    Args:
        conv: an ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d``.
        input_shape: per-sample input shape ``(C_in, *spatial)``.
        share_weights: if True, the Linear's parameters are views of the conv's storage (aliases);
            possible only where the kernel covers the input exactly, with no padding, groups or
            dilation.

    Returns:
        ``nn.Linear(prod(input_shape), prod(output_shape))``.

    Raises:
        FcconvError: on a wrong module or input shape, or ``share_weights=True`` where the weight
            is not the kernel itself.

    Example:
        >>> linear = conv_to_linear(nn.Conv2d(1, 2, kernel_size=2), (1, 2, 2))
        >>> linear
        Linear(in_features=4, out_features=2, bias=True)
    """
    conv = _check_conv(conv, "conv_to_linear", transpose_ok=True)
    shape = check_input_shape(input_shape, conv=conv, caller="conv_to_linear")
    out_shape = conv_output_shape(conv, shape)
    in_numel, out_numel = math.prod(shape), math.prod(out_shape)
    if _covering_kernel(conv, shape):
        data = _weight_data(conv.weight, (out_numel, in_numel), share_weights)
    elif share_weights:
        raise FcconvError(
            f"share_weights=True needs a kernel that covers the input exactly (kernel_size == "
            f"spatial size, no padding, groups=1); {conv!r} on input_shape {format_shape(shape)} "
            f"has a {out_numel} x {in_numel} matrix that is not a view of its weight. Pass "
            "share_weights=False to copy it."
        )
    else:
        data = conv_matrix(conv, shape)
    weight = _parameter(data, conv.weight)
    bias = None
    if conv.bias is not None:
        if out_numel == conv.out_channels:
            bias = _copy_bias(conv.bias, share_weights)
        else:
            bias = _parameter(conv_bias_vector(conv.bias, out_shape[1:]), conv.bias)
    return _new_linear(in_numel, out_numel, weight, bias, conv)


def _is_pointwise(conv: _ConvNd) -> bool:
    return (
        all(k == 1 for k in conv.kernel_size)
        and all(s == 1 for s in conv.stride)
        and (conv.padding == "valid" or conv.padding == "same"
             or all(p == 0 for p in conv.padding))
    )


def pointwise_to_linear(conv: nn.Module, *, share_weights: bool = False) -> nn.Linear:
    """The inverse of :func:`linear_to_pointwise`: a kernel-1 conv as a Linear over channels.

    ``linear(x.movedim(1, -1)).movedim(-1, 1) == conv(x)``. With ``groups > 1`` the weight is
    block-diagonal (the groups do not mix).

    Args:
        conv: an ``nn.Conv1d/2d/3d`` with kernel size 1, stride 1 and no padding.
        share_weights: if True, the Linear's parameters are views of the conv's storage (aliases);
            not possible with ``groups > 1``.

    Returns:
        ``nn.Linear(in_channels, out_channels)``.

    Raises:
        NotEquivalentError: if the conv is not pointwise.
        FcconvError: on a wrong module type, or ``share_weights=True`` with ``groups > 1``.

    Example:
        >>> pointwise_to_linear(nn.Conv2d(4, 2, kernel_size=1))
        Linear(in_features=4, out_features=2, bias=True)
    """
    conv = _check_conv(conv, "pointwise_to_linear")
    if not _is_pointwise(conv):
        raise NotEquivalentError(
            f"pointwise_to_linear expects a conv with kernel_size 1, stride 1 and no padding; got "
            f"{conv!r}. Use conv_to_linear(conv, input_shape) for its exact matrix on a fixed "
            "input shape."
        )
    c_out, c_in, groups = conv.out_channels, conv.in_channels, conv.groups
    if groups == 1:
        data = _weight_data(conv.weight, (c_out, c_in), share_weights)
    elif share_weights:
        raise FcconvError(
            f"share_weights=True is not possible with groups={groups}: the Linear's weight is "
            "block-diagonal, a new tensor. Pass share_weights=False."
        )
    else:
        blocks = conv.weight.detach().reshape(groups, c_out // groups, c_in // groups)
        data = torch.block_diag(*blocks.unbind(0))
    weight = _parameter(data, conv.weight)
    return _new_linear(c_in, c_out, weight, _copy_bias(conv.bias, share_weights), conv)

