"""Pictures of score maps: one colour per class, the map over its image, the demo's figure."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fcconv._io import image_format
from fcconv.demo.digits import BACKGROUND

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.gridspec import SubplotSpec

    from fcconv.demo.result import DemoResult

WindowOf = Callable[[tuple[int, int]], tuple[int, ...]]

__all__ = ["FIGURE_DPI", "FIGURE_SIZE", "class_colour", "draw_picture", "draw_score_map"]

FIGURE_SIZE = (12.0, 8.0)
"""Size of the picture in inches; with :data:`FIGURE_DPI` it is 1200 x 800 pixels (width x height)."""
FIGURE_DPI = 100

# One colour per class index, the same in every picture. tab10 without its grey (the grey of the
# colour bar and close to the ink), a dark teal in its place, then tab20's light shades without
# its light grey; more classes cycle.
_CLASS_COLOURS: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#005f5f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#dbdb8d", "#9edae5",
)


def class_colour(index: int) -> tuple[float, float, float]:
    """The RGB colour of class ``index`` in every picture fcconv draws (never a grey)."""
    code = _CLASS_COLOURS[index % len(_CLASS_COLOURS)]
    return (int(code[1:3], 16) / 255, int(code[3:5], 16) / 255, int(code[5:7], 16) / 255)


def _map_extent(window_of: WindowOf, stride: Sequence[int], grid: Sequence[int]
                ) -> tuple[float, float, float, float]:
    """imshow's extent for a map whose cell (i, j) is a stride-sized block centred on its window."""
    t0, l0, b0, r0 = window_of((0, 0))
    sy, sx = stride
    cy, cx = (t0 + b0) / 2 - 0.5, (l0 + r0) / 2 - 0.5  # pixel p spans [p - 0.5, p + 0.5]
    return (cx - sx / 2, cx - sx / 2 + grid[1] * sx, cy - sy / 2 + grid[0] * sy, cy - sy / 2)


def draw_score_map(axes: Axes, winner: Tensor, confidence: Tensor, window_of: WindowOf,
                   stride: Sequence[int], *, opacity: Callable[[Tensor], Tensor],
                   hidden: Iterable[int] = ()) -> None:
    """Draw a dense class map over an image on ``axes``: each cell in its winning class's colour.

    Args:
        axes: matplotlib axes that already show the image, in pixel coordinates.
        winner: ``(H', W')`` winning class per cell.
        confidence: ``(H', W')`` its probability.
        window_of: the FCN's ``window_of``: cell -> ``(top, left, bottom, right)``.
        stride: pixels between cells, ``(rows, cols)``.
        opacity: maps the confidence to the cell's opacity.
        hidden: classes left clear (e.g. background).
    """
    rgba = torch.zeros(*winner.shape, 4)
    palette = torch.tensor([class_colour(c) for c in range(int(winner.max()) + 1)])
    rgba[..., :3] = palette[winner]
    rgba[..., 3] = opacity(confidence)
    for c in hidden:
        rgba[winner == c, 3] = 0.0
    axes.imshow(rgba.numpy(), extent=_map_extent(window_of, stride, winner.shape), interpolation="nearest")


