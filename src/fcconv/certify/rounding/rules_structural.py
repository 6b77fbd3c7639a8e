"""Rules for ops that move values without rounding them: views, indexing, copies, max."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fcconv.certify.rounding.registry import (
    Bound,
    Op,
    Unsupported,
    rule_for,
    sum_bounds,
)

_F64 = torch.float64


# ---- structural ops: the bound moves with the values --------------------------------------------


@rule_for("view", "_unsafe_view", "reshape")
def _r_view(op: Op, ch: int) -> Bound:
    e = op.e(op.args[0], ch)
    return None if e is None else e.reshape(op.out.shape)


@rule_for("detach", "alias", "lift_fresh", "clone")
def _r_alias(op: Op, ch: int) -> Bound:
    aux = op.tracker.aux(op.args[0])
    if aux is not None:
        op.set_aux(ch, aux[ch])
    return op.e(op.args[0], ch)


@rule_for("expand", "permute", "transpose", "t", "slice", "select", "unsqueeze", "squeeze", "unfold",
       "flip", "roll", "repeat", "index_select", "gather", "index", "_unsafe_index", "split",
       "split_with_sizes", "unbind", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
       "native_channel_shuffle", "im2col", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
       "replication_pad1d", "replication_pad2d", "replication_pad3d", "upsample_nearest1d",
       "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
       "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "diagonal", "slice_backward",
       "select_backward", "expand_copy", "permute_copy", "view_copy", "movedim", "embedding")
def _r_structural(op: Op, ch: int) -> Any:
    e = op.e(op.args[0], ch)
    if e is None:
        return None
    return op.func(e, *op.args[1:], **op.kwargs)


@rule_for("as_strided")
def _r_as_strided(op: Op, ch: int) -> Bound:
    # Lay the bound out in storage like the tensor, then take the same strided view of it; exact as
    # long as the view reads only storage positions that the tensor itself covers.
    x = op.args[0]
    e = op.e(x, ch)
    if e is None:
        return None
    numel = x.untyped_storage().nbytes() // x.element_size()
    where = torch.arange(numel, device=x.device)
    covered = torch.zeros(numel, dtype=torch.bool, device=x.device)
    covered[where.as_strided(x.shape, x.stride(), x.storage_offset()).reshape(-1)] = True
    read = where.as_strided(*op.args[1:], **op.kwargs).reshape(-1)
    if not bool(covered[read].all()):
        raise Unsupported("as_strided beyond its input")
    laid = torch.zeros(numel, dtype=e.dtype, device=x.device)
    laid.as_strided(x.shape, x.stride(), x.storage_offset()).copy_(e)
    return laid.as_strided(*op.args[1:], **op.kwargs)


@rule_for("cat", "stack")
def _r_cat(op: Op, ch: int) -> Bound:
    tensors = op.args[0]
    es = [op.e(t, ch) for t in tensors]
    if all(e is None for e in es):
        return None
    filled = [torch.zeros_like(t, dtype=_F64) if e is None else e for t, e in zip(tensors, es)]
    return op.func(filled, *op.args[1:], **op.kwargs)


@rule_for("constant_pad_nd", "masked_fill")
def _r_fill_value(op: Op, ch: int) -> Bound:
    # Padding or filling writes an exact constant (its bound is 0); a tensor fill value has its own.
    e = op.e(op.args[0], ch)
    if e is None:
        return None
    args = list(op.args)
    args[0] = e
    if len(args) > 2:
        args[2] = 0.0 if not isinstance(args[2], Tensor) else torch.zeros_like(args[2], dtype=e.dtype)
    return op.func(*args, **op.kwargs)


@rule_for("where")
def _r_where(op: Op, ch: int) -> Bound:
    cond, a, b = op.args[:3]
    ea, eb = op.e(a, ch), op.e(b, ch)
    if ea is None and eb is None:
        return None
    zero = torch.zeros((), dtype=_F64, device=op.out.device)
    return torch.where(cond, zero if ea is None else ea, zero if eb is None else eb)


@rule_for("_to_copy")
def _r_to_copy(op: Op, ch: int) -> Bound:
    e = op.e(op.args[0], ch)
    src, dst = op.args[0].dtype, op.out.dtype
    if not src.is_floating_point or torch.finfo(dst).eps <= torch.finfo(src).eps:
        return e
    # A cast to a coarser dtype inside the model rounds, in the float64 run too.
    eps = op.tracker.eps[ch]
    if eps == 0:
        return e
    return sum_bounds(e, op.abs(op.out).to(_F64) * max(eps, torch.finfo(dst).eps))


rule_for("amax", "amin")(_r_structural)


@rule_for("max", "min")
def _r_max(op: Op, ch: int) -> Any:
    # |max(x + d) - max(x)| <= max |d|; the indices of max.dim are not floating.
    e = op.e(op.args[0], ch)
    if isinstance(op.out, tuple):
        dim = op.args[1]
        keepdim = bool(op.arg(2, "keepdim", False))
        return (None if e is None else e.amax(dim, keepdim=keepdim), None)
    if len(op.args) > 1:
        raise Unsupported("binary max/min")
    return None if e is None else e.max()


@rule_for("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
       "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool1d_with_indices")
def _r_max_pool(op: Op, ch: int) -> Any:
    e = op.e(op.args[0], ch)
    tupled = isinstance(op.out, tuple)
    if e is None:
        return (None, None) if tupled else None
    r = op.func(e, *op.args[1:], **op.kwargs)
    r0 = r[0] if isinstance(r, tuple) else r
    return (r0, None) if tupled else r0

