"""The naive reference for a dense score map: the model on every crop, in batches."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fcconv._shapes import conv_rank, format_shape, per_dim
from fcconv.errors import FcconvError

__all__ = ["SlidingWindow", "sliding_window"]


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
    unbatched = _is_unbatched(model, image, window)
    if unbatched:
        image = image.unsqueeze(0)
    ndim = image.dim() - 2
    win = per_dim(window, ndim, "window")
    step = per_dim(stride, ndim, "stride")
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


def _model_rank(model: object) -> int | None:
    """The number of spatial dims of the model's first conv or pooling, if it has one."""
    if isinstance(model, nn.Module):
        for m in model.modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd,
                              nn.modules.pooling._AvgPoolNd)):
                return conv_rank(m)
    return None


def _is_unbatched(model: object, image: Tensor, window: object) -> bool:
    """Whether ``image`` is one unbatched ``(C, *spatial)``: from the model's conv rank, else from
    the number of window sizes; a 3-d image with one window size for all dims is ambiguous."""
    rank = _model_rank(model)
    if rank is not None and image.dim() in (rank + 1, rank + 2):
        return image.dim() == rank + 1
    if rank is not None:
        raise FcconvError(
            f"image must be (N, C, *spatial) or (C, *spatial) with the model's {rank} spatial "
            f"dim(s); got {format_shape(image.shape)}. Pass a batch of {rank}-d images."
        )
    if isinstance(window, Sequence) and not isinstance(window, str):
        return image.dim() in (3, 4) and len(window) == image.dim() - 1
    if image.dim() == 3:
        raise FcconvError(
            f"image {format_shape(image.shape)} with one window size is ambiguous: a batch "
            "(N, C, L) of 1-d signals or one image (C, H, W)? Pass image[None] (or window=(h, w)) "
            "for one image, window=(l,) for 1-d signals."
        )
    return False


class SlidingWindow(nn.Module):
    """:func:`sliding_window` as a module, without progress bar: the reference to certify a dense map.

    Example:
        >>> fcconv.assert_equivalent(SlidingWindow(model, window=fcn.window, stride=fcn.stride), fcn, image)
    """

    def __init__(self, model: nn.Module, *, window: Sequence[int] | int, stride: Sequence[int] | int,
                 batch_size: int = 32) -> None:
        super().__init__()
        self.model = model
        self.window, self.stride, self.batch_size = window, stride, batch_size

    def forward(self, image: Tensor) -> Tensor:
        return sliding_window(self.model, image, window=self.window, stride=self.stride,
                              batch_size=self.batch_size, progress=False)
