"""The sparse layouts of a conv matrix: CSR and COO from row-sorted entries, and sums of folded taps.

:mod:`fcconv.matrix` says which weight lands where; this module packs those entries into torch
sparse tensors. Where several taps land on one entry (folded padding) they are summed in the order in
which they come, the order of autograd's backward, so that every entry is bit-identical to
``torch.func.jacrev`` (``coalesce`` sums in another order, which can change the last bit).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["assemble", "coo_to_csr", "fold_coo", "folded", "ravel"]


def coo_to_csr(coo: Tensor) -> Tensor:
    """A coalesced COO tensor as CSR, without torch's "CSR support is in beta state" warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return coo.to_sparse_csr()


def ravel(coords: Sequence[Tensor], shape: Sequence[int]) -> Tensor:
    """The flat row-major index of ``coords`` in a tensor of ``shape``."""
    flat = coords[0]
    for c, size in zip(coords[1:], shape[1:]):
        flat = flat * size + c
    return flat


def _sum_duplicates(keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """The sorted distinct ``keys`` and, for each, the sum of its ``values`` in the order given."""
    keys, slot = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(keys.numel(), dtype=values.dtype, device=values.device)
    return keys, summed.index_put_((slot,), values, accumulate=True)


def assemble(col: Tensor, values: Tensor, per_row: Tensor, size: tuple[int, int], layout: str) -> Tensor:
    """A sparse CSR or COO matrix from row-sorted entries, ``per_row`` of them in each row."""
    rows = size[0]
    if layout == "csr":
        crow = torch.zeros(rows + 1, dtype=torch.int64, device=values.device)
        torch.cumsum(per_row, 0, out=crow[1:])
        with warnings.catch_warnings():  # "CSR support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)
    row = torch.arange(rows, device=values.device).repeat_interleave(per_row)
    return torch.sparse_coo_tensor(
        torch.stack((row, col)), values, size, is_coalesced=True, check_invariants=False
    )


def folded(col: Tensor, values: Tensor, per_row: Tensor, size: tuple[int, int], layout: str) -> Tensor:
    """The matrix whose entries sum the taps that land on them (reflect and replicate padding)."""
    rows, cols = size
    device = values.device
    row = torch.arange(rows, device=device).repeat_interleave(per_row)
    if layout == "dense":
        matrix = torch.zeros(rows, cols, dtype=values.dtype, device=device)
        matrix.index_put_((row, col), values, accumulate=True)
        return matrix
    keys, summed = _sum_duplicates(row * cols + col, values)
    row, col = keys.div(cols, rounding_mode="floor"), keys.remainder(cols)
    return assemble(col, summed, torch.bincount(row, minlength=rows), size, layout)


def fold_coo(inner: Tensor, padded: tuple[int, ...], steps: Sequence[tuple[int, int, int, int]],
             pad_left: Sequence[int], in_spatial: Sequence[int]) -> Tensor:
    """Fold the COO matrix of a conv on a circular-padded input onto the unpadded input's columns.

    Args:
        inner: coalesced COO matrix whose columns are positions of the padded input ``padded``
            (``(C_in, *padded spatial)``).
        padded: the padded input's per-sample shape.
        steps: ``(spatial dim, source start, target start, length)`` of each addition, in autograd's
            order; each step sums at most two entries per position, so the order within a step does
            not matter.
        pad_left: padding before the first position, per spatial dim (cropped at the end).
        in_spatial: the unpadded input's spatial size.

    Returns:
        The coalesced COO matrix on ``(C_in, *in_spatial)`` columns.
    """
    row, col = inner.indices()
    values = inner.values()
    numel = math.prod(padded)
    coords = list(torch.unravel_index(col, padded))
    for d, src, dst, length in steps:
        axis = coords[1 + d]
        moved = (axis >= src) & (axis < src + length)
        coords[1 + d] = torch.where(moved, axis - src + dst, axis)
        key, values = _sum_duplicates(row * numel + ravel(coords, padded), values)
        row = key.div(numel, rounding_mode="floor")
        coords = list(torch.unravel_index(key.remainder(numel), padded))
    inside = torch.ones_like(row, dtype=torch.bool)
    for d, (size, lo) in enumerate(zip(in_spatial, pad_left)):
        coords[1 + d] = coords[1 + d] - lo
        inside &= (coords[1 + d] >= 0) & (coords[1 + d] < size)
    shape = (padded[0], *in_spatial)
    col = ravel([c[inside] for c in coords], shape)
    return torch.sparse_coo_tensor(torch.stack((row[inside], col)), values[inside],
                                   (inner.shape[0], math.prod(shape)),
                                   is_coalesced=True, check_invariants=False)
