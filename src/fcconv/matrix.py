"""The exact matrix of a convolution: pure tensor maths, no modules.

A convolution of an input of fixed shape ``(C_in, *spatial)`` is a linear map, so it has a matrix
``M`` of shape ``(C_out * prod(out_spatial), C_in * prod(spatial))`` with::

    F.convNd(x, weight, bias, ...).flatten(1) == x.flatten(1) @ M.T + conv_bias_vector(bias, out)

This module builds ``M`` directly from the kernel: every entry is one weight, written at the row of its
output position and the column of the input position it touches, so nothing is differentiated and no
arithmetic is done on the values (the entries are bit-identical to the kernel's). Zero padding drops the
taps that fall outside the input; ``reflect``, ``replicate`` and ``circular`` padding fold them back
onto the input positions they read, where they are summed, in the order in which the backward of
PyTorch's padding sums them: on the CPU every entry, in every layout, is bit-identical to the
Jacobian that ``torch.func.jacrev`` computes (on CUDA, ``reflect`` and ``replicate`` sums are
accumulated atomically, in no fixed order, so their last bit may differ).

The dense matrix is written block by block through strided views (one ``copy_`` per run of taps
along each axis), so building it costs little more than ``torch.zeros`` of its size; the script
``bench/conv_matrix.py`` measures it against ``jacrev``, ``jacfwd`` and ``jacobian``.

The sparse layouts (CSR, COO, sums of folded taps) are packed in :mod:`fcconv._sparse`; the
module-level wrapper is :func:`fcconv.conv_matrix`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fcconv._shapes import format_shape, per_dim
from fcconv._sparse import assemble, coo_to_csr, fold_coo, folded
from fcconv.errors import FcconvError

__all__ = [
    "LAYOUTS",
    "ConvGeometry",
    "Layout",
    "PaddingMode",
    "check_layout",
    "conv_bias_vector",
    "conv_geometry",
    "conv_matrix_nnz",
    "conv_weight_matrix",
]

Layout = Literal["dense", "csr", "coo"]
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
LAYOUTS: tuple[Layout, ...] = ("dense", "csr", "coo")
"""The layouts of a conv matrix: a strided tensor, or torch sparse CSR or COO."""
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def check_layout(layout: str) -> None:
    """Raise an :class:`FcconvError` unless ``layout`` is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise FcconvError(
            f"layout must be one of {', '.join(map(repr, LAYOUTS))}; got {layout!r}. Use 'csr' "
            "or 'coo' for a sparse matrix whose memory grows with its nonzeros."
        )


@dataclass(frozen=True)
class ConvGeometry:
    """Where a convolution's kernel lands on an input of a fixed spatial size, per spatial dim.

    Attributes:
        in_spatial: the input's spatial size.
        kernel: the kernel size.
        stride: the stride.
        dilation: the dilation.
        pad_left: padding added before the first input position (top, left, front).
        pad_right: padding added after the last one; differs from ``pad_left`` only for ``"same"``
            padding with an even span, where PyTorch puts the extra row or column at the end.
        out_spatial: the output's spatial size.
    """

    in_spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_left: tuple[int, ...]
    pad_right: tuple[int, ...]
    out_spatial: tuple[int, ...]

    @property
    def ndim(self) -> int:
        """The number of spatial dims (1, 2 or 3)."""
        return len(self.in_spatial)

    @property
    def pads(self) -> bool:
        """True when any padding is added."""
        return any(self.pad_left) or any(self.pad_right)

    @property
    def single_position(self) -> bool:
        """True when the output has one position: the kernel covers the (padded) input."""
        return all(o == 1 for o in self.out_spatial)