def draw_picture(
    result: DemoResult,
    probabilities: Tensor,
    path: str | os.PathLike[str],
    window_of: Callable[[tuple[int, int]], tuple[int, ...]],
) -> None:
    """Draw the demo's picture: the canvas, then the dense map and the detections over it.

    The figure is :data:`FIGURE_SIZE` inches at :data:`FIGURE_DPI` (1200 x 800 pixels). Top: the
    canvas with the true digits. Bottom: each map cell coloured by its winning digit, opacity its
    confidence (background cells stay clear), the ink drawn over it, detections boxed and labelled
    (green right, red wrong), missed digits dashed.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    canvas = result.canvas
    image = canvas.image[0].detach().cpu().float()
    h, w = image.shape
    confidence, winner = probabilities.detach().cpu().float().max(0)
    gh, gw = winner.shape

    ink = torch.zeros(h, w, 4)
    ink[..., 3] = 0.8 * image.clamp(0, 1)  # let the class colours show through the ink

    fig = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    grid = fig.add_gridspec(2, 2, width_ratios=(1, 0.1), left=0.02, right=0.93, top=0.86, bottom=0.03,
                            hspace=0.16, wspace=0.03)
    top, bottom = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0])
    n = len(canvas.labels)
    fig.suptitle(
        f"A {result.window[0]}x{result.window[1]} digit classifier, convolutionalized, reads the whole "
        f"{h}x{w} canvas in one pass\n{gh}x{gw} windows, "
        f"{'equal to the sliding window' if result.equivalent else 'NOT equal to the sliding window'}, "
        f"{result.speedup:.0f}x faster. Detection: precision {result.precision:.0%}, "
        f"recall {result.recall:.0%}",
        fontsize=13,
    )

    top.imshow(image.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    top.set_title(f"Input: {n} held-out digits the model never saw in training (true labels in grey)",
                  fontsize=10, loc="left")
    for (_, _, gt_bottom, gt_right), label in zip(canvas.boxes, canvas.labels):
        top.text(gt_right, gt_bottom - 0.5, str(label), ha="left", va="bottom", fontsize=9, color="0.45")

    draw_score_map(bottom, winner, confidence, window_of, result.stride, opacity=_alpha, hidden=[BACKGROUND])
    bottom.imshow(ink.numpy(), interpolation="nearest")
    bottom.set_title("Output: each cell coloured by its winning digit, opacity = confidence; "
                     "detections boxed and labelled", fontsize=10, loc="left")
    _draw_detections(bottom, result)
    for ax in (top, bottom):
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])

    _draw_key(fig, grid[1, 1])
    fig.savefig(path, dpi=FIGURE_DPI, format=image_format(path))


_RIGHT, _WRONG, _MISSED = "#1a9850", "#d73027", "#f46d43"


def _draw_detections(ax: Axes, result: DemoResult) -> None:
    """Detections boxed and labelled (green right, red wrong), missed digits dashed."""
    from matplotlib.patches import Rectangle

    for det in result.detections:
        t, left, b, r = det.box
        color = _RIGHT if det.correct else _WRONG
        ax.add_patch(Rectangle((left - 1, t - 1), r - left + 1, b - t + 1, fill=False, lw=1.5,
                                   ec=color))
        ax.text(left - 1, t - 1.3, str(det.label), ha="left", va="bottom", fontsize=11,
                    fontweight="bold", color=color)
    for (gt_top, gt_left, gt_bottom, gt_right), hit in zip(result.canvas.boxes, result.found):
        if not hit:
            ax.add_patch(Rectangle((gt_left - 1.5, gt_top - 1.5), gt_right - gt_left + 2,
                                       gt_bottom - gt_top + 2, fill=False, lw=1.5, ec=_MISSED, ls="--"))


def _draw_key(fig: Figure, cell: SubplotSpec) -> None:
    """The legend (a colour per digit, the box styles) and the confidence bar, in ``cell``."""
    import matplotlib
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.patches import Patch

    side = cell.subgridspec(1, 2, width_ratios=(1, 0.35), wspace=0.2)
    legend_ax = fig.add_subplot(side[0, 0])
    legend_ax.axis("off")
    handles = [Patch(color=class_colour(d), label=str(d)) for d in range(10)]
    handles += [
        Patch(fill=False, ec=_RIGHT, lw=1.5, label="right"),
        Patch(fill=False, ec=_WRONG, lw=1.5, label="wrong"),
        Patch(fill=False, ec=_MISSED, lw=1.5, ls="--", label="missed"),
    ]
    legend_ax.legend(handles=handles, loc="center", fontsize=9, title="digit", title_fontsize=9,
                     frameon=False, handlelength=1.2)
    bar_ax = fig.add_subplot(side[0, 1])
    levels = torch.linspace(0, 1, 101)
    grey = ListedColormap([(0.35, 0.35, 0.35, float(a)) for a in _alpha(levels)])
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=Normalize(0, 1), cmap=grey), cax=bar_ax)
    bar_ax.set_title("confidence", fontsize=9, loc="right")
    bar_ax.tick_params(labelsize=8)


def _alpha(confidence: Tensor) -> Tensor:
    """Opacity of a map cell: faint below the detection threshold, strong above."""
    return 0.1 + 0.8 * confidence.clamp(0, 1)
