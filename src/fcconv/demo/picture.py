"""The demo's picture: the canvas, then the dense map and the detections over it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fcconv.demo.digits import BACKGROUND

if TYPE_CHECKING:
    from fcconv.demo.run import DemoResult

__all__ = ["FIGURE_DPI", "FIGURE_SIZE", "draw_picture"]

FIGURE_SIZE = (12.0, 8.0)
"""Size of the picture in inches; with :data:`FIGURE_DPI` it is 1200 x 800 pixels (width x height)."""
FIGURE_DPI = 100


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
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    canvas = result.canvas
    image = canvas.image[0].detach().cpu().float()
    h, w = image.shape
    confidence, winner = probabilities.detach().cpu().float().max(0)
    gh, gw = winner.shape

    colors = [matplotlib.colormaps["tab10"](d)[:3] for d in range(10)]
    palette = torch.tensor(colors, dtype=torch.float32)
    overlay = torch.zeros(gh, gw, 4)
    overlay[..., :3] = palette[winner.clamp(max=9)]
    overlay[..., 3] = torch.where(winner != BACKGROUND, _alpha(confidence), torch.zeros(()))
    ink = torch.zeros(h, w, 4)
    ink[..., 3] = 0.8 * image.clamp(0, 1)  # let the class colours show through the ink
    # Cell (i, j) stands for the window window_of((i, j)); draw it as a stride-sized block around
    # the window's centre (in imshow's coordinates pixel p spans [p - 0.5, p + 0.5]).
    t0, l0, b0, r0 = window_of((0, 0))
    sy, sx = result.stride
    cy, cx = (t0 + b0) / 2 - 0.5, (l0 + r0) / 2 - 0.5
    extent = (cx - sx / 2, cx - sx / 2 + gw * sx, cy - sy / 2 + gh * sy, cy - sy / 2)

    fig = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    grid = fig.add_gridspec(2, 2, width_ratios=(1, 0.1), left=0.02, right=0.93, top=0.86, bottom=0.03,
                            hspace=0.16, wspace=0.03)
    top, bottom = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0])
    n = len(canvas.labels)
    fig.suptitle(
        f"A {result.window[0]}x{result.window[1]} digit classifier, convolutionalized, reads the whole "
        f"{h}x{w} canvas in one pass\n{gh}x{gw} windows, "
        f"{'equal to the sliding window' if result.exact else 'NOT equal to the sliding window'}, "
        f"{result.speedup:.0f}x faster. Detection: precision {result.precision:.0%}, "
        f"recall {result.recall:.0%}",
        fontsize=13,
    )

    top.imshow(image.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    top.set_title(f"Input: {n} held-out digits the model never saw in training (true labels in grey)",
                  fontsize=10, loc="left")
    for (_, _, gt_bottom, gt_right), label in zip(canvas.boxes, canvas.labels):
        top.text(gt_right, gt_bottom - 0.5, str(label), ha="left", va="bottom", fontsize=9, color="0.45")

    bottom.imshow(overlay.numpy(), extent=extent, interpolation="nearest")
    bottom.imshow(ink.numpy(), interpolation="nearest")
    bottom.set_title("Output: each cell coloured by its winning digit, opacity = confidence; "
                     "detections boxed and labelled", fontsize=10, loc="left")
    for det in result.detections:
        t, left, b, r = det.box
        color = _RIGHT if det.correct else _WRONG
        bottom.add_patch(Rectangle((left - 1, t - 1), r - left + 1, b - t + 1, fill=False, lw=1.5,
                                   ec=color))
        bottom.text(left - 1, t - 1.3, str(det.label), ha="left", va="bottom", fontsize=11,
                    fontweight="bold", color=color)
    for (gt_top, gt_left, gt_bottom, gt_right), hit in zip(canvas.boxes, result.found):
        if not hit:
            bottom.add_patch(Rectangle((gt_left - 1.5, gt_top - 1.5), gt_right - gt_left + 2,
                                       gt_bottom - gt_top + 2, fill=False, lw=1.5, ec=_MISSED, ls="--"))
    for ax in (top, bottom):
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])

    side = grid[1, 1].subgridspec(1, 2, width_ratios=(1, 0.35), wspace=0.2)
    legend_ax = fig.add_subplot(side[0, 0])
    legend_ax.axis("off")
    handles = [Patch(color=colors[d], label=str(d)) for d in range(10)]
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
    fig.savefig(path, dpi=FIGURE_DPI, format=Path(path).suffix.lstrip(".").lower().replace("jpg", "jpeg"))


_RIGHT, _WRONG, _MISSED = "#1a9850", "#d73027", "#f46d43"


def _alpha(confidence: Tensor) -> Tensor:
    """Opacity of a map cell: faint below the detection threshold, strong above."""
    return 0.1 + 0.8 * confidence.clamp(0, 1)