def conv_geometry(
    in_spatial: Sequence[int],
    kernel: Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
) -> ConvGeometry:
    """Compute padding and output size of a convolution on an input of spatial size ``in_spatial``.

    Args:
        in_spatial: input spatial size, e.g. ``(32, 32)``.
        kernel: kernel size, one per spatial dim.
        stride: int or one per dim.
        padding: int, one per dim, ``"same"`` or ``"valid"`` (as ``nn.Conv2d`` takes it).
        dilation: int or one per dim.

    Returns:
        The geometry, with PyTorch's placement of the extra padding for ``"same"``.

    Raises:
        FcconvError: if the dilated kernel is larger than the padded input.

    Example:
        >>> conv_geometry((32, 32), (3, 3), stride=2, padding=1).out_spatial
        (16, 16)
    """
    in_spatial = tuple(int(s) for s in in_spatial)
    n = len(in_spatial)
    kernel_t = per_dim(tuple(kernel), n, "kernel_size", allow_one=True)
    stride_t = per_dim(stride, n, "stride", allow_one=True)
    dilation_t = per_dim(dilation, n, "dilation", allow_one=True)
    if isinstance(padding, str):
        if padding == "valid":
            left = right = (0,) * n
        elif padding == "same":
            spans = [d * (k - 1) for d, k in zip(dilation_t, kernel_t)]
            left = tuple(s // 2 for s in spans)
            right = tuple(s - s // 2 for s in spans)
        else:
            raise FcconvError(f"padding must be an int, a tuple, 'same' or 'valid'; got {padding!r}.")
    else:
        left = right = per_dim(padding, n, "padding", allow_one=True)
    out = []
    for i, (size, k, s, d, lo, hi) in enumerate(
        zip(in_spatial, kernel_t, stride_t, dilation_t, left, right)
    ):
        span = d * (k - 1) + 1
        padded = size + lo + hi
        if span > padded:
            raise FcconvError(
                f"The kernel does not fit the input in spatial dim {i}: expected a padded input of at "
                f"least dilation*(kernel_size-1)+1 = {d}*({k}-1)+1 = {span}, got {size}+{lo}+{hi} = "
                f"{padded} for input spatial size {format_shape(in_spatial)}. Use a larger input_shape "
                "or a smaller kernel."
            )
        out.append((padded - span) // s + 1)
    return ConvGeometry(in_spatial, kernel_t, stride_t, dilation_t, left, right, tuple(out))


def _axis_map(
    size: int, kernel: int, stride: int, dilation: int, left: int, out: int, mode: str
) -> tuple[Tensor, Tensor | None]:
    """Input index read by each (output position, kernel tap) along one axis, and which are real."""
    q = (
        torch.arange(out).unsqueeze(1) * stride
        + torch.arange(kernel).unsqueeze(0) * dilation
        - left
    )
    if mode == "zeros":
        valid = (q >= 0) & (q < size)
        return q.clamp(0, size - 1), (None if bool(valid.all()) else valid)
    if mode == "reflect":
        q = torch.where(q < 0, -q, q)
        return torch.where(q >= size, 2 * (size - 1) - q, q), None
    if mode == "replicate":
        return q.clamp(0, size - 1), None
    return q.remainder(size), None  # circular


def _check_padding_mode(geom: ConvGeometry, padding_mode: str) -> None:
    if padding_mode not in _PADDING_MODES:
        raise FcconvError(
            f"padding_mode must be one of {', '.join(_PADDING_MODES)}; got {padding_mode!r}."
        )
    for i, (size, lo, hi) in enumerate(zip(geom.in_spatial, geom.pad_left, geom.pad_right)):
        pad = max(lo, hi)
        if padding_mode == "reflect" and pad >= size:
            raise FcconvError(
                f"reflect padding needs padding < input size in every spatial dim; dim {i} has "
                f"padding {pad} and size {size}. Use a larger input or another padding_mode."
            )
        if padding_mode == "circular" and pad > size:
            raise FcconvError(
                f"circular padding needs padding <= input size in every spatial dim; dim {i} has "
                f"padding {pad} and size {size}. Use a larger input or another padding_mode."
            )


def _tap_index(geom: ConvGeometry, padding_mode: str) -> tuple[Tensor, Tensor | None]:
    """Flat input position read by each (flat output position, flat kernel tap): shapes ``(P, K)``.

    The second tensor marks the taps that read a real input position (``None`` when all do).
    """
    n = geom.ndim
    out_numel = math.prod(geom.out_spatial)
    k_numel = math.prod(geom.kernel)
    index = torch.zeros((1,) * (2 * n), dtype=torch.int64)
    valid: Tensor | None = None
    in_stride = 1
    for d in reversed(range(n)):
        q, ok = _axis_map(
            geom.in_spatial[d],
            geom.kernel[d],
            geom.stride[d],
            geom.dilation[d],
            geom.pad_left[d],
            geom.out_spatial[d],
            padding_mode,
        )
        shape = [1] * (2 * n)
        shape[d], shape[n + d] = q.shape
        index = index + (q * in_stride).view(shape)
        if ok is not None:
            ok = ok.view(shape)
            valid = ok if valid is None else valid & ok
        in_stride *= geom.in_spatial[d]
    full = tuple(geom.out_spatial) + tuple(geom.kernel)
    index = index.expand(full).reshape(out_numel, k_numel)
    if valid is not None:
        valid = valid.expand(full).reshape(out_numel, k_numel)
    return index, valid


def _tap_runs(size: int, kernel: int, stride: int, dilation: int, left: int,
              out: int) -> list[tuple[int, int, int, int]]:
    """Along one axis, under zero padding: runs of consecutive taps that read a real input position
    for the same range of output positions, as ``(first tap, taps, first output, outputs)``.

    Tap ``k`` at output ``o`` reads input ``o * stride + k * dilation - left``, so each tap is valid on
    an interval of outputs, and taps with the same interval form one strided block of the matrix.
    """
    runs: list[tuple[int, int, int, int]] = []
    for k in range(kernel):
        offset = k * dilation - left
        o_lo = max(0, -(offset // stride))  # first o with o * stride + offset >= 0
        o_hi = min(out, (size - 1 - offset) // stride + 1)  # past the last o reading < size
        if o_hi <= o_lo:
            continue
        if runs and runs[-1][0] + runs[-1][1] == k and runs[-1][2:] == (o_lo, o_hi - o_lo):
            k0, nk, _, _ = runs[-1]
            runs[-1] = (k0, nk + 1, o_lo, o_hi - o_lo)
        else:
            runs.append((k, 1, o_lo, o_hi - o_lo))
    return runs


def _write_dense(matrix: Tensor, weight: Tensor, geom: ConvGeometry, groups: int) -> None:
    """Write the kernel into the zero matrix of a conv without folded padding, block by block.

    The matrix, seen as ``(groups, C_out/g, *out_spatial, groups, C_in/g, *in_spatial)``, holds
    weight ``w[g, co, ci, k]`` at ``[g, co, o, g, ci, o * stride + k * dilation - pad]``: for a block
    of taps valid on a box of outputs this is one ``as_strided`` view of the matrix with dims
    ``(g, co, ci, o_1, k_1, ..., o_n, k_n)``, where moving along ``o_d`` moves both the row and the
    column. Each block is filled by one broadcasting ``copy_``: the number of ops is the product over
    axes of the number of tap runs (one per tap near a zero-padded border, one for all interior taps),
    so building the matrix costs little more than allocating it. No two taps of one row share a
    column, so the views do not overlap and every entry is a weight, bit for bit.
    """
    n = geom.ndim
    c_out, c_in_g = weight.shape[0], weight.shape[1]
    c_out_g = c_out // groups
    p_numel, q_numel = math.prod(geom.out_spatial), math.prod(geom.in_spatial)
    cols = c_in_g * groups * q_numel
    p_strides = [math.prod(geom.out_spatial[d + 1:]) for d in range(n)]
    q_strides = [math.prod(geom.in_spatial[d + 1:]) for d in range(n)]
    runs = [
        _tap_runs(geom.in_spatial[d], geom.kernel[d], geom.stride[d], geom.dilation[d],
                  geom.pad_left[d], geom.out_spatial[d])
        for d in range(n)
    ]
    w = weight.reshape(groups, c_out_g, c_in_g, *geom.kernel)
    size_head = [groups, c_out_g, c_in_g]
    stride_head = [c_out_g * p_numel * cols + c_in_g * q_numel, p_numel * cols, q_numel]
    o_strides, k_strides = [], []
    for d in range(n):
        o_strides.append(p_strides[d] * cols + geom.stride[d] * q_strides[d])
        k_strides.append(geom.dilation[d] * q_strides[d])
    for block in itertools.product(*runs):
        sizes, strides = list(size_head), list(stride_head)
        offset = 0
        taps: list[slice | None] = [slice(None)] * 3
        for d, (k0, nk, o0, no) in enumerate(block):
            sizes += [no, nk]
            strides += [o_strides[d], k_strides[d]]
            offset += o0 * p_strides[d] * cols
            offset += (o0 * geom.stride[d] + k0 * geom.dilation[d] - geom.pad_left[d]) * q_strides[d]
            taps += [None, slice(k0, k0 + nk)]
        matrix.as_strided(sizes, strides, offset).copy_(w[tuple(taps)])


def conv_weight_matrix(
    weight: Tensor,
    in_spatial: Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    layout: str = "dense",
) -> Tensor:
    """The matrix of ``F.convNd(x, weight, ...)`` on inputs of spatial size ``in_spatial``.

    Args:
        weight: kernel of shape ``(C_out, C_in // groups, *kernel)`` with 1 to 3 spatial dims.
        in_spatial: spatial size of the input, e.g. ``(32, 32)``.
        stride: as for ``nn.ConvNd``.
        padding: int, one per dim, ``"same"`` or ``"valid"``.
        dilation: as for ``nn.ConvNd``.
        groups: as for ``nn.ConvNd``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        layout: ``"dense"`` (a strided tensor), ``"csr"`` or ``"coo"`` (torch sparse tensors,
            coalesced, memory proportional to the number of nonzeros).

    Returns:
        ``M`` of shape ``(C_out * prod(out_spatial), C_in * prod(in_spatial))``, rows and columns in
        ``torch.flatten(x, 1)`` order (channel first), with the weight's dtype and device, detached
        from autograd. Under ``zeros`` padding its nonzeros are exactly the kernel's values; under
        folded padding modes an entry sums the taps that read one input position, in autograd's
        order (see the module docstring).

    Raises:
        FcconvError: for an unknown layout or padding mode, inconsistent groups, or a kernel larger
            than the padded input.

    Example:
        >>> w = torch.randn(2, 1, 2, 2)
        >>> conv_weight_matrix(w, (2, 2)).shape  # the kernel covers the input: one row per channel
        torch.Size([2, 4])
    """
    check_layout(layout)
    _check_kernel(weight, in_spatial, groups)
    geom = conv_geometry(in_spatial, weight.shape[2:], stride=stride, padding=padding,
                         dilation=dilation)
    _check_padding_mode(geom, padding_mode)
    weight = weight.detach()
    rows = weight.shape[0] * math.prod(geom.out_spatial)
    cols = weight.shape[1] * groups * math.prod(geom.in_spatial)
    # Folded padding modes can send several taps to one input position: those entries are summed.
    folds = padding_mode != "zeros" and geom.pads
    if layout == "dense" and not folds:
        matrix = torch.zeros(rows, cols, dtype=weight.dtype, device=weight.device)
        _write_dense(matrix, weight, geom, groups)
        return matrix
    if folds and padding_mode == "circular":
        return _circular_matrix(weight, geom, groups, layout)
    col, values, per_row = _entries(weight, geom, groups, padding_mode)
    if folds:
        return folded(col, values, per_row, (rows, cols), layout)
    return assemble(col, values, per_row, (rows, cols), layout)


def _check_kernel(weight: Tensor, in_spatial: Sequence[int], groups: int) -> None:
    n = weight.dim() - 2
    if not 1 <= n <= 3 or len(in_spatial) != n:
        raise FcconvError(
            f"A kernel of shape {format_shape(weight.shape)} needs an input with {n} spatial dims; "
            f"got spatial size {format_shape(in_spatial)}."
        )
    c_out = weight.shape[0]
    if groups < 1 or c_out % groups:
        raise FcconvError(
            f"groups must divide the {c_out} output channels; got groups={groups}."
        )


def _entries(weight: Tensor, geom: ConvGeometry, groups: int, padding_mode: str
             ) -> tuple[Tensor, Tensor, Tensor]:
    """``(col, values, per_row)`` of every tap, in (out channel, out position, in channel, tap) order.

    Row-major, so sorted by row, and, under zero padding, by column within a row with no duplicates.
    """
    device = weight.device
    c_out, c_in_g = weight.shape[0], weight.shape[1]
    p_numel, k_numel = math.prod(geom.out_spatial), math.prod(geom.kernel)
    q_numel = math.prod(geom.in_spatial)
    rows = c_out * p_numel
    index, valid = _tap_index(geom, padding_mode)
    index = index.to(device)
    valid = None if valid is None else valid.to(device)
    chan = (torch.arange(groups, device=device).view(groups, 1, 1, 1) * c_in_g
            + torch.arange(c_in_g, device=device).view(1, 1, c_in_g, 1)) * q_numel
    col_g = chan + index.view(1, p_numel, 1, k_numel)  # (G, P, Cin_g, K)
    w4 = weight.reshape(c_out, 1, c_in_g, k_numel)
    if valid is None:
        col_g = col_g.reshape(groups, -1)
        values = w4.expand(c_out, p_numel, c_in_g, k_numel).reshape(-1)
        per_row = torch.full((rows,), c_in_g * k_numel, dtype=torch.int64, device=device)
    else:
        mask = valid.view(1, p_numel, 1, k_numel)
        col_g = torch.masked_select(col_g, mask).view(groups, -1)
        values = torch.masked_select(w4, mask)
        per_row = (valid.sum(1) * c_in_g).repeat(c_out)
    col = col_g.unsqueeze(1).expand(groups, c_out // groups, col_g.shape[1]).reshape(-1)
    return col, values, per_row


def _circular_matrix(weight: Tensor, geom: ConvGeometry, groups: int, layout: str) -> Tensor:
    """The matrix of a conv with circular padding: fold the padded input's matrix like autograd does.

    A circular-padded conv is an unpadded conv on the padded input, so its matrix is that conv's
    matrix (one weight per entry) with the columns of the padding added onto the positions they
    copy. Where several taps land on one position their sum depends on the order of the additions,
    so they are added in the order of the backward of ``torch.nn.functional.pad(mode="circular")``:
    spatial dims first to last, in each the right padding, then the left, each step adding two
    numbers. The entries are then bit-identical to ``torch.func.jacrev`` of the conv.
    """
    c_in = weight.shape[1] * groups
    padded = tuple(s + lo + hi for s, lo, hi in zip(geom.in_spatial, geom.pad_left, geom.pad_right))
    inner = conv_weight_matrix(weight, padded, stride=geom.stride, dilation=geom.dilation,
                               groups=groups, layout="dense" if layout == "dense" else "coo")
    rows = inner.shape[0]
    # (dim, source start, target start, length) of each addition, in autograd's order.
    steps = []
    for d, (size, lo, hi) in enumerate(zip(geom.in_spatial, geom.pad_left, geom.pad_right)):
        if hi:
            steps.append((d, lo + size, lo, hi))
        if lo:
            steps.append((d, 0, size, lo))
    if layout == "dense":
        m = inner.view(rows, c_in, *padded)
        for d, src, dst, length in steps:
            m.narrow(2 + d, dst, length).add_(m.narrow(2 + d, src, length))
        for d, (size, lo) in enumerate(zip(geom.in_spatial, geom.pad_left)):
            m = m.narrow(2 + d, lo, size)
        return m.reshape(rows, -1)
    # Sparse: the same additions on the entries' coordinates.
    coo = fold_coo(inner, (c_in, *padded), steps, geom.pad_left, geom.in_spatial)
    return coo if layout == "coo" else coo_to_csr(coo)


def conv_bias_vector(bias: Tensor, out_spatial: Sequence[int]) -> Tensor:
    """The bias of the conv's matrix form: each channel's bias repeated over its output positions.

    Args:
        bias: shape ``(C_out,)``.
        out_spatial: the output's spatial size.

    Returns:
        Shape ``(C_out * prod(out_spatial),)``, in ``flatten(1)`` order, detached.

    Example:
        >>> conv_bias_vector(torch.tensor([1., 2.]), (1, 2))
        tensor([1., 1., 2., 2.])
    """
    return bias.detach().repeat_interleave(math.prod(out_spatial))


def conv_matrix_nnz(geom: ConvGeometry, padding_mode: str, *, c_out: int, c_in_per_group: int) -> int:
    """The number of nonzero entries (structural) of the conv's matrix, without building it.

    Args:
        geom: the geometry from :func:`conv_geometry`.
        padding_mode: as for ``nn.ConvNd``.
        c_out: output channels.
        c_in_per_group: input channels per group (``weight.shape[1]``).

    Returns:
        The number of entries that a weight lands on; folded padding counts each position once.

    Example:
        >>> conv_matrix_nnz(conv_geometry((3, 3), (2, 2)), "zeros", c_out=1, c_in_per_group=1)
        16
    """
    _check_padding_mode(geom, padding_mode)
    index, valid = _tap_index(geom, padding_mode)
    if padding_mode == "zeros":
        taps = index.numel() if valid is None else int(valid.sum())
    else:
        q_numel = math.prod(geom.in_spatial)
        keys = index + torch.arange(index.shape[0]).unsqueeze(1) * q_numel
        taps = int(torch.unique(keys).numel())
    return taps * c_out * c_in_per_group
